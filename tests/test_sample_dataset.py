"""The built-in sample dataset: count, captions, determinism, aspect ratios, and the doctor's verdict."""

from __future__ import annotations

import pytest
from PIL import Image

from lora_gui.data.doctor import check_dataset
from lora_gui.data.sample_dataset import MAX_COUNT, create_sample_dataset


def test_images_and_captions(tmp_path):
    folder = create_sample_dataset(tmp_path / "sample", trigger="zxq", count=12, size=128)
    images, captions = sorted(folder.glob("*.png")), sorted(folder.glob("*.txt"))
    assert len(images) == len(captions) == 12
    assert [p.stem for p in images] == [p.stem for p in captions] == [f"shape-{i:02d}" for i in range(1, 13)]
    texts = [p.read_text(encoding="utf-8").strip() for p in captions]
    assert all(text.startswith("zxq, ") and "background" in text for text in texts)
    assert len(set(texts)) == 12
    assert texts[0] == "zxq, an orange circle on a teal background"
    ratios = set()
    for path in images:
        with Image.open(path) as image:
            assert image.mode == "RGB" and image.width % 8 == 0 and image.height % 8 == 0
            ratios.add(min((1, 4 / 3, 3 / 4), key=lambda r: abs(r - image.width / image.height)))
            assert abs(image.width * image.height / 128**2 - 1) < 0.1  # about the same area
    assert ratios == {1, 4 / 3, 3 / 4}


def test_deterministic(tmp_path):
    first = create_sample_dataset(tmp_path / "a", count=6, size=64)
    second = create_sample_dataset(tmp_path / "b", count=6, size=64)
    for path in sorted(first.iterdir()):
        assert path.read_bytes() == (second / path.name).read_bytes()
    longer = create_sample_dataset(tmp_path / "c", count=8, size=64)  # the first images stay the same
    assert (longer / "shape-03.png").read_bytes() == (first / "shape-03.png").read_bytes()


@pytest.mark.parametrize(("count", "size", "buckets"), [(12, 256, 3), (MAX_COUNT, 64, 1)])
def test_doctor_finds_nothing_wrong(tmp_path, count, size, buckets):
    folder = create_sample_dataset(tmp_path / "sample", count=count, size=size)
    report = check_dataset(folder, trigger="sks", resolution=size)
    assert report.ready and report.reasons == []
    assert report.summary["counts"] == {"ok": count, "warning": 0, "error": 0}
    assert report.summary["trigger"]["coverage"] == 1.0
    assert len(report.summary["buckets"]) == buckets  # at 64 px every shape fits the one 64x64 bucket


def test_never_overwrites(tmp_path):
    folder = create_sample_dataset(tmp_path / "sample", count=2, size=64)
    before = (folder / "shape-01.png").read_bytes()
    with pytest.raises(FileExistsError, match="not empty"):
        create_sample_dataset(folder, trigger="other", count=2, size=64)
    assert (folder / "shape-01.png").read_bytes() == before
    (tmp_path / "empty").mkdir()
    assert len(list(create_sample_dataset(tmp_path / "empty", count=1, size=64).iterdir())) == 2


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"trigger": ""}, "trigger"), ({"trigger": "a, b"}, "trigger"), ({"trigger": "x\ny"}, "trigger"),
    ({"count": 0}, "count"), ({"count": MAX_COUNT + 1}, "count"),
    ({"size": 8}, "size"), ({"size": 10_000}, "size"),
])
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_sample_dataset(tmp_path / "sample", **kwargs)
    assert not (tmp_path / "sample").exists()

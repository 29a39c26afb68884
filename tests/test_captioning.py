"""Captioners end to end on tiny random-weight models built locally, the runner's options, and the CLI.

The Hugging Face Hub cannot be reached from the test machines, so the Hub code path is exercised
by replacing ``huggingface_hub.snapshot_download`` with a stand-in that returns a local folder.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
from tiny_captioners import WD14_TAGS, build_tiny_blip, build_tiny_florence, build_tiny_wd14, make_images

from lora_gui.captioning import (
    Captioner,
    CaptionerError,
    CaptionOptions,
    CaptionProgress,
    caption_dataset,
    get_captioner,
    list_captioners,
    unload_all_captioners,
)
from lora_gui.captioning.run import finish_caption
from lora_gui.captioning.template import filename_words, folder_words
from lora_gui.cli_caption import add_caption_command
from lora_gui.data.scan import read_caption
from lora_gui.events import Status

BLUE, RED = (0, 0, 255), (255, 0, 0)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("captioners")
    built = {"blip": build_tiny_blip(root / "blip"), "florence2": build_tiny_florence(root / "florence2")}
    if _has_onnx():
        built["wd14"] = build_tiny_wd14(root / "wd14")
    return built


@pytest.fixture
def dataset(tmp_path) -> Path:
    folder = tmp_path / "data"
    make_images(folder, {"a_blue.png": BLUE, "b_red.png": RED, "c_blue.jpg": BLUE})
    make_images(folder / "5_extra", {"d_red.png": RED})
    return folder


def _has_onnx() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _captions(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): read_caption(p) for p in sorted(folder.rglob("*.txt"))}


class FakeCaptioner(Captioner):
    """Captions "caption for <stem>"; raises on batch ``fail_on`` to simulate a crash."""

    name = "fake"
    label = "test double"
    default_batch_size = 2

    def __init__(self, fail_on: int = 0, text: str = "caption for {stem}") -> None:
        super().__init__(None)
        self.text = text  # a setting: a resumed run must use the same
        self._fail_on, self._batches, self.captioned_images = fail_on, 0, []

    def settings(self):
        return {"text": self.text}

    def _load(self, placement, progress) -> None:
        return None

    def _caption(self, images, paths):
        self._batches += 1
        if self._batches == self._fail_on:
            raise RuntimeError("simulated crash")
        self.captioned_images += [p.name for p in paths]
        return [self.text.format(stem=p.stem) for p in paths]

    def _release(self) -> None:
        return None


# ----------------------------------------------------------------------------- real captioners, tiny models


@pytest.mark.parametrize("name", ["blip", "florence2"])
def test_model_captioner_writes_captions(models, dataset, name):
    captioner = get_captioner(name, model=str(models[name]), max_new_tokens=8)
    events = []
    summary = caption_dataset(dataset, captioner, CaptionOptions(trigger="sks", batch_size=3), events.append)

    captions = _captions(dataset)
    assert set(captions) == {"a_blue.txt", "b_red.txt", "c_blue.txt", "5_extra/d_red.txt"}
    for text in captions.values():
        assert text.startswith("sks, ") and len(text) > len("sks, ")
        assert "\n" not in text
    assert len(summary.written) == 4 and not summary.failed
    assert [e.done for e in events if isinstance(e, CaptionProgress)] == [3, 4]
    assert not captioner.loaded  # unloaded when the run ends


def test_blip_large_and_florence_large_share_the_loading_code(models):
    for name, folder in (("blip-large", models["blip"]), ("florence2-large", models["florence2"])):
        captioner = get_captioner(name, model=str(folder), max_new_tokens=4)
        assert "large" in captioner.default_model
        assert len(captioner.caption(make_images_in_memory())) == 2
        captioner.unload()


def make_images_in_memory():
    from PIL import Image

    return [Image.new("RGB", (40, 30), BLUE), Image.new("RGBA", (20, 50), (255, 0, 0, 128)).convert("RGB")]


def test_florence_refuses_remote_code_models(tmp_path, models):
    import shutil

    folder = shutil.copytree(models["florence2"], tmp_path / "remote")
    config = (folder / "config.json").read_text()
    (folder / "config.json").write_text(config.replace('"model_type"', '"auto_map": {"AutoConfig": "x.Y"}, "model_type"'))
    with pytest.raises(CaptionerError, match="florence-community/Florence-2-base"):
        get_captioner("florence2", model=str(folder)).load()


def test_blip_refuses_another_kind_of_model(models):
    with pytest.raises(CaptionerError, match="not a BLIP captioning model"):
        get_captioner("blip", model=str(models["florence2"])).load()


@pytest.fixture
def wd14(models) -> Path:
    if "wd14" not in models:
        pytest.skip("onnx and onnxruntime are needed to build and run the tiny tagger")
    return models["wd14"]


def test_wd14_tags_above_threshold_in_confidence_order(wd14, dataset):
    summary = caption_dataset(dataset, get_captioner("wd14", model=str(wd14)), CaptionOptions(trigger="sks"))

    captions = _captions(dataset)
    # Blue images light up "blue_theme" through the first (blue, in BGR) channel; the white padding of a
    # red image is not enough. Underscores become spaces, except in the kaomoji.
    assert captions["a_blue.txt"] == "sks, blue theme, long hair, hatsune miku, smile, ^_^"
    assert captions["b_red.txt"] == "sks, long hair, hatsune miku, smile, ^_^"
    assert len(summary.written) == 4


def test_wd14_thresholds_rating_and_exclusions(wd14):
    from PIL import Image

    images = [Image.new("RGB", (64, 64), RED)]
    strict = get_captioner("wd14", model=str(wd14), threshold=0.55, character_threshold=0.7)
    assert strict.caption(images) == ["long hair, hatsune miku, kagamine rin, smile"]
    tagger = get_captioner("wd14", model=str(wd14), include_rating=True, replace_underscores=False,
                           exclude_tags=["long hair"])
    assert tagger.caption(images) == ["hatsune_miku, smile, ^_^, general"]
    assert len(WD14_TAGS) == 11
    with pytest.raises(CaptionerError, match="between 0 and 1"):
        get_captioner("wd14", threshold=1.5)


def test_wd14_mismatched_tag_list_is_explained(tmp_path, wd14):
    import shutil

    folder = shutil.copytree(wd14, tmp_path / "broken")
    lines = (folder / "selected_tags.csv").read_text().splitlines()
    (folder / "selected_tags.csv").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(CaptionerError, match="predicts 11 tags but selected_tags.csv lists 10"):
        get_captioner("wd14", model=str(folder)).load()


# ----------------------------------------------------------------------------- the Hub path, mocked


def test_hub_download_reports_progress_and_fetches_only_safe_files(monkeypatch, models):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, tqdm_class=None, **kwargs):
        calls.append((repo_id, list(allow_patterns)))
        bar = tqdm_class(total=2, desc="Fetching 2 files")
        bar.update(2)
        bar.close()
        return str(models["blip"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    events = []
    captioner = get_captioner("blip")
    captioner.load(progress=events.append)

    assert calls[0] == ("Salesforce/blip-image-captioning-base", ["config.json"])  # checked before the weights
    repo, patterns = calls[-1]
    assert "*.safetensors" in patterns and not any(p.endswith((".bin", ".pt", ".ckpt")) for p in patterns)
    texts = [e.text for e in events if isinstance(e, Status)]
    assert any("Fetching Salesforce/blip-image-captioning-base" in t for t in texts)
    assert any(e.current == 2 and e.total == 2 for e in events if isinstance(e, Status))
    captioner.unload()


def test_hub_download_of_the_tagger_fetches_its_two_files(monkeypatch, wd14):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, allow_patterns=None, **kw: calls.append((repo_id, allow_patterns)) or str(wd14))
    get_captioner("wd14").load()
    assert calls == [("SmilingWolf/wd-vit-tagger-v3", ["model.onnx", "selected_tags.csv"])]


def test_offline_hub_gives_a_clear_message(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("no connection and not in the cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CaptionerError, match="Could not reach the Hugging Face Hub") as caught:
        get_captioner("florence2").load()
    assert "give the folder of a copy already on this computer" in str(caught.value)
    with pytest.raises(CaptionerError, match="neither an existing folder nor a Hugging Face id"):
        get_captioner("blip", model="./no/such/folder").load()


# ----------------------------------------------------------------------------- registry


def test_registry_lists_and_explains():
    names = [info.name for info in list_captioners()]
    assert names == ["blip", "blip-large", "florence2", "florence2-large", "wd14", "template"]
    with pytest.raises(CaptionerError, match="Choose one of: blip, blip-large"):
        get_captioner("gpt-vision")
    with pytest.raises(CaptionerError, match="has no option threshold; it takes: max_new_tokens, num_beams"):
        get_captioner("blip", threshold=0.3)


def test_unload_all_captioners_frees_every_loaded_one(models):
    captioner = get_captioner("blip", model=str(models["blip"]))
    captioner.load()
    assert captioner.loaded
    assert unload_all_captioners() >= 1
    assert not captioner.loaded


# ----------------------------------------------------------------------------- template


def test_template_captioner(tmp_path):
    folder = tmp_path / "data"
    make_images(folder / "10_red cars", {"IMG_0042_red-car.png": RED, "sports_car-003.jpg": RED})
    (folder / "10_red cars" / "notes.png").write_text("not an image")  # the doctor rejects it: no caption
    captioner = get_captioner("template", template="photo of {trigger}, {filename}, {folder}", trigger="sks")
    summary = caption_dataset(folder, captioner, CaptionOptions(trigger="sks"))
    assert [path.name for path, _ in summary.failed] == ["notes.png"] and "not an image" in summary.failed[0][1]
    assert _captions(folder) == {
        "10_red cars/IMG_0042_red-car.txt": "photo of sks, red car, red cars",
        "10_red cars/sports_car-003.txt": "photo of sks, sports car, red cars",
    }
    assert filename_words(Path("DSC01234.jpg")) == "" and filename_words(Path("cat001_3d_r2d2.png")) == "cat 3d r2d2"
    assert folder_words(Path("2024_holiday/x.png")) == "holiday"  # not 2024 repeats, and numbers are dropped


def test_template_errors_say_what_to_do():
    with pytest.raises(CaptionerError, match="does not know"):
        get_captioner("template", template="photo of {name}")
    with pytest.raises(CaptionerError, match="literal brace"):
        get_captioner("template", template="photo of {trigger")
    with pytest.raises(CaptionerError, match="uses no model"):
        get_captioner("template", model="Salesforce/blip-image-captioning-base")


# ----------------------------------------------------------------------------- options and modes


def test_trigger_prefix_suffix_and_max_length():
    options = CaptionOptions(trigger="sks", prefix="masterpiece", suffix="film grain")
    assert finish_caption("a dog on a sofa", options) == "sks, masterpiece, a dog on a sofa, film grain"
    assert finish_caption("A photo of SKS, a dog", options) == "masterpiece, A photo of SKS, a dog, film grain"
    assert finish_caption("sksdog\n running", CaptionOptions(trigger="sks")) == "sks, sksdog running"
    tags = CaptionOptions(trigger="sks", max_length=30)
    assert finish_caption("long hair, smile, blue sky, outdoors", tags) == "sks, long hair, smile"
    words = CaptionOptions(max_length=16)
    assert finish_caption("a woman standing in a field", words) == "a woman standing"
    assert finish_caption("x" * 40, words) == "x" * 16


@pytest.mark.parametrize(("mode", "expected"), [
    ("skip_existing", {"a_blue.txt": "old", "b_red.txt": "", "c_blue.txt": "new c_blue"}),
    ("only_empty", {"a_blue.txt": "old", "b_red.txt": "new b_red", "c_blue.txt": "new c_blue"}),
    ("overwrite", {"a_blue.txt": "new a_blue", "b_red.txt": "new b_red", "c_blue.txt": "new c_blue"}),
])
def test_modes(dataset, mode, expected):
    (dataset / "a_blue.txt").write_text("old")
    (dataset / "b_red.txt").write_text("  \n")
    (dataset / "5_extra" / "d_red.txt").write_text("kept")
    caption_dataset(dataset, FakeCaptioner(text="new {stem}"), CaptionOptions(mode=mode))
    captions = _captions(dataset)
    assert {k: v for k, v in captions.items() if "/" not in k} == expected
    assert captions["5_extra/d_red.txt"] == ("new d_red" if mode == "overwrite" else "kept")


def test_crash_leaves_old_or_new_files_and_a_rerun_finishes(tmp_path):
    folder = tmp_path / "data"
    make_images(folder, {f"img{i}.png": RED for i in range(6)})
    for i in range(6):
        (folder / f"img{i}.txt").write_text(f"old {i}")

    crashing = FakeCaptioner(fail_on=3)  # batches of 2: the third batch (img4, img5) fails
    with pytest.raises(RuntimeError, match="simulated crash"):
        caption_dataset(folder, crashing, CaptionOptions(mode="overwrite"))
    assert [read_caption(folder / f"img{i}.txt") for i in range(6)] == [
        "caption for img0", "caption for img1", "caption for img2", "caption for img3", "old 4", "old 5"]
    assert not crashing.loaded
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]

    events, rerun = [], FakeCaptioner()
    summary = caption_dataset(folder, rerun, CaptionOptions(mode="overwrite"), events.append)
    assert rerun.captioned_images == ["img4.png", "img5.png"] and len(summary.skipped) == 4
    assert [read_caption(folder / f"img{i}.txt") for i in (4, 5)] == ["caption for img4", "caption for img5"]
    assert any("Continuing an interrupted run: 4 image(s)" in e.text for e in events if isinstance(e, Status))
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # the journal is gone

    with pytest.raises(RuntimeError):
        caption_dataset(folder, FakeCaptioner(fail_on=2), CaptionOptions(mode="overwrite"))
    different = FakeCaptioner(text="other {stem}")  # other settings: the interrupted run is not continued
    caption_dataset(folder, different, CaptionOptions(mode="overwrite"))
    assert len(different.captioned_images) == 6


def test_skip_existing_rerun_continues(tmp_path):
    folder = tmp_path / "data"
    make_images(folder, {f"img{i}.png": RED for i in range(5)})
    with pytest.raises(RuntimeError):
        caption_dataset(folder, FakeCaptioner(fail_on=2), CaptionOptions())
    rerun = FakeCaptioner()
    caption_dataset(folder, rerun, CaptionOptions())
    assert rerun.captioned_images == ["img2.png", "img3.png", "img4.png"]


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    import lora_gui.captioning.files as files

    folder = tmp_path / "data"
    make_images(folder, {f"img{i}.png": RED for i in range(3)})
    for i in range(3):
        (folder / f"img{i}.txt").write_text(f"old {i}")
    real_replace, calls = os.replace, []

    def replace_then_die(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process is killed between writing the temp file and renaming it
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        caption_dataset(folder, FakeCaptioner(), CaptionOptions(mode="overwrite", batch_size=3))
    assert [read_caption(folder / f"img{i}.txt") for i in range(3)] == [
        "caption for img0", "caption for img1", "old 2"]
    assert sorted(p.name for p in folder.iterdir() if p.suffix == ".txt") == ["img0.txt", "img1.txt", "img2.txt"]
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_stop_flag_unreadable_images_and_layouts(tmp_path):
    folder = tmp_path / "data"
    make_images(folder / "images", {"a.png": RED, "b.png": RED, "c.png": RED})
    (folder / "captions").mkdir()
    (folder / "images" / "broken.png").write_bytes(b"")
    summary = caption_dataset(folder, FakeCaptioner(), CaptionOptions(), stop_flag=lambda: False)
    assert sorted(p.name for p in (folder / "captions").iterdir()) == ["a.txt", "b.txt", "c.txt"]
    assert [path.name for path, _ in summary.failed] == ["broken.png"]
    assert "empty" in summary.failed[0][1]

    stopped = caption_dataset(tmp_path / "data", FakeCaptioner(), CaptionOptions(mode="overwrite"),
                              stop_flag=lambda: True)
    assert stopped.stopped and not stopped.written and "continue" in stopped.describe()
    with pytest.raises(CaptionerError, match="not a folder"):
        caption_dataset(tmp_path / "missing", FakeCaptioner())
    with pytest.raises(CaptionerError, match="Unknown caption mode"):
        CaptionOptions(mode="replace")


# ----------------------------------------------------------------------------- CLI


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="lora-gui")
    add_caption_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["caption", *argv])
    return args.func(args)


def test_cli_captions_with_progress(dataset, capsys):
    code = _cli(str(dataset), "--captioner", "template", "--template", "{trigger} {filename}", "--trigger", "sks")
    assert code == 0
    assert read_caption(dataset / "a_blue.txt") == "sks a blue"
    out, err = capsys.readouterr()
    assert "Wrote 4 caption(s)" in out and "4/4" in err
    assert _cli(str(dataset), "--captioner", "template", "--trigger", "sks", "--overwrite") == 0
    assert read_caption(dataset / "a_blue.txt") == "photo of sks"


def test_cli_list_and_errors(dataset, capsys, models):
    assert _cli("--list") == 0
    assert "florence-community/Florence-2-base" in capsys.readouterr().out
    assert _cli(str(dataset)) == 2
    assert "Choose a captioner" in capsys.readouterr().err
    assert _cli(str(dataset), "--captioner", "nope") == 2
    assert _cli(str(dataset), "--captioner", "blip", "--threshold", "0.4") == 2
    assert "only applies to the wd14" in capsys.readouterr().err
    assert _cli(str(dataset / "missing"), "--captioner", "template") == 2
    assert _cli(str(dataset), "--captioner", "blip", "--model", str(dataset / "no-model")) == 1
    assert "neither an existing folder" in capsys.readouterr().err
    assert _cli(str(dataset), "--captioner", "blip", "--model", str(models["blip"]), "--batch-size", "4") == 0


def test_a_run_stops_when_its_captioner_is_unloaded_by_the_trainer(tmp_path):
    folder = tmp_path / "data"
    make_images(folder, {f"img{i}.png": RED for i in range(4)})

    class UnloadedMidRun(FakeCaptioner):
        def _caption(self, images, paths):
            unload_all_captioners()  # what the trainer does before it starts
            return super()._caption(images, paths)

    captioner = UnloadedMidRun()
    with pytest.raises(CaptionerError, match="unloaded while it was captioning"):
        caption_dataset(folder, captioner, CaptionOptions())
    assert captioner.captioned_images == ["img0.png", "img1.png"] and not captioner.loaded

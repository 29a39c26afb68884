"""The dataset doctor on a generated corpus of broken files: verdicts, summary, CLI, training hook, prepare."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_gui.cli_dataset import main as dataset_cli
from lora_gui.config import DatasetSection
from lora_gui.data.buckets import make_buckets
from lora_gui.data.doctor import REPORT_NAME, check_dataset, estimate_clip_tokens, training_records
from lora_gui.data.prepare import PrepareError, prepare_dataset

RESOLUTION, STEP, TRIGGER = 128, 32, "sks"
OPTIONS = {"resolution": RESOLUTION, "bucket_step": STEP, "trigger": TRIGGER}

# ----------------------------------------------------------------------------- building the corpus


def smooth(seed: int, size: tuple[int, int] = (160, 160)) -> Image.Image:
    """A smooth random color field: distinct per seed, stable under resizing and re-compression."""
    grid = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(grid).resize(size, Image.Resampling.BICUBIC)


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def handmade_png(width: int, height: int, bit_depth: int, rows: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, bit_depth, 2, 0, 0, 0)  # color type 2: RGB
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(rows))
            + png_chunk(b"IEND", b""))


def rgb48_png(seed: int) -> bytes:
    pixels = np.asarray(smooth(seed), dtype=np.uint16) * 257
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    return handmade_png(160, 160, 16, rows)


def put(root: Path, name: str, data: bytes | Image.Image, caption: str | bytes | None = None, **save) -> None:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, Image.Image):
        data.save(path, **save)
    else:
        path.write_bytes(data)
    if caption is not None:
        text = caption if isinstance(caption, bytes) else caption.encode()
        path.with_suffix(".txt").write_bytes(text)


def transparent(image: Image.Image) -> Image.Image:
    image = image.convert("RGBA")
    alpha = Image.new("L", image.size, 255)
    alpha.paste(0, (0, 0, image.width // 2, image.height))
    image.putalpha(alpha)
    return image


# name: (status, problem codes, caption); built by ``build_corpus``
EXPECTED: dict[str, tuple[str, set[str]]] = {
    "good.png": ("ok", set()),
    "truncated.png": ("error", {"truncated"}),
    "cut.jpg": ("error", {"truncated"}),
    "empty.png": ("error", {"empty_file"}),
    "text.jpg": ("error", {"not_an_image"}),
    "bomb.png": ("error", {"decompression_bomb"}),
    "cmyk.jpg": ("ok", {"cmyk_converted"}),
    "deep.png": ("ok", {"16bit_converted", "grayscale_converted"}),
    "deep_rgb.png": ("ok", {"16bit_converted"}),
    "palette.png": ("ok", {"transparency_composited"}),
    "rgba.png": ("ok", {"transparency_composited"}),
    "la.png": ("ok", {"transparency_composited", "grayscale_converted"}),
    "gray.png": ("ok", {"grayscale_converted"}),
    "rotated.jpg": ("ok", {"exif_rotated"}),
    "wrong_ext.jpg": ("ok", {"wrong_extension"}),
    "anim.gif": ("warning", {"animated_first_frame"}),
    "tiny.png": ("error", {"too_small"}),
    "small.png": ("warning", {"too_small"}),
    "tall.png": ("warning", {"extreme_aspect"}),
    "nocap.png": ("warning", {"caption_missing"}),
    "emptycap.png": ("warning", {"caption_empty"}),
    "binarycap.png": ("error", {"caption_unreadable"}),
    "dircap.png": ("error", {"caption_unreadable"}),
    "bom.png": ("ok", {"caption_encoding"}),
    "utf16.png": ("ok", {"caption_encoding"}),
    "crlf.png": ("ok", {"caption_encoding"}),
    "cp1252.png": ("warning", {"caption_encoding"}),
    "notrigger.png": ("warning", {"trigger_missing"}),
    "long.png": ("warning", {"caption_too_long"}),
    "shared.png": ("warning", {"shared_caption_stem"}),
    "shared.jpg": ("warning", {"shared_caption_stem"}),
    "orig.png": ("ok", set()),
    "orig_copy.png": ("warning", {"duplicate"}),
    "scene.png": ("ok", set()),
    "scene_resized.jpg": ("warning", {"near_duplicate"}),
    "3_extra/repeat.png": ("ok", set()),
}


def build_corpus(root: Path) -> Path:
    seeds = iter(range(1, 1000))
    ok = lambda: f"{TRIGGER}, picture {next(seeds)}"  # noqa: E731
    put(root, "good.png", smooth(next(seeds)), ok())
    png = encoded(smooth(next(seeds)), "PNG")
    put(root, "truncated.png", png[: len(png) // 2], ok())
    jpeg = encoded(smooth(next(seeds)), "JPEG")
    put(root, "cut.jpg", jpeg[: len(jpeg) // 2], ok())
    put(root, "empty.png", b"", ok())
    put(root, "text.jpg", b"this is a text file, not a photo\n", ok())
    put(root, "bomb.png", handmade_png(100_000, 100_000, 8, b"\x00" * 64), ok())
    put(root, "cmyk.jpg", smooth(next(seeds)).convert("CMYK"), ok())
    deep = np.asarray(smooth(next(seeds)).convert("L"), dtype=np.uint16) * 257
    put(root, "deep.png", Image.fromarray(deep), ok())
    put(root, "deep_rgb.png", rgb48_png(next(seeds)), ok())
    put(root, "palette.png", smooth(next(seeds)).quantize(16), ok(), transparency=0)
    put(root, "rgba.png", transparent(smooth(next(seeds))), ok())
    put(root, "la.png", transparent(smooth(next(seeds))).convert("LA"), ok())
    put(root, "gray.png", smooth(next(seeds)).convert("L"), ok())
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    put(root, "rotated.jpg", smooth(next(seeds), (160, 120)), ok(), exif=exif, quality=95)
    put(root, "wrong_ext.jpg", encoded(smooth(next(seeds)), "PNG"), ok())
    frames = [smooth(next(seeds)), smooth(next(seeds))]
    put(root, "anim.gif", frames[0], ok(), save_all=True, append_images=frames[1:], duration=100)
    put(root, "tiny.png", Image.new("RGB", (1, 1), (9, 9, 9)), ok())
    put(root, "small.png", smooth(next(seeds), (90, 90)), ok())
    put(root, "tall.png", smooth(next(seeds), (80, 2400)), ok())
    put(root, "nocap.png", smooth(next(seeds)))
    put(root, "emptycap.png", smooth(next(seeds)), " \r\n ")
    put(root, "binarycap.png", smooth(next(seeds)), encoded(smooth(next(seeds)), "PNG"))
    put(root, "dircap.png", smooth(next(seeds)))
    (root / "dircap.txt").mkdir()
    put(root, "bom.png", smooth(next(seeds)), "\ufeff" + ok())
    put(root, "utf16.png", smooth(next(seeds)), ok().encode("utf-16"))
    put(root, "crlf.png", smooth(next(seeds)), ok() + "\r\nsecond line\r\n")
    put(root, "cp1252.png", smooth(next(seeds)), f"{TRIGGER}, café crème".encode("cp1252"))
    put(root, "notrigger.png", smooth(next(seeds)), "a dog on a beach")
    put(root, "long.png", smooth(next(seeds)), f"{TRIGGER}, " + ", ".join(f"detail {i}" for i in range(60)))
    put(root, "shared.png", smooth(next(seeds)), ok())
    put(root, "shared.jpg", smooth(next(seeds)))
    put(root, "orig.png", smooth(next(seeds)), ok())
    put(root, "orig_copy.png", (root / "orig.png").read_bytes(), ok())
    scene = smooth(next(seeds), (200, 160))
    put(root, "scene.png", scene, ok())
    put(root, "scene_resized.jpg", scene.resize((180, 144), Image.Resampling.LANCZOS), ok(), quality=80)
    put(root, "3_extra/repeat.png", smooth(next(seeds)), ok())
    (root / "lonely.txt").write_text("a caption whose image was deleted")
    (root / "notes.md").write_text("not part of the dataset")
    return root


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*")) if path.is_file()
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return build_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def report(corpus: Path):
    return check_dataset(corpus, **OPTIONS)


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = dataset_cli(["dataset", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ----------------------------------------------------------------------------- per-file verdicts


def test_every_file_gets_the_expected_verdict(report):
    verdicts = {f.relative: (f.status, set(f.codes)) for f in report.files}
    assert verdicts == EXPECTED
    for file in report.files:
        assert all(p.message.endswith(".") and len(p.message) > 30 for p in file.problems), file.relative


def test_verdict_details(report):
    files = {f.relative: f for f in report.files}
    assert (files["rotated.jpg"].width, files["rotated.jpg"].height) == (120, 160)
    encoding = {name: files[name].problems[0].severity for name in ("bom.png", "utf16.png", "crlf.png", "cp1252.png")}
    assert encoding == {"bom.png": "info", "utf16.png": "info", "crlf.png": "info", "cp1252.png": "warning"}
    assert files["utf16.png"].caption.startswith(f"{TRIGGER}, picture")
    assert files["crlf.png"].caption.endswith("\nsecond line") and "\r" not in files["crlf.png"].caption
    assert files["cp1252.png"].caption == f"{TRIGGER}, café crème"
    assert "about" in files["long.png"].problems[0].message and "CLIP reads 77" in files["long.png"].problems[0].message
    assert "orig.png" in files["orig_copy.png"].problems[0].message
    assert "scene.png" in files["scene_resized.jpg"].problems[0].message
    assert files["tiny.png"].problems[0].severity == "error" and files["small.png"].problems[0].severity == "warning"
    assert files["3_extra/repeat.png"].repeats == 3


def test_flat_images_of_different_colors_are_not_near_duplicates(tmp_path: Path):
    for i, color in enumerate([(255, 0, 0), (0, 0, 255), (250, 2, 3)]):
        put(tmp_path, f"flat{i}.png", Image.new("RGB", (128, 128), color), "flat")
    codes = {f.relative: f.codes for f in check_dataset(tmp_path, resolution=128).files}
    assert codes == {"flat0.png": [], "flat1.png": [], "flat2.png": ["near_duplicate"]}


def test_low_pixel_limit_and_token_counting(tmp_path: Path):
    put(tmp_path, "a.png", smooth(1), "one two three four five six")
    file = check_dataset(tmp_path, resolution=128, max_pixels=100).files[0]
    assert file.codes == ["decompression_bomb"] and "downscale" in file.problems[0].message
    assert estimate_clip_tokens("a photo of sks, smiling") == 2 + 6

    class FakeTokenizer:
        def encode(self, text: str) -> list[int]:
            return list(range(len(text.split()) * 10))

    file = check_dataset(tmp_path, resolution=128, tokenizer=FakeTokenizer(), token_limit=50).files[0]
    assert file.codes == ["caption_too_long"] and file.caption_tokens == 60
    assert "is 60 tokens; the text encoder reads 50" in file.problems[0].message


# ----------------------------------------------------------------------------- dataset summary


def test_summary_counts_buckets_trigger_and_readiness(report):
    summary = report.summary
    statuses = [status for status, _ in EXPECTED.values()]
    assert summary["counts"] == {s: statuses.count(s) for s in ("ok", "warning", "error")}
    usable = [f for f in report.files if f.usable]
    assert summary["usable"] == len(usable) == statuses.count("ok") + statuses.count("warning")
    assert sum(summary["buckets"].values()) == len(usable)
    allowed = {f"{w}x{h}" for w, h in make_buckets(RESOLUTION, STEP)}
    assert set(summary["buckets"]) <= allowed and summary["buckets"]["128x128"] >= 20
    assert next(f.bucket for f in report.files if f.relative == "tall.png") == (64, 256)
    trigger = summary["trigger"]
    assert trigger["word"] == TRIGGER and trigger["without"] == 3  # nocap, emptycap, notrigger
    assert trigger["with"] == len(usable) - 3
    assert summary["captions"]["missing"] == 1 and summary["captions"]["empty"] == 1
    assert summary["captions"]["tokens"]["max"] > 77
    assert summary["resolution"]["width"]["max"] == 200
    assert summary["orphan_captions"] == ["lonely.txt"]
    assert report.ready and summary["ready"]
    skipped = statuses.count("error")
    assert summary["reasons"][0].startswith(f"{skipped} of {len(EXPECTED)} images can't be used")
    assert any("trigger word 'sks' is missing from 3" in reason for reason in summary["reasons"])
    text = report.render_text()
    assert "Errors (these files are skipped):" in text and "Ready to train" in text and "bomb.png" in text


def test_only_bad_files_is_not_ready_and_stops_training(tmp_path: Path, capsys):
    put(tmp_path, "empty.png", b"")
    put(tmp_path, "text.jpg", b"not an image")
    report = check_dataset(tmp_path)
    assert not report.ready and report.usable_paths() == []
    assert "None of the 2 images can be used" in report.reasons[0]
    lines: list[str] = []
    with pytest.raises(ValueError, match=r"None of the 2 images can be used \(empty_file: 1, not_an_image: 1\)"):
        training_records(DatasetSection(dir=str(tmp_path)), log=lines.append)
    assert len(lines) == 2 and "empty.png" in lines[0] and "text.jpg" in lines[1]
    code, out, _ = run_cli(capsys, "check", str(tmp_path), "--json")
    assert code == 1 and json.loads(out)["summary"]["ready"] is False
    empty = tmp_path / "nothing"
    empty.mkdir()
    assert "No images found" in check_dataset(empty).reasons[0]
    assert run_cli(capsys, "check", str(empty))[0] == 1


# ----------------------------------------------------------------------------- CLI


def test_json_output_schema_and_exit_code(corpus: Path, capsys):
    code, out, _ = run_cli(capsys, "check", str(corpus), "--resolution", "128", "--bucket-step", "32",
                           "--trigger", TRIGGER, "--json")
    assert code == 0
    data = json.loads(out)
    assert set(data) == {"files", "summary"}
    assert {entry["path"] for entry in data["files"]} == set(EXPECTED)
    for entry in data["files"]:
        assert entry["status"] in {"ok", "warning", "error"}
        for item in entry["problems"]:
            assert set(item) == {"code", "severity", "message"} and item["code"].replace("16", "").islower()
    assert data["summary"]["trigger"]["without"] == 3
    assert not (corpus / REPORT_NAME).exists()


def test_report_is_written_only_when_asked(tmp_path: Path, capsys):
    put(tmp_path, "a.png", smooth(1), "a caption")
    code, out, _ = run_cli(capsys, "check", str(tmp_path), "--resolution", "128")
    assert code == 0 and "Ready to train" in out and not (tmp_path / REPORT_NAME).exists()
    code, out, err = run_cli(capsys, "check", str(tmp_path), "--resolution", "128", "--json", "--write-report")
    written = json.loads((tmp_path / REPORT_NAME).read_text(encoding="utf-8"))
    assert code == 0 and written == json.loads(out) and REPORT_NAME in err
    elsewhere = tmp_path.parent / f"{tmp_path.name}-report.json"
    assert run_cli(capsys, "check", str(tmp_path), "--resolution", "128", "--write-report", str(elsewhere))[0] == 0
    assert elsewhere.is_file()
    assert {f.relative for f in check_dataset(tmp_path).files} == {"a.png"}  # the report is not a dataset file


def test_usage_errors_exit_2(tmp_path: Path, capsys):
    assert run_cli(capsys, "check", str(tmp_path / "missing"))[0] == 2
    assert run_cli(capsys, "check", str(tmp_path), "--resolution", "abc")[0] == 2
    assert run_cli(capsys, "check", str(tmp_path), "--resolution", "8")[0] == 2
    assert run_cli(capsys, "check")[0] == 2
    assert dataset_cli(["dataset"]) == 2
    code, _, err = run_cli(capsys, "prepare", str(tmp_path), str(tmp_path / "out"))
    assert code == 2 and "inside the source" in err and not (tmp_path / "out").exists()
    assert run_cli(capsys, "prepare", str(tmp_path), str(tmp_path))[0] == 2
    assert run_cli(capsys, "prepare", str(tmp_path / "sub"), str(tmp_path))[0] == 2
    with pytest.raises(PrepareError, match="inside the source"):
        prepare_dataset(tmp_path, tmp_path / "copies")


# ----------------------------------------------------------------------------- training and prepare


def test_training_uses_exactly_the_files_the_doctor_passes(corpus: Path, report):
    from lora_gui.data.dataset import TrainingData

    section = DatasetSection(dir=str(corpus), resolution=RESOLUTION, bucket_step=STEP, trigger_word=TRIGGER)
    lines: list[str] = []
    records = training_records(section, size_multiple=8, log=lines.append)
    assert [r.path for r in records] == report.usable_paths()
    skipped = [name for name, (status, _) in EXPECTED.items() if status == "error"]
    skip_lines = [line for line in lines if line.startswith("Skipped ")]
    assert len(skip_lines) == len(skipped) and all(any(name in line for line in skip_lines) for name in skipped)
    assert any("trigger word" in line for line in lines)
    data = TrainingData(section, size_multiple=8, batch_size=2, log=lines.append, records=records)
    assert data.num_samples == len(records) + 2  # 3_extra repeats three times
    for index in range(len(data.records)):
        width, height = data.placements[index].bucket
        assert data.load_pixels(index).shape == (3, height, width)  # the doctor's sizes match the loader's


def test_prepare_writes_bucket_sized_rgb_copies_and_never_touches_originals(corpus: Path, report, tmp_path):
    before = tree_hashes(corpus)
    out = tmp_path / "prepared"
    progress: list[tuple[int, int]] = []
    summary = prepare_dataset(corpus, out, RESOLUTION, STEP, 8, lambda d, t: progress.append((d, t)))
    assert tree_hashes(corpus) == before
    assert progress[-1] == (len(EXPECTED), len(EXPECTED))
    assert len(summary.written) == len(report.usable_files())
    assert {path for path, _ in summary.skipped} == {n for n, (s, _) in EXPECTED.items() if s == "error"}
    buckets = set(make_buckets(RESOLUTION, STEP))
    for path in summary.written:
        with Image.open(path) as image:
            assert image.mode == "RGB" and image.size in buckets and path.suffix == ".png"
    assert (out / "3_extra" / "repeat.png").is_file()
    assert {p.name for p in out.glob("shared*")} == {"shared.png", "shared.txt", "shared_png.png", "shared_png.txt"}
    assert (out / "utf16.txt").read_bytes() == (out / "utf16.txt").read_text(encoding="utf-8").encode()
    assert (out / "crlf.txt").read_bytes().count(b"\r") == 0
    assert (out / "cp1252.txt").read_text(encoding="utf-8") == f"{TRIGGER}, café crème"
    with Image.open(out / "rotated.png") as rotated:
        assert rotated.height > rotated.width  # orientation applied
    assert check_dataset(out, resolution=RESOLUTION, bucket_step=STEP).summary["counts"]["error"] == 0

    code = dataset_cli(["dataset", "prepare", str(corpus), str(tmp_path / "jpg"), "--resolution", "128",
                        "--bucket-step", "32", "--format", "jpg"])
    assert code == 0 and len(list((tmp_path / "jpg").rglob("*.jpg"))) == len(summary.written)
    assert tree_hashes(corpus) == before

"""The training data path: scanning, image loading, buckets, captions, batches and caches."""

from __future__ import annotations

import io
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lora_gui.config import DatasetSection
from lora_gui.data.buckets import make_buckets, nearest_bucket, place, prepare_image, square_bucket
from lora_gui.data.captions import caption_rng, caption_variant, shuffle_tags
from lora_gui.data.dataset import TrainingData
from lora_gui.data.images import ImageLoadError, load_rgb, probe_image
from lora_gui.data.scan import decode_caption, scan_folder

# ----------------------------------------------------------------------------- fixtures


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def write_caption(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def noise_png_bytes(size=(64, 64)) -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def messy(tmp_path: Path) -> Path:
    """A folder holding every kind of file a person might drop into a dataset."""
    root = tmp_path / "messy"
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 0))
    rgba.paste((255, 0, 0, 128), (0, 0, 20, 30))
    save(rgba, root / "rgba.png")
    write_caption(root / "rgba.txt", "\ufeffa red, half transparent".encode())

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    save(Image.new("RGB", (60, 40), (0, 128, 0)), root / "rotated.jpg", exif=exif)
    write_caption(root / "rotated.txt", "sideways photo".encode("utf-16"))

    save(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), root / "cmyk.jpg")
    write_caption(root / "cmyk.txt", "caf\xe9 in cp1252".encode("cp1252"))

    save(Image.fromarray(np.full((24, 24), 32768, dtype=np.uint16)), root / "deep.png")
    write_caption(root / "deep.txt", b"  line one\r\nline two\r\n\r\n")

    palette = Image.new("P", (20, 20), 0)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(1, (10, 0, 20, 20))
    save(palette, root / "palette.png", transparency=0)

    frames = [Image.new("RGB", (20, 20), color) for color in ((255, 0, 0), (0, 0, 255))]
    save(frames[0], root / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)

    data = noise_png_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "fake.png").write_text("this is not an image")
    save(Image.new("RGB", (1, 1), (200, 200, 200)), root / "tiny.png")
    (root / "notes.md").write_text("ignored: not an image extension")

    for i in range(2):
        save(Image.new("RGB", (48, 32), (i * 50, 0, 0)), root / "3_cats" / f"cat{i}.png")
        write_caption(root / "3_cats" / f"cat{i}.txt", f"cat {i}".encode())
    return root


def tagged_dataset(root: Path, count: int = 12) -> Path:
    """Valid images of several aspect ratios with comma-separated tag captions."""
    sizes = [(64, 64), (96, 48), (48, 96), (80, 60)]
    for i in range(count):
        width, height = sizes[i % len(sizes)]
        save(Image.new("RGB", (width, height), (i * 20 % 256, 40, 90)), root / f"img{i:02d}.png")
        write_caption(root / f"img{i:02d}.txt", ", ".join(f"tag{i}_{t}" for t in range(6)).encode())
    return root


def section(root: Path, **overrides) -> DatasetSection:
    values = {"dir": str(root), "resolution": 64, "bucket_step": 32, "keep_tokens": 1}
    return DatasetSection(**(values | overrides))


# ----------------------------------------------------------------------------- scanning


def test_scan_skips_unusable_files_with_one_log_line_each(messy: Path):
    lines: list[str] = []
    report = scan_folder(messy, log=lines.append)
    skipped = {file.path.name for file in report.skipped}
    assert skipped == {"truncated.png", "empty.png", "fake.png"}
    for name in skipped:
        assert sum(name in line for line in lines) == 1
    used = {record.path.name for record in report.records}
    assert used == {
        "rgba.png",
        "rotated.jpg",
        "cmyk.jpg",
        "deep.png",
        "palette.png",
        "anim.gif",
        "tiny.png",
        "cat0.png",
        "cat1.png",
    }


def test_scan_reads_captions_in_any_encoding_and_reports_missing_ones(messy: Path):
    lines: list[str] = []
    captions = {r.path.name: r.caption for r in scan_folder(messy, log=lines.append).records}
    assert captions["rgba.png"] == "a red, half transparent"  # UTF-8 BOM dropped
    assert captions["rotated.jpg"] == "sideways photo"  # UTF-16
    assert captions["cmyk.jpg"] == "café in cp1252"
    assert captions["deep.png"] == "line one\nline two"  # CRLF normalised, stripped
    assert captions["palette.png"] == ""
    missing = [line for line in lines if "no .txt caption" in line]
    assert len(missing) == 1 and "palette.png" in missing[0] and "tiny.png" in missing[0]
    assert decode_caption(b"\xfe\xff" + "ä".encode("utf-16-be")) == "ä"  # big-endian UTF-16


def test_kohya_folder_repeats_and_default_repeats(messy: Path):
    records = scan_folder(messy, default_repeats=2, log=lambda _: None).records
    repeats = {r.path.name: r.repeats for r in records}
    assert repeats["cat0.png"] == repeats["cat1.png"] == 3
    assert repeats["rgba.png"] == 2


def test_images_and_captions_folder_layout(tmp_path: Path):
    save(Image.new("RGB", (32, 32)), tmp_path / "images" / "a.png")
    save(Image.new("RGB", (32, 32)), tmp_path / "images" / "2_dogs" / "b.jpg")
    write_caption(tmp_path / "captions" / "a.txt", b"caption of a")
    write_caption(tmp_path / "captions" / "2_dogs" / "b.txt", b"caption of b")
    records = {r.path.name: r for r in scan_folder(tmp_path, log=lambda _: None).records}
    assert records["a.png"].caption == "caption of a"
    assert records["b.jpg"].caption == "caption of b" and records["b.jpg"].repeats == 2


# ----------------------------------------------------------------------------- image loading


def test_exif_orientation_is_applied(messy: Path):
    assert probe_image(messy / "rotated.jpg") == (40, 60)
    assert load_rgb(messy / "rotated.jpg").size == (40, 60)
    record = next(r for r in scan_folder(messy, log=lambda _: None).records if r.path.name == "rotated.jpg")
    assert (record.width, record.height) == (40, 60)


def test_transparency_is_composited_on_white(messy: Path):
    image = load_rgb(messy / "rgba.png")
    assert image.mode == "RGB"
    assert image.getpixel((30, 10)) == (255, 255, 255)  # fully transparent
    red, green, blue = image.getpixel((5, 10))  # red at alpha 128 over white
    assert red == 255 and abs(green - 127) <= 1 and abs(blue - 127) <= 1
    palette = load_rgb(messy / "palette.png")
    assert palette.getpixel((2, 2)) == (255, 255, 255) and palette.getpixel((15, 2)) == (0, 0, 255)


def test_unusual_modes_become_rgb(messy: Path):
    deep = load_rgb(messy / "deep.png")
    assert deep.mode == "RGB" and abs(deep.getpixel((3, 3))[0] - 128) <= 1  # 16-bit scaled, not clipped
    cmyk = load_rgb(messy / "cmyk.jpg")
    assert cmyk.mode == "RGB" and cmyk.getpixel((5, 5))[0] > 200 and cmyk.getpixel((5, 5))[1] < 60
    assert load_rgb(messy / "anim.gif").getpixel((5, 5)) == (255, 0, 0)  # first frame
    assert load_rgb(messy / "tiny.png").size == (1, 1)


def test_broken_files_and_bombs_raise_a_clear_error(messy: Path):
    for name, words in [("empty.png", "empty"), ("fake.png", "not an image"), ("truncated.png", "truncated")]:
        with pytest.raises(ImageLoadError, match=words):
            load_rgb(messy / name)
    with pytest.raises(ImageLoadError, match="decompression bombs"):
        load_rgb(messy / "rgba.png", max_pixels=100)


# ----------------------------------------------------------------------------- buckets


def test_buckets_have_aligned_sides_and_about_the_target_area():
    for resolution in (512, 1024):
        buckets = make_buckets(resolution, 64)
        assert (resolution, resolution) in buckets
        for width, height in buckets:
            assert width % 64 == 0 and height % 64 == 0
            assert 0.75 * resolution**2 <= width * height <= resolution**2
            assert max(width / height, height / width) <= 4.0
    assert all(w % 48 == 0 and h % 48 == 0 for w, h in make_buckets(512, math.lcm(24, 16)))


def test_nearest_bucket_and_aspect_kept_when_fitting():
    buckets = make_buckets(512, 64)
    assert nearest_bucket(1000, 1000, buckets) == (512, 512)
    wide = nearest_bucket(1600, 900, buckets)
    assert wide[0] > wide[1]
    placement = place(1600, 900, wide)
    assert abs(placement.resized[0] / placement.resized[1] - 1600 / 900) < 0.01
    assert placement.resized[0] >= wide[0] and placement.resized[1] >= wide[1]


def test_fitting_covers_and_center_crops_without_squashing():
    image = Image.new("RGB", (400, 200), (255, 255, 255))
    image.paste((0, 0, 0), (150, 50, 250, 150))  # a 100 x 100 black square in the middle
    pixels, conditioning = prepare_image(image, square_bucket(256, 64))
    assert pixels.shape == (3, 256, 256) and pixels.dtype == torch.float32
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    dark = (pixels[0] < 0).nonzero()
    height = dark[:, 0].max() - dark[:, 0].min() + 1
    width = dark[:, 1].max() - dark[:, 1].min() + 1
    assert abs(int(height) - 128) <= 2 and abs(int(width) - 128) <= 2  # still square, scaled by 1.28
    assert conditioning.original_size == (200, 400)
    assert conditioning.crop_top_left == (0, 128)
    assert conditioning.target_size == (256, 256)


# ----------------------------------------------------------------------------- captions


def test_tag_shuffle_keeps_leading_tags_and_dropout_rate():
    caption = "trigger, style, a, b, c, d, e"
    seen = set()
    for i in range(50):
        shuffled = shuffle_tags(caption, 2, random.Random(i)).split(", ")
        assert shuffled[:2] == ["trigger", "style"] and sorted(shuffled[2:]) == ["a", "b", "c", "d", "e"]
        seen.add(tuple(shuffled))
    assert len(seen) > 10
    dropped = sum(caption_variant("x", random.Random(i), dropout=0.3) == "" for i in range(4000))
    assert 0.27 < dropped / 4000 < 0.33
    assert caption_variant("a, b", caption_rng(1, 2, 3), 0.5, True, 1) == caption_variant(
        "a, b", caption_rng(1, 2, 3), 0.5, True, 1
    )


# ----------------------------------------------------------------------------- dataset and order


def test_zero_usable_images_is_an_actionable_error(tmp_path: Path):
    (tmp_path / "broken.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"No usable images.*1 file\(s\) could not be read"):
        TrainingData(section(tmp_path), log=lambda _: None)
    with pytest.raises(ValueError, match="not set"):
        TrainingData(DatasetSection(dir=""))


def test_batches_are_deterministic_and_one_bucket_each(tmp_path: Path):
    root = tagged_dataset(tmp_path)
    save(Image.new("RGB", (64, 32)), root / "4_extra" / "x.png")
    data = TrainingData(section(root, resolution=128, repeats=2), batch_size=3, seed=7)
    assert data.num_samples == 12 * 2 + 4
    epoch0 = data.batches_for_epoch(0)
    assert epoch0 == TrainingData(
        section(root, resolution=128, repeats=2), batch_size=3, seed=7
    ).batches_for_epoch(0)
    assert epoch0 != data.batches_for_epoch(1)
    assert sorted(i for batch in epoch0 for i in batch) == list(range(data.num_samples))
    assert len(epoch0) == data.batches_per_epoch
    for batch in epoch0:
        assert 1 <= len(batch) <= 3 and len({data.bucket_of(i) for i in batch}) == 1
    assert len(data.bucket_counts()) >= 3


def test_load_batch_gives_pixels_captions_and_conditioning(tmp_path: Path):
    data = TrainingData(section(tagged_dataset(tmp_path), resolution=128, shuffle_tags=True), batch_size=2)
    indices = data.batches_for_epoch(0)[0]
    batch = data.load_batch(indices, epoch=0)
    width, height = data.bucket_of(indices[0])
    assert batch.pixels.shape == (len(indices), 3, height, width) and batch.latents is None
    assert batch.embeds is None and len(batch.captions) == len(batch.paths) == len(indices)
    assert all(c.target_size == (height, width) for c in batch.conditioning)
    assert all(caption.startswith("tag") for caption in batch.captions)
    assert data.load_batch(indices, epoch=0).captions == batch.captions  # same on resume
    captions = lambda epoch: [data.caption_for(i, epoch) for i in range(data.num_samples)]  # noqa: E731
    assert captions(0) == captions(0) and captions(0) != captions(1)
    for caption, record in zip(captions(3), data.records, strict=True):
        assert caption.split(", ")[0] == record.caption.split(", ")[0]  # keep_tokens=1


def test_bucketing_off_gives_square_crops(tmp_path: Path):
    data = TrainingData(
        section(tagged_dataset(tmp_path, 4), resolution=72, bucketing=False), size_multiple=16
    )
    assert data.buckets == [(64, 64)]
    assert data.load_batch([1], 0).pixels.shape == (1, 3, 64, 64)


def test_prefetched_batches_are_the_cursors_across_epochs(tmp_path: Path):
    """dataset.num_workers threads load ahead; what the loop gets is exactly what it would load itself, in order,
    across an epoch boundary and from a resumed position."""
    from lora_gui.engine.data_cursor import BatchPrefetcher, DataCursor

    data = TrainingData(section(tagged_dataset(tmp_path, 6), num_workers=2, shuffle_tags=True), batch_size=2, seed=3)
    sequential = DataCursor(data, epoch=1, batch_index=1)
    prefetcher = BatchPrefetcher(data, DataCursor(data, epoch=1, batch_index=1), workers=2)
    try:
        for _ in range(7):  # 3 batches per epoch: crosses two epoch boundaries
            indices, epoch = sequential.next()
            expected, batch = data.load_batch(indices, epoch), prefetcher.next()
            assert batch.indices == expected.indices and batch.captions == expected.captions
            assert torch.equal(batch.pixels, expected.pixels)
        assert (prefetcher.cursor.epoch, prefetcher.cursor.batch_index) == (sequential.epoch, sequential.batch_index)
    finally:
        prefetcher.close()


# ----------------------------------------------------------------------------- caches


class CountingEncoder:
    def __init__(self):
        self.calls = 0
        self.items = 0

    def latents(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.items += len(pixels)
        return torch.nn.functional.avg_pool2d(pixels, 8)

    def text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        self.calls += 1
        self.items += len(captions)
        lengths = torch.tensor([[float(len(c))] for c in captions])
        return {"prompt_embeds": lengths.repeat(1, 4).unsqueeze(1), "pooled": lengths}


def test_latent_cache_is_reused_and_keyed_by_content_and_resolution(tmp_path: Path):
    root, cache_dir = tagged_dataset(tmp_path / "data", 5), tmp_path / "cache"
    encoder = CountingEncoder()
    progress: list[tuple[int, int]] = []
    data = TrainingData(section(root, resolution=128), batch_size=2)
    result = data.fill_latent_cache(encoder.latents, cache_dir, "vae-a", lambda d, t: progress.append((d, t)))
    assert result and result.encoded == 5 and encoder.items == 5 and progress[-1] == (5, 5)
    indices = data.batches_for_epoch(0)[0]
    batch = data.load_batch(indices, 0)
    width, height = data.bucket_of(indices[0])
    assert batch.pixels is None and batch.latents.shape == (len(indices), 3, height // 8, width // 8)
    assert not list(cache_dir.rglob("*.tmp"))

    again = CountingEncoder()
    result = TrainingData(section(root, resolution=128)).fill_latent_cache(again.latents, cache_dir, "vae-a")
    assert again.calls == 0 and result.reused == 5

    save(Image.new("RGB", (64, 64), (1, 2, 3)), root / "img00.png")  # same size, new bytes
    TrainingData(section(root, resolution=128)).fill_latent_cache(again.latents, cache_dir, "vae-a")
    assert again.items == 1
    TrainingData(section(root, resolution=96)).fill_latent_cache(again.latents, cache_dir, "vae-a")
    assert again.items == 1 + 5
    TrainingData(section(root, resolution=128)).fill_latent_cache(again.latents, cache_dir, "vae-b")
    assert again.items == 1 + 5 + 5


def test_text_cache_covers_every_caption_variant(tmp_path: Path):
    root, cache_dir = tagged_dataset(tmp_path / "data", 4), tmp_path / "cache"
    encoder = CountingEncoder()
    data = TrainingData(section(root, caption_dropout=0.5), batch_size=2, seed=1)
    assert data.fill_text_cache(encoder.text, cache_dir, "te-a").encoded == 5  # 4 captions + the empty one
    batches = data.batches_for_epoch(0)
    batch = data.load_batch(batches[0], 0)
    assert batch.embeds["prompt_embeds"].shape == (len(batch), 1, 4) and batch.embeds["pooled"].shape == (
        len(batch),
        1,
    )
    for caption, pooled in zip(batch.captions, batch.embeds["pooled"], strict=True):
        assert pooled.item() == len(caption)

    again = CountingEncoder()
    assert TrainingData(section(root, caption_dropout=0.5)).fill_text_cache(again.text, cache_dir, "te-a")
    assert again.calls == 0

    shuffled = TrainingData(section(root, shuffle_tags=True))
    result = shuffled.fill_text_cache(again.text, cache_dir, "te-a")
    assert not result and "shuffle_tags" in result.reason and again.calls == 0
    assert shuffled.load_batch([0], 0).embeds is None


def test_shuffled_captions_a_run_will_use_are_cached(tmp_path: Path):
    """Tag shuffling: the captions of the planned epochs are encoded once, so no step runs the text encoder; a
    cache that would outgrow its budget is given up after the first batch, with the reason."""
    root, cache_dir = tagged_dataset(tmp_path / "data", 4), tmp_path / "cache"
    data = TrainingData(section(root, shuffle_tags=True), batch_size=2)
    planned = sorted({data.caption_for(sample, epoch) for epoch in range(3) for sample in range(data.num_samples)})
    assert len(planned) > data.num_samples  # the shuffles really differ between epochs
    encoder = CountingEncoder()
    assert data.fill_text_cache(encoder.text, cache_dir, "te", planned=planned)
    assert encoder.items == len(planned)
    for epoch in range(3):
        batch = data.load_batch(data.batches_for_epoch(epoch)[0], epoch)
        for caption, pooled in zip(batch.captions, batch.embeds["pooled"], strict=True):
            assert pooled.item() == len(caption)

    small = TrainingData(section(root, shuffle_tags=True), batch_size=2)
    counting = CountingEncoder()
    result = small.fill_text_cache(counting.text, tmp_path / "other", "te", planned=planned, max_bytes=8)
    assert not result and "would take" in result.reason and counting.calls == 1
    assert small.load_batch([0], 0).embeds is None


def test_unreadable_cache_entry_is_rebuilt(tmp_path: Path):
    root, cache_dir = tagged_dataset(tmp_path / "data", 2), tmp_path / "cache"
    TrainingData(section(root)).fill_latent_cache(CountingEncoder().latents, cache_dir, "vae")
    entry = next((cache_dir / "latents").glob("*.safetensors"))
    entry.write_bytes(b"garbage")
    encoder = CountingEncoder()
    TrainingData(section(root)).fill_latent_cache(encoder.latents, cache_dir, "vae")
    assert encoder.items == 1

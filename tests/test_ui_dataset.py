"""Dataset tab: folder confinement, report rendering, uploads, the sample, and a real Gradio server."""

from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image

from lora_gui.data.doctor import check_dataset
from lora_gui.ui import dataset_view as V
from lora_gui.ui.dataset_view import DatasetViewError
from lora_gui.ui.session import AppSession
from lora_gui.ui.workspace import Workspace


@pytest.fixture
def workspace(tmp_path):
    return Workspace.create(tmp_path / "ws")


def image(path, size=(96, 64), color="red"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def messy_dataset(folder):
    """One good image, one zero-byte image, one without caption, one whose caption lacks the trigger."""
    image(folder / "good.png", color="red")
    (folder / "good.txt").write_text("sks, a red thing", encoding="utf-8")
    image(folder / "broken.png").write_bytes(b"")
    image(folder / "nocap.png", (64, 96), "blue")
    image(folder / "notrig.png", (64, 64), "green")
    (folder / "notrig.txt").write_text("a green thing", encoding="utf-8")
    return folder


def test_view_module_does_not_import_gradio():
    code = "import sys, lora_gui.ui.dataset_view; assert 'gradio' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_folders_are_confined_to_datasets_and_outputs(workspace, tmp_path):
    (workspace.datasets / "mine").mkdir()
    assert V.resolve_dataset(workspace, "datasets/mine") == workspace.datasets / "mine"
    assert V.resolve_dataset(workspace, " mine ") == workspace.datasets / "mine"  # bare names mean datasets/
    assert V.resolve_dataset(workspace, str(workspace.datasets / "mine")) == workspace.datasets / "mine"
    (tmp_path / "outside").mkdir()
    (workspace.datasets / "link").symlink_to(tmp_path / "outside")
    for value, problem in [("", "Choose a dataset folder"), (None, "Choose"), (["x"], "Choose"),
                           ("../../etc", "outside the workspace"), ("/etc", "outside the workspace"),
                           ("datasets/link", "outside the workspace"), (".", "not under datasets"),
                           ("configs", "not under datasets"), ("datasets/missing", "not a folder"),
                           ("a\x00b", "not valid")]:
        with pytest.raises(DatasetViewError, match=problem):
            V.resolve_dataset(workspace, value)


def test_file_browser_selection(workspace):
    picture = image(workspace.datasets / "mine" / "a.png")
    assert V.folder_from_selection(workspace, str(picture)) == picture.parent
    assert V.folder_from_selection(workspace, [str(picture.parent) + "/."]) == picture.parent
    for value in (None, [], [str(picture), str(picture)], 3):
        with pytest.raises(DatasetViewError, match="Pick a folder"):
            V.folder_from_selection(workspace, value)


def test_report_lists_each_problem_next_to_its_file(workspace):
    folder = messy_dataset(workspace.datasets / "messy")
    report = check_dataset(folder, trigger="sks", resolution=64)
    rows = V.report_rows(report)
    assert [row[0] for row in rows] == ["broken.png", "nocap.png", "notrig.png", "good.png"]  # errors first
    by_file = {row[0]: row for row in rows}
    assert by_file["broken.png"][1] == "✗ error" and "empty_file" in by_file["broken.png"][4]
    assert "caption_missing" in by_file["nocap.png"][4] and "trigger_missing" not in by_file["nocap.png"][4]
    assert "trigger_missing" in by_file["notrig.png"][4] and by_file["notrig.png"][1] == "⚠ warning"
    assert by_file["good.png"][1:] == ["✓ ok", "96x64", "64x64", ""]
    assert len(V.report_rows(report, limit=2)) == 2

    text = V.summary_markdown(report)
    assert text.startswith("### ✓ Ready to train: 3 of 4 images")
    assert "**Images:** 4: 1 ok, 2 with warnings, 1 with errors" in text
    assert "**Trigger 'sks':** in 1 of 3 usable images \\(33%\\)" in text
    assert "**Buckets at resolution 64:** 64x64: 3" in text
    assert "caption\\_missing \\(1\\)" in text  # problems counted, escaped for Markdown
    assert V.bucket_rows(report) == [{"bucket": "1.00 · 64x64", "images": 3}]
    (workspace.datasets / "none").mkdir()
    empty = V.summary_markdown(check_dataset(workspace.datasets / "none"))
    assert empty.startswith("### ✗ Not ready") and "No images found" in empty


def test_gallery_shows_captions_and_placeholders(workspace, monkeypatch):
    folder = messy_dataset(workspace.datasets / "messy")
    cache = V.ThumbnailCache()
    items, note = V.gallery_items(folder, cache)
    labels = [label for _, label in items]
    assert labels == ["broken.png: (no caption)", "good.png: sks, a red thing", "nocap.png: (no caption)",
                      "notrig.png: a green thing"]
    assert note == "4 image(s)." and items[0][0].size == (V.THUMB_SIDE, V.THUMB_SIDE)  # gray placeholder
    assert max(items[1][0].size) <= V.THUMB_SIDE
    report = check_dataset(folder, trigger="sks", resolution=64)
    checked, _ = V.gallery_items(folder, cache, report, progress=lambda done, total: None)
    assert checked[0][1] == "✗ broken.png: (no caption)" and checked[1][0] is items[1][0]  # cached thumbnail
    small = check_dataset(folder, resolution=512)  # every image too small: an error, its caption still shown
    assert V.gallery_items(folder, cache, small)[0][1][1] == "✗ good.png: sks, a red thing"
    monkeypatch.setattr(V, "MAX_GALLERY", 2)
    assert V.gallery_items(folder, cache)[1] == "4 image(s) (the first 2 of 4)."


def test_file_names_are_cleaned():
    assert V.clean_file_name("../x.png") == "x.png"
    assert V.clean_file_name("..\\..\\Y.JPG") == "Y.jpg"
    assert V.clean_file_name("my photo (1).jpeg") == "my photo -1.jpeg"
    assert V.clean_file_name("写真.webp") == "写真.webp"
    for bad in ("a.exe", ".png", "...txt", "x.png.sh", "noext", "../"):
        assert V.clean_file_name(bad) is None


def test_uploads_are_validated_and_never_overwrite(workspace, tmp_path):
    uploads = tmp_path / "uploads"
    good = image(uploads / "one" / "a.png")
    caption = uploads / "two" / "a.txt"
    caption.parent.mkdir()
    caption.write_text("sks, a", encoding="utf-8")
    fake = uploads / "fake.png"
    fake.write_text("not an image")
    weird = image(uploads / "..\\..\\evil.png")  # a file literally named with backslashes
    script = uploads / "run.sh"
    script.write_text("echo hi")
    elsewhere = image(tmp_path / "secret.png")
    files = [str(p) for p in (good, caption, fake, weird, script, elsewhere)]
    result = V.save_uploads(workspace, "../../My Set", files, source_root=uploads)
    assert result.folder == workspace.datasets / "My-Set" and not result.added_to_existing
    assert sorted(result.saved) == ["a.png", "a.txt", "evil.png"]
    assert sorted(p.name for p in result.folder.iterdir()) == ["a.png", "a.txt", "evil.png"]
    reasons = " ".join(result.skipped)
    assert "fake.png (not a readable image)" in reasons and "run.sh (not an image or caption" in reasons
    assert "secret.png (not uploaded through this page)" in reasons
    assert "Copied 3 file(s) into `datasets/My-Set`" in result.message(workspace)

    caption.write_text("changed", encoding="utf-8")
    again = V.save_uploads(workspace, "My-Set", [str(caption)], source_root=uploads)
    assert again.added_to_existing and again.saved == [] and "already exists" in again.skipped[0]
    assert (result.folder / "a.txt").read_text(encoding="utf-8") == "sks, a"  # not overwritten

    nothing = V.save_uploads(workspace, "empty-one", [str(fake)], source_root=uploads)
    assert nothing.saved == [] and not (workspace.datasets / "empty-one").exists()
    for name, files, problem in [("", [str(good)], "Enter a name"), ("../..", [str(good)], "Enter a name"),
                                 (None, [str(good)], "Enter a name"), ("x", [], "Choose the images"),
                                 ("x", None, "Choose the images"), ("x", [3], "Choose the images")]:
        with pytest.raises(DatasetViewError, match=problem):
            V.save_uploads(workspace, name, files, source_root=uploads)


def test_sample_is_created_next_to_existing_ones(workspace):
    folder, word, message = V.create_sample(workspace, "  ")
    assert folder == workspace.datasets / "sample" and word == "sks" and "datasets/sample" in message
    assert len(list(folder.glob("*.png"))) == 12
    report = check_dataset(folder, trigger=word, resolution=512)
    assert report.ready and report.summary["counts"]["ok"] == 12  # made large enough for resolution 512
    second, word, message = V.create_sample(workspace, "ohwx")
    assert second.name == "sample-2" and word == "ohwx" and "already exists" in message
    assert (second / "shape-01.txt").read_text(encoding="utf-8").startswith("ohwx, ")
    with pytest.raises(DatasetViewError, match="trigger"):
        V.create_sample(workspace, "a, b")


def test_check_inputs():
    assert V.check_inputs(" sks ", 512) == ("sks", 512)
    assert V.check_inputs(None, "768") == (None, 768)
    assert V.check_inputs("", 1024.0) == (None, 1024)
    for trigger, resolution, problem in [("sks", 63, "Resolution"), ("sks", 512.5, "Resolution"),
                                         ("sks", float("nan"), "Resolution"), ("sks", None, "Resolution"),
                                         ("sks", "big", "Resolution"), ("x" * 101, 512, "trigger"),
                                         (5, 512, "trigger")]:
        with pytest.raises(DatasetViewError, match=problem):
            V.check_inputs(trigger, resolution)


def test_tab_through_a_real_server(workspace, tmp_path):
    import gradio as gr
    from gradio_client import Client, handle_file

    from lora_gui.ui.tabs import dataset

    session = AppSession(workspace=workspace)
    with gr.Blocks() as demo:
        tab = dataset.build(session)
    assert isinstance(tab.folder, gr.Textbox) and isinstance(tab.trigger, gr.Textbox)
    demo.queue()
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True,
                            allowed_paths=workspace.allowed_paths())
    try:
        client = Client(url, verbose=False)
        folder, trigger, choices, _, message, gallery, summary, plot, table = client.predict(
            "", 512, api_name="/dataset_create_sample")
        assert folder == "datasets/sample" and trigger == "sks" and choices["value"] == "datasets/sample"
        assert "Created the sample dataset" in message and len(gallery) == 12
        assert gallery[0]["caption"] == "✓ shape-01.png: sks, an orange circle on a teal background"
        assert summary.startswith("### ✓ Ready to train: 12 of 12") and len(table["data"]) == 12
        assert plot["data"] == [["0.78 · 448x576", 4], ["1.00 · 512x512", 4], ["1.29 · 576x448", 4]]

        result = client.predict("datasets/sample", "sks", 64, api_name="/dataset_check")
        assert "64x64: 12" in result[6]
        result = client.predict("../../etc", "sks", 512, api_name="/dataset_check")
        assert result[4].startswith("⚠") and "outside the workspace" in result[4]
        result = client.predict("datasets/sample", "sks", 99999, api_name="/dataset_check")  # ours, not a toast
        assert "Resolution must be a whole number from 64 to 4096" in result[4]

        picture = image(tmp_path / "pic.png")
        result = client.predict("mine", [handle_file(str(picture))], "sks", 64, api_name="/dataset_upload")
        assert result[0] == "datasets/mine" and "Copied 1 file(s)" in result[4]
        assert (workspace.datasets / "mine" / "pic.png").is_file()
        assert "caption_missing" in result[8]["data"][0][4]
        result = client.predict("sample", None, api_name="/dataset_show")  # typed: shown before checking
        assert result[4] == "`datasets/sample`: 12 image(s)." and len(result[5]) == 12
        assert result[6].startswith("Click **Check dataset**") and result[8]["data"] == []
    finally:
        demo.close()


def test_a_typed_path_under_datasets_is_not_looked_up_twice(tmp_path):
    from lora_gui.ui import dataset_view as V
    from lora_gui.ui.workspace import Workspace

    workspace = Workspace.create(tmp_path / "ws")
    (workspace.datasets / "cats").mkdir()
    assert V.resolve_dataset(workspace, "cats") == workspace.datasets / "cats"
    assert V.resolve_dataset(workspace, "datasets/cats") == workspace.datasets / "cats"
    with pytest.raises(V.DatasetViewError, match=r"^datasets/does-not-exist is not a folder"):
        V.resolve_dataset(workspace, "datasets/does-not-exist")

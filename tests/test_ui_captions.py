"""Captions tab: captioning through the handler, the inline editor, bulk edits with undo, a real server."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
from helpers import make_dataset
from tiny_captioners import build_tiny_blip

from lora_gui.captioning import CaptionProgress, CaptionSummary
from lora_gui.data.scan import read_caption
from lora_gui.ui import caption_bulk_view as B
from lora_gui.ui import caption_editor as E
from lora_gui.ui import captions_view as V
from lora_gui.ui.captions_view import CaptionsError
from lora_gui.ui.session import AppSession
from lora_gui.ui.workspace import Workspace

FOLDER = "datasets/shapes"


@pytest.fixture
def workspace(tmp_path):
    return Workspace.create(tmp_path / "ws")


@pytest.fixture
def dataset(workspace):
    return make_dataset(workspace.datasets / "shapes")  # img0..img5.png, captions "sks, ..."


@pytest.fixture
def session(workspace):
    return AppSession(workspace=workspace)


def form(**values):
    base = {"captioner": "template", "model": "", "template": V.DEFAULT_TEMPLATE, "threshold": 0.35,
            "trigger": "sks", "prefix": "", "suffix": "", "mode": "skip_existing", "max_length": 0, "batch_size": 0}
    return {**base, **values}


def captions(folder):
    return {path.stem: read_caption(path) for path in sorted(folder.glob("*.txt"))}


def test_view_module_does_not_import_gradio():
    code = ("import sys, lora_gui.ui.captions_view as v, lora_gui.ui.caption_common, lora_gui.ui.caption_editor, "
            "lora_gui.ui.caption_bulk_view; v.captioner_choices(); assert 'gradio' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------- captioning


def test_template_captioning_writes_the_trigger_once_and_skips_existing(session, dataset):
    for index in range(3):
        (dataset / f"img{index}.txt").unlink()
    events = []
    message = V.CaptionJob(session).run(FOLDER, form(), events.append, poll=0.01)
    assert message.startswith("✓ Wrote 3 caption(s) for 6 image(s); left 3 existing caption(s)")
    texts = captions(dataset)
    assert [texts[f"img{i}"] for i in range(3)] == ["photo of sks"] * 3  # "{trigger}" already holds it: not added
    assert texts["img3"] == "sks, a yellow triangle"  # skip-existing left it alone
    assert any(isinstance(event, CaptionProgress) for event in events)
    assert not session.busy_lock.locked()

    V.CaptionJob(session).run(FOLDER, form(mode="overwrite", template="{folder}", prefix="pre", suffix="end"))
    assert captions(dataset)["img4"] == "sks, pre, shapes, end"


def test_real_captioner_through_the_handler(session, dataset, workspace):
    build_tiny_blip(workspace.root / "models" / "tiny-blip")
    message = V.CaptionJob(session).run(FOLDER, form(captioner="blip", model="models/tiny-blip", mode="overwrite",
                                                     batch_size=4, max_length=60))
    assert message.startswith("✓ Wrote 6 caption(s)"), message
    for text in captions(dataset).values():
        assert text.startswith("sks, ") and text.count("sks") == 1 and len(text) <= 60


def test_offline_hub_model_gives_the_engines_message(session, dataset):
    with pytest.raises(CaptionsError, match="Could not reach the Hugging Face Hub") as caught:
        V.CaptionJob(session).run(FOLDER, form(captioner="florence2", model="", mode="overwrite"))
    assert "Traceback" not in str(caught.value)
    assert not session.busy_lock.locked()


def test_models_must_be_in_the_workspace_or_hub_ids(workspace, tmp_path):
    (workspace.root / "models" / "mine").mkdir(parents=True)
    assert V.resolve_model(workspace, "blip", "models/mine") == str(workspace.root / "models" / "mine")
    assert V.resolve_model(workspace, "blip", " Salesforce/blip-image-captioning-base ") == \
        "Salesforce/blip-image-captioning-base"
    assert V.resolve_model(workspace, "blip", "") is None
    assert V.resolve_model(workspace, "template", "anything") is None  # no model: the box is hidden
    (tmp_path / "elsewhere").mkdir()
    for value, problem in [(str(tmp_path / "elsewhere"), "outside the workspace"), ("../x", "outside the workspace"),
                           ("no/such/folder", "neither a folder"), ("a b/c", "neither a folder"), (3, "must be text")]:
        with pytest.raises((CaptionsError, ValueError), match=problem):
            V.resolve_model(workspace, "blip", value)


@pytest.mark.parametrize("key, value, problem", [
    ("captioner", "rm -rf", "Choose a captioner"), ("mode", "delete", "existing captions"),
    ("max_length", -1, "from 0"), ("batch_size", "8", "number"), ("batch_size", 2.5, "whole number"),
    ("max_length", True, "number"), ("trigger", "x" * 2000, "at most"), ("template", "{nope}", "does not know"), ("trigger", "", "type the trigger word first"),
])
def test_form_values_are_checked(workspace, key, value, problem):
    with pytest.raises(CaptionsError, match=problem):
        V.build_job(workspace, form(**{key: value}))


def test_wd14_threshold_is_checked(workspace):
    captioner, _ = V.build_job(workspace, form(captioner="wd14", threshold=0.5))
    assert captioner.threshold == 0.5
    with pytest.raises(CaptionsError, match="threshold must be a number from 0.01"):
        V.build_job(workspace, form(captioner="wd14", threshold=7))


def test_busy_lock_and_training_refusals(session, dataset):
    job = V.CaptionJob(session)
    with session.busy_lock, pytest.raises(CaptionsError, match="Another captioning job"):
        job.run(FOLDER, form())
    session.runner = SimpleNamespace(is_active=True)
    with pytest.raises(CaptionsError, match="training run is using the GPU"):
        job.run(FOLDER, form(captioner="blip"))
    assert job.run(FOLDER, form(mode="overwrite")).startswith("✓")  # the template needs no GPU
    with pytest.raises(CaptionsError, match="not under datasets"):
        job.run("configs", form())


def test_stop_ends_the_run_between_batches(session, dataset, monkeypatch):
    def slow_caption(root, captioner, options, progress, stop_flag):
        deadline = time.monotonic() + 10
        while not stop_flag() and time.monotonic() < deadline:
            time.sleep(0.01)
        return CaptionSummary(images=6, stopped=True)

    monkeypatch.setattr(V, "caption_dataset", slow_caption)
    job, result = V.CaptionJob(session), {}
    assert job.request_stop() == "Nothing is being captioned."
    worker = threading.Thread(target=lambda: result.update(text=job.run(FOLDER, form(), poll=0.01)))
    worker.start()
    while job.folder is None:
        time.sleep(0.01)
    with pytest.raises(CaptionsError, match="Captioning is writing to this folder"):
        job.check_idle(dataset)
    assert job.request_stop().startswith("Stopping after the current batch")
    worker.join(10)
    assert "Stopped early" in result["text"] and not session.busy_lock.locked() and job.folder is None


# ---------------------------------------------------------------------------- the editor


def test_editor_saves_edits_atomically_and_refuses_stale_ones(dataset):
    (dataset / "img5.txt").unlink()
    rows, loaded, note = E.editor_rows(dataset)
    assert rows[0] == ["img0.png", "sks, a red square on white"] and rows[5] == ["img5.png", ""]
    assert note.startswith("6 image(s)")
    rows[0][1], rows[5][1] = "sks, a red square\r\n", "sks, orange dots"
    (dataset / "img1.txt").write_text("changed elsewhere", encoding="utf-8")
    rows[1][1] = "my edit"
    edits = E.table_edits(rows, loaded)
    assert set(edits) == {"img0.png", "img1.png", "img5.png"}
    result = E.save_edits(dataset, edits, loaded)
    assert result.message().startswith("✓ Saved 2 caption(s).") and "`img1.png` changed on disk" in result.message()
    rows, loaded = E.merge_saved(rows, loaded, result)
    assert rows[0] == ["img0.png", "sks, a red square"] and rows[1] == ["img1.png", "my edit"]  # kept, unsaved
    assert loaded["img0.png"] == "sks, a red square" and loaded["img1.png"] == "sks, a blue circle"
    assert E.table_edits(rows, loaded) == {"img1.png": "my edit"}
    texts = captions(dataset)
    assert texts["img0"] == "sks, a red square" and texts["img5"] == "sks, orange dots"
    assert texts["img1"] == "changed elsewhere"
    assert not [p for p in dataset.iterdir() if p.name.endswith(".tmp")]


def test_editor_refuses_paths_outside_the_dataset(dataset, workspace, tmp_path):
    _, loaded, _ = E.editor_rows(dataset)
    (tmp_path / "outside.png").write_bytes((dataset / "img0.png").read_bytes())
    (dataset / "link.png").symlink_to(tmp_path / "outside.png")
    (workspace.datasets / "other.png").write_bytes((dataset / "img0.png").read_bytes())
    for name in ["../other.png", str(tmp_path / "outside.png"), "link.png", "img0.txt", ".undo.png", "", None]:
        with pytest.raises(CaptionsError):
            E.save_edits(dataset, {name: "x"}, {**loaded, name: ""})
        with pytest.raises(CaptionsError):
            E.preview_image(dataset, name)
    with pytest.raises(CaptionsError, match="not in the table as loaded"):
        E.save_edits(dataset, {"img0.png": "x"}, {})
    with pytest.raises(CaptionsError, match="could not be read"):
        E.table_edits([["img0.png"]], loaded)
    with pytest.raises(CaptionsError, match="outside the workspace"):
        V.resolve_folder(workspace, "../../etc")
    assert not (workspace.datasets / "other.txt").exists() and E.preview_image(dataset, "img0.png").size == (64, 64)


def test_symlinked_caption_outside_is_neither_read_nor_written(dataset, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("secret", encoding="utf-8")
    (dataset / "img0.txt").unlink()
    (dataset / "img0.txt").symlink_to(secret)
    rows, loaded, note = E.editor_rows(dataset)
    assert "img0.png" not in loaded and "secret" not in str(rows)  # left out, and the note says why
    assert "Left out 1 link(s) that lead outside the dataset folder: `img0.txt`" in note
    with pytest.raises(CaptionsError, match="outside the dataset folder"):
        E.save_edits(dataset, {"img0.png": "x"}, {**loaded, "img0.png": ""})  # a forged table row
    assert secret.read_text() == "secret"


# ---------------------------------------------------------------------------- bulk edits


def bulk(**values):
    return {"operation": "replace", "find": "", "replace": "", "regex": False, "case_sensitive": True, "tag": "",
            "position": "end", "trigger": "", **values}


def test_bulk_preview_apply_undo(dataset):
    before = captions(dataset)
    pending = B.preview_bulk(dataset, bulk(find="sks", replace="ohwx"))
    rows, message = B.preview_rows(pending)
    assert rows[0] == ["img0.txt", "sks, a red square on white", "ohwx, a red square on white"]
    assert "changes 6 caption file(s)" in message and captions(dataset) == before  # nothing written
    assert B.apply_bulk(pending, dataset).startswith("✓ Applied `replace 'sks' with 'ohwx'` to 6")
    assert captions(dataset)["img1"] == "ohwx, a blue circle"
    assert "Last bulk edit here" in B.last_edit_note(dataset)
    assert B.undo_bulk(dataset) == "↩ Undid `replace 'sks' with 'ohwx'`: restored 6 caption file(s)."
    assert captions(dataset) == before and B.last_edit_note(dataset).startswith("No bulk edit")
    with pytest.raises(CaptionsError, match="Nothing to undo"):
        B.undo_bulk(dataset)


def test_bulk_tags_trigger_and_refusals(dataset, workspace):
    (dataset / "img5.txt").unlink()
    pending = B.preview_bulk(dataset, bulk(operation="add_tag", tag="solo", position="start"))
    assert len(pending.changes) == 6 and B.preview_rows(pending)[0][5][1] == "(no caption file yet)"
    assert B.preview_bulk(dataset, bulk(operation="remove_tag", tag="SKS")).changes[0].after == "a red square on white"
    assert len(B.preview_bulk(dataset, bulk(operation="trigger", trigger="sks")).changes) == 1
    with pytest.raises(CaptionsError, match="not a valid regular expression"):
        B.preview_bulk(dataset, bulk(find="(unclosed", regex=True))
    for values, problem in [(bulk(operation="drop"), "Choose a bulk edit"), (bulk(), "Type the text to find"),
                            (bulk(operation="add_tag"), "Type the tag")]:
        with pytest.raises(CaptionsError, match=problem):
            B.preview_bulk(dataset, values)
    with pytest.raises(CaptionsError, match="Press Preview first"):
        B.apply_bulk(None, dataset)
    (workspace.datasets / "other").mkdir()
    with pytest.raises(CaptionsError, match="folder changed since the preview"):
        B.apply_bulk(pending, workspace.datasets / "other")
    (dataset / "img1.txt").write_text("edited meanwhile", encoding="utf-8")
    with pytest.raises(CaptionsError, match="changed since the preview"):
        B.apply_bulk(pending, dataset)


# ---------------------------------------------------------------------------- a real server


def test_tab_through_a_real_server(session, dataset, workspace):
    import gradio as gr
    from gradio_client import Client

    from lora_gui.ui.tabs import captions
    from lora_gui.ui.tabs import dataset as dataset_tab

    with gr.Blocks() as demo:
        tab = dataset_tab.build(session)
        captions.build(session, tab)
    demo.queue()
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True,
                            allowed_paths=workspace.allowed_paths())
    try:
        client = Client(url, verbose=False)
        table, note, folder_note, _ = client.predict(FOLDER, api_name="/captions_load")
        assert client.predict(api_name="/captions_stop") == "Nothing is being captioned."
        assert table["data"][0] == ["img0.png", "sks, a red square on white"] and note.startswith("6 image(s)")
        assert "datasets/shapes" in folder_note
        (dataset / "img2.txt").unlink()
        result = client.predict(FOLDER, "template", "", "{trigger}, {folder}", 0.35, "sks", "", "", "skip_existing",
                                0, 0, api_name="/captions_run")
        assert result[-1].startswith("✓ Wrote 1 caption(s)") and read_caption(dataset / "img2.txt") == "sks, shapes"
        preview = client.predict(FOLDER, "sks", "replace", "sks", "ohwx", False, True, "", "end",
                                 api_name="/captions_bulk_preview")
        assert len(preview[0]["data"]) == 6 and read_caption(dataset / "img0.txt").startswith("sks")
        applied = client.predict(FOLDER, api_name="/captions_bulk_apply")
        assert "Applied" in applied[3] and read_caption(dataset / "img0.txt").startswith("ohwx")
        table = {"headers": ["File", "Caption"], "data": [["img1.png", "ohwx, edited"]]}
        saved = client.predict(FOLDER, table, api_name="/captions_save")
        assert saved[1] == "✓ Saved 1 caption(s)." and read_caption(dataset / "img1.txt") == "ohwx, edited"
        forged = {"headers": ["File", "Caption"], "data": [["../../configs/x.png", "x"]]}
        assert "not in the table as loaded" in client.predict(FOLDER, forged, api_name="/captions_save")[1]
        result = client.predict("../..", api_name="/captions_load")
        assert result[1].startswith("⚠") and "outside the workspace" in result[1]
    finally:
        demo.close()

"""Bulk caption edits: previews write nothing, apply is undoable, undo refuses to lose later edits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_captioners import make_images

from lora_gui.captioning.bulk import (
    UNDO_FILE,
    BulkEditError,
    Change,
    apply_changes,
    last_edit,
    preview_add_tag,
    preview_find_replace,
    preview_prepend_trigger,
    preview_remove_tag,
    undo_last,
)
from lora_gui.data.scan import read_caption

CAPTIONS = {
    "a": "a photo of a Cat, sitting, red sofa",
    "b": "sks, dog, red ball",
    "c": "",  # an empty caption file
}


@pytest.fixture
def dataset(tmp_path) -> Path:
    folder = tmp_path / "data"
    make_images(folder, {f"{name}.png": (200, 30, 30) for name in [*CAPTIONS, "d"]})  # d.png has no caption
    for name, text in CAPTIONS.items():
        (folder / f"{name}.txt").write_text(text, encoding="utf-8")
    return folder


def _texts(folder: Path) -> dict[str, str | None]:
    return {name: read_caption(folder / f"{name}.txt") if (folder / f"{name}.txt").exists() else None
            for name in "abcd"}


def _summary(changes: list[Change]) -> dict[str, str]:
    return {change.path.stem: change.after for change in changes}


def test_previews_write_nothing(dataset):
    before = _texts(dataset)
    preview_find_replace(dataset, "red", "blue")
    preview_add_tag(dataset, "outdoors")
    preview_remove_tag(dataset, "dog")
    preview_prepend_trigger(dataset, "sks")
    assert _texts(dataset) == before
    assert not (dataset / UNDO_FILE).exists()


def test_find_replace_plain_case_and_regex(dataset):
    assert _summary(preview_find_replace(dataset, "red", "blue")) == {
        "a": "a photo of a Cat, sitting, blue sofa", "b": "sks, dog, blue ball"}
    assert _summary(preview_find_replace(dataset, "cat", "dog")) == {}
    assert _summary(preview_find_replace(dataset, "cat", "dog", case_sensitive=False)) == {
        "a": "a photo of a dog, sitting, red sofa"}
    assert _summary(preview_find_replace(dataset, r"red (\w+)", r"\1 (red)", regex=True)) == {
        "a": "a photo of a Cat, sitting, sofa (red)", "b": "sks, dog, ball (red)"}
    assert _summary(preview_find_replace(dataset, "a.", "X")) == {}  # plain text: the dot is a dot
    assert _summary(preview_find_replace(dataset, "sitting,", "")) == {"a": "a photo of a Cat, red sofa"}
    change = preview_find_replace(dataset, "dog", "cat")[0]
    assert (change.before, change.created) == ("sks, dog, red ball", False)


def test_find_replace_errors(dataset):
    with pytest.raises(BulkEditError, match="not a valid regular expression .*turn regex off"):
        preview_find_replace(dataset, "red (", "x", regex=True)
    with pytest.raises(BulkEditError, match="replacement"):
        preview_find_replace(dataset, "red", r"\2", regex=True)
    with pytest.raises(BulkEditError, match="Type the text to find"):
        preview_find_replace(dataset, "", "x")
    with pytest.raises(BulkEditError, match="not a folder"):
        preview_find_replace(dataset / "missing", "a", "b")


def test_add_and_remove_tags(dataset):
    assert _summary(preview_add_tag(dataset, "Dog, outdoors")) == {
        "a": "a photo of a Cat, sitting, red sofa, Dog, outdoors", "b": "sks, dog, red ball, outdoors",
        "c": "Dog, outdoors", "d": "Dog, outdoors"}
    at_start = preview_add_tag(dataset, "outdoors", position="start")
    assert _summary(at_start)["b"] == "outdoors, sks, dog, red ball"
    assert [c.created for c in at_start] == [False, False, False, True]
    assert _summary(preview_remove_tag(dataset, "SITTING, dog")) == {
        "a": "a photo of a Cat, red sofa", "b": "sks, red ball"}
    assert _summary(preview_remove_tag(dataset, "red")) == {}  # only whole tags
    with pytest.raises(BulkEditError, match="Type the tag"):
        preview_add_tag(dataset, " , ")
    with pytest.raises(BulkEditError, match="'start' or 'end'"):
        preview_add_tag(dataset, "x", position="middle")


def test_prepend_trigger_where_missing(dataset):
    assert _summary(preview_prepend_trigger(dataset, "SKS")) == {
        "a": "SKS, a photo of a Cat, sitting, red sofa", "c": "SKS", "d": "SKS"}
    with pytest.raises(BulkEditError, match="trigger"):
        preview_prepend_trigger(dataset, "  ")


def test_apply_then_undo_restores_everything(dataset):
    before = _texts(dataset)
    record = apply_changes(preview_prepend_trigger(dataset, "sks"), dataset, "prepend trigger sks")
    assert record.files == 3 and record.path == dataset / UNDO_FILE
    assert _texts(dataset) == {"a": "sks, a photo of a Cat, sitting, red sofa", "b": "sks, dog, red ball",
                               "c": "sks", "d": "sks"}
    assert last_edit(dataset).description == "prepend trigger sks"

    undone = undo_last(dataset)
    assert undone.files == 3 and _texts(dataset) == before  # d.txt, created by the edit, is gone again
    assert last_edit(dataset) is None
    with pytest.raises(BulkEditError, match="Nothing to undo"):
        undo_last(dataset)


def test_only_the_last_edit_is_undone(dataset):
    apply_changes(preview_find_replace(dataset, "red", "blue"), dataset)
    apply_changes(preview_add_tag(dataset, "outdoors"), dataset)
    undo_last(dataset)
    assert _texts(dataset)["b"] == "sks, dog, blue ball"


def test_undo_refuses_when_a_caption_changed_since(dataset):
    apply_changes(preview_find_replace(dataset, "red", "blue"), dataset)
    (dataset / "b.txt").write_text("edited by hand", encoding="utf-8")
    with pytest.raises(BulkEditError, match=r"1 caption file\(s\) were edited after it \(b.txt\)"):
        undo_last(dataset)
    assert read_caption(dataset / "a.txt") == "a photo of a Cat, sitting, blue sofa"  # nothing was undone


def test_apply_refuses_a_stale_preview(dataset):
    changes = preview_find_replace(dataset, "red", "blue")
    (dataset / "a.txt").write_text("changed meanwhile", encoding="utf-8")
    with pytest.raises(BulkEditError, match=r"changed since the preview \(a.txt\)"):
        apply_changes(changes, dataset)
    assert read_caption(dataset / "b.txt") == "sks, dog, red ball"
    with pytest.raises(BulkEditError, match="Nothing to apply"):
        apply_changes([], dataset)


def test_half_applied_edit_can_still_be_undone(dataset):
    changes = preview_find_replace(dataset, "red", "blue")
    apply_changes(changes, dataset)
    (dataset / "b.txt").write_text("sks, dog, red ball", encoding="utf-8")  # as if the run died before b.txt
    undo_last(dataset)
    assert _texts(dataset)["a"] == CAPTIONS["a"] and _texts(dataset)["b"] == CAPTIONS["b"]


def test_undo_file_cannot_reach_outside_the_dataset(dataset, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("secret", encoding="utf-8")
    record = {"version": 1, "description": "tampered", "time": 0,
              "files": [{"path": "../outside.txt", "before": "x", "after": "secret", "created": False}]}
    (dataset / UNDO_FILE).write_text(json.dumps(record), encoding="utf-8")
    with pytest.raises(BulkEditError, match="outside the dataset folder"):
        undo_last(dataset)
    assert outside.read_text(encoding="utf-8") == "secret"
    (dataset / UNDO_FILE).write_text("{not json", encoding="utf-8")
    with pytest.raises(BulkEditError, match="cannot be read"):
        undo_last(dataset)


def test_edits_keep_non_ascii_and_read_other_encodings(dataset):
    (dataset / "a.txt").write_bytes("\ufeffcafé, naïve\r\n".encode())
    (dataset / "b.txt").write_bytes("crème brûlée".encode("cp1252"))
    apply_changes(preview_add_tag(dataset, "日本"), dataset)
    assert read_caption(dataset / "a.txt") == "café, naïve, 日本"
    assert (dataset / "b.txt").read_text(encoding="utf-8") == "crème brûlée, 日本"
    undo_last(dataset)
    assert read_caption(dataset / "b.txt") == "crème brûlée"


def test_catastrophic_regex_times_out_with_a_message(tmp_path):
    from lora_gui.captioning.bulk import BulkEditError, preview_find_replace

    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "a.txt").write_text("a" * 60 + "!", encoding="utf-8")
    with pytest.raises(BulkEditError, match="takes too long"):
        preview_find_replace(tmp_path, "(a|aa)+$", "x", regex=True)

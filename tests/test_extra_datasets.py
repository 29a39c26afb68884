"""Dataset folders outside the workspace (``lora-gui --datasets DIR``): listed, shown, checked and trained on,
never written to, and held back from --share and --listen unless the launch says otherwise."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from app_server import serving
from helpers import make_dataset, tiny_config

from lora_gui.ui import forms
from lora_gui.ui.app import offered_datasets, parse_args
from lora_gui.ui.session import AppSession
from lora_gui.ui.workspace import NotAFolder, OutsideWorkspace, Workspace


def files_of(folder: Path) -> dict:
    return {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in folder.rglob("*") if path.is_file()}


@pytest.fixture
def library(tmp_path):
    """A workspace, and a picture library outside it with two datasets (one in a subfolder) and a folder link."""
    outside = tmp_path / "pictures"
    make_dataset(outside / "portraits")
    make_dataset(outside / "styles" / "ink")
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / "secret.txt").write_text("secret", encoding="utf-8")
    (outside / "escape").symlink_to(tmp_path / "private", target_is_directory=True)
    workspace = Workspace.create(tmp_path / "ws", (str(outside), str(outside / "portraits")))
    make_dataset(workspace.datasets / "local")
    return workspace, outside


def test_extra_folders_are_listed_and_resolved_but_nothing_else_outside_is(library, tmp_path):
    workspace, outside = library
    portraits = outside / "portraits"
    assert workspace.list_datasets() == ["datasets/local", str(portraits), str(outside / "styles")]
    assert workspace.resolve_dataset(str(portraits)) == portraits.resolve()
    assert workspace.read_only(portraits) and not workspace.read_only(workspace.datasets / "local")
    assert workspace.dataset_root(portraits) == outside.resolve()
    assert str(outside) in workspace.allowed_paths()
    with pytest.raises(OutsideWorkspace, match="extra dataset folders given at launch"):
        workspace.resolve_dataset(str(outside / "escape"))  # a link out of the extra folder
    with pytest.raises(OutsideWorkspace):
        workspace.resolve(str(portraits))  # outputs, caches and configs stay in the workspace
    assert forms.confined_path("dataset.dir", str(portraits), workspace) == portraits.resolve()
    with pytest.raises(Exception, match="output.dir: .*outside the workspace"):
        forms.confined_path("output.dir", str(portraits), workspace)
    with pytest.raises(NotAFolder, match="--datasets .*is not a folder"):
        Workspace.create(tmp_path / "ws2", (str(tmp_path / "missing"),))


def test_the_app_shows_and_checks_an_extra_dataset_and_refuses_to_write_its_captions(library):
    from gradio_client import Client

    from lora_gui.ui.tabs import captions, dataset

    workspace, outside = library
    portraits = outside / "portraits"
    before = files_of(outside)
    session = AppSession(workspace=workspace)

    def build():
        captions.build(session, dataset.build(session))

    with serving(build, allowed_paths=workspace.allowed_paths()) as url:
        client = Client(url, verbose=False)
        shown = client.predict(str(portraits), api_name="/dataset_pick")
        assert shown[0] == str(portraits.resolve()) and "6 image(s)" in shown[4] and len(shown[5]) == 6
        assert "secret" not in str(shown)
        table, _, folder_note, _ = client.predict(str(portraits), api_name="/captions_load")
        assert len(table["data"]) == 6 and "extra dataset folder" in folder_note and "refused" in folder_note
        forged = {"headers": ["File", "Caption"], "data": [["img0.png", "changed?"]]}
        saved = client.predict(str(portraits), forged, api_name="/captions_save")
        assert "only reads" in saved[-1] and "copy the folder into" in saved[-1]
        run = client.predict(str(portraits), "template", "", "{trigger}, {folder}", 0.35, "sks", "", "", "overwrite",
                             0, 0, api_name="/captions_run")
        assert "only reads" in run[-1]
        undone = client.predict(str(portraits), api_name="/captions_bulk_undo")
        assert "only reads" in str(undone)
        escaped = client.predict(str(outside / "escape"), None, api_name="/dataset_show")
        assert "outside the workspace" in escaped[4] and "secret" not in str(escaped)
    assert files_of(outside) == before


def test_a_run_trains_on_an_extra_dataset_and_writes_only_into_the_workspace(library):
    workspace, outside = library
    portraits = outside / "portraits"
    before = files_of(outside)
    session = AppSession(workspace=workspace)
    config = tiny_config("sd15", portraits, workspace.outputs / "from-library", "train.max_steps=2")
    from lora_gui.ui.run_start import confine_paths

    session.runner.start(confine_paths(workspace, config))
    deadline = time.monotonic() + 240
    while session.runner.is_active and time.monotonic() < deadline:
        session.runner.wait(1)
    snap = session.runner.snapshot()
    assert snap.state == "finished", snap.log[-5:]  # confined to the workspace, the scan would find no image
    assert (workspace.outputs / "from-library" / "test-lora.safetensors").is_file()
    assert files_of(outside) == before


def test_extra_folders_are_held_back_from_share_and_listen_unless_the_launch_allows_them():
    local = parse_args(["--datasets", "/a", "--datasets", "/b"])
    assert offered_datasets(local) == (["/a", "/b"], None)
    shared, note = offered_datasets(parse_args(["--share", "--datasets", "/a"]))
    assert shared == [] and "--share" in note and "--remote-datasets" in note
    listening, note = offered_datasets(parse_args(["--listen", "--datasets", "/a"]))
    assert listening == [] and "--listen" in note
    assert offered_datasets(parse_args(["--share", "--remote-datasets", "--datasets", "/a"])) == (["/a"], None)

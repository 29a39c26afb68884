"""Hostile calls against the real app process: forged uploads, oversized uploads, hostile configs.

A share link or ``--listen`` lets anyone call any handler with any value, so these post raw requests
to the app's HTTP API, the way a script would, not through the page.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from app_server import call, running_app

pytestmark = pytest.mark.slow

SECRET = "server-secret-7f3a"


def forged(path: Path) -> dict:
    """A FileData naming a file on the server that no client uploaded."""
    return {"path": str(path), "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}


def upload(url: str, name: str, content: bytes) -> tuple[int, list[str]]:
    """A real upload, as the browser sends one; returns the status and the server-side paths."""
    boundary = "lora-gui-test-boundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    body = head + content + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"{url}gradio_api/upload", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, []


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    secrets = root / "outside"
    secrets.mkdir()
    (secrets / "notes.txt").write_text(SECRET)
    (secrets / "private.toml").write_text(f'[output]\nname = "{SECRET}"\n')
    with running_app(root / "ws", root / "app.log") as url:
        yield url, root / "ws", secrets, root / "app.log"


def test_forged_file_paths_are_not_copied_or_read(app):
    url, workspace, secrets, _ = app
    answer = call(url, "dataset_upload", ["stolen", [forged(secrets / "notes.txt")], "", 512])
    assert SECRET not in answer
    assert not list(workspace.joinpath("datasets").rglob("notes.txt"))
    answer = call(url, "load_upload", [forged(secrets / "private.toml")])
    assert SECRET not in answer
    through_upload_folder = forged(Path("/tmp/gradio/../") / secrets.relative_to("/") / "private.toml")
    assert SECRET not in call(url, "load_upload", [through_upload_folder])


def test_uploads_over_the_limit_are_refused(app):
    from lora_gui.ui.app import MAX_UPLOAD_BYTES

    url, *_ = app
    assert upload(url, "small.png", b"\0" * 1000)[0] == 200
    assert upload(url, "huge.png", b"\0" * (MAX_UPLOAD_BYTES + 1))[0] == 413


def test_hostile_config_uploads_get_a_message(app):
    url, _, _, log = app
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefg", "bcdefgh", strict=True))
    cases = {"bomb.yaml": (bomb.encode(), "aliases"), "garbage.toml": (bytes(range(256)) * 4, "not a text file"),
             "bool.toml": (b"[lora]\nrank = true\n", "expected a number"),
             "big.json": (b" " * 1_000_001 + b"{}", "larger than")}
    logged_before = len(log.read_text())
    for name, (content, expected) in cases.items():
        status, paths = upload(url, name, content)
        assert status == 200, name
        answer = call(url, "load_upload", [forged(Path(paths[0]))])
        assert "event: complete" in answer and expected in answer, (name, answer[:500])
    assert "Traceback" not in log.read_text()[logged_before:]


def test_clearing_the_config_upload_is_not_an_error(app):
    url, _, _, log = app
    logged_before = len(log.read_text())
    answer = call(url, "load_upload", [None])
    assert "event: complete" in answer, answer[:500]
    assert "Traceback" not in log.read_text()[logged_before:]

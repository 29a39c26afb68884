"""Launch options of the app: binding, passwords, share links, the workspace."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.error
import urllib.parse
import urllib.request

import pytest
from app_server import running_app

from lora_gui.ui.app import parse_args, resolve_auth


def test_share_without_auth_generates_a_password():
    user, password = resolve_auth(parse_args(["--share"]))
    assert user and len(password) >= 12
    assert resolve_auth(parse_args(["--share"]))[1] != password  # a new one each launch


def test_auth_is_parsed_and_validated():
    assert resolve_auth(parse_args(["--auth", "me:a:b"])) == ("me", "a:b")
    assert resolve_auth(parse_args([])) is None
    with pytest.raises(SystemExit, match="USER:PASS"):
        resolve_auth(parse_args(["--auth", "nopassword"]))


def post(url: str, data: dict) -> tuple[int, str]:
    request = urllib.request.Request(url, data=urllib.parse.urlencode(data).encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.mark.slow
def test_app_binds_localhost_and_requires_the_password(tmp_path):
    with running_app(tmp_path / "ws", tmp_path / "app.log", "--auth", "me:secret-pass") as url:
        port = urllib.parse.urlparse(url).port
        listening = subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout
        assert f"127.0.0.1:{port}" in listening and f"0.0.0.0:{port}" not in listening
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url + "config", timeout=10)
        assert err.value.code == 401
        assert post(url + "login", {"username": "me", "password": "wrong"})[0] == 400
        status, body = post(url + "login", {"username": "me", "password": "secret-pass"})
        assert status == 200 and json.loads(body)["success"]
    for folder in ("datasets", "outputs", "cache", "configs"):
        assert (tmp_path / "ws" / folder).is_dir()


def fetch_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.slow
def test_browser_can_fetch_only_workspace_outputs_and_datasets(tmp_path):
    workspace = tmp_path / "ws"
    (workspace / "configs").mkdir(parents=True)
    (workspace / "configs" / "private.toml").write_text("[model]\n")
    (workspace / "outputs" / "run").mkdir(parents=True)
    (workspace / "outputs" / "run" / "note.txt").write_text("hello")
    (workspace / "datasets" / "d").mkdir(parents=True)
    (workspace / "datasets" / "d" / "a.txt").write_text("caption")
    with running_app(workspace, tmp_path / "app.log") as url:
        file_url = url + "gradio_api/file="
        assert fetch_status(file_url + str(workspace / "outputs" / "run" / "note.txt")) == 200
        assert fetch_status(file_url + str(workspace / "datasets" / "d" / "a.txt")) == 200
        for forbidden in ("/etc/passwd", str(workspace / "configs" / "private.toml"),
                          str(workspace / "outputs" / ".." / "configs" / "private.toml")):
            assert fetch_status(file_url + forbidden) in (403, 404), forbidden


@pytest.mark.slow
def test_about_panel_names_the_versions(tmp_path):
    from lora_gui.versions import installed_version

    with running_app(tmp_path / "ws", tmp_path / "app.log") as url:
        with urllib.request.urlopen(url + "config", timeout=30) as response:
            config = json.loads(response.read())
    values = {c["props"].get("elem_id"): c["props"].get("value") for c in config["components"]}
    about = values["about-versions"]
    for name in ("lora-gui", "torch", "diffusers", "transformers", "peft", "gradio"):
        assert re.search(rf"^{name} \S", about, re.MULTILINE), f"{name} missing from the About panel"
    assert f"transformers {installed_version('transformers')}" in about
    assert values["version-footer"].startswith(f"lora-gui {installed_version('lora-gui')} · torch ")


def test_a_busy_port_is_named_with_the_option_to_change_it(tmp_path):
    import socket
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, str(root / "app.py"), "--port", str(port), "--no-browser",
                               "--workspace", str(tmp_path / "ws")], capture_output=True, text=True, timeout=120,
                              cwd=root)
    assert done.returncode == 1
    assert f"port {port} is in use" in done.stderr and f"--port {port + 1}" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout and "GRADIO_SERVER_PORT" not in done.stderr


def test_the_page_is_built_without_the_model_libraries(tmp_path):
    """diffusers, transformers and peft take seconds to import: the page does not need them, so they load
    when a model does. torch is needed for the GPU check, except on a machine with no GPU driver (as here)."""
    import sys

    from lora_gui.versions import no_gpu_driver

    expected = "[]" if no_gpu_driver() else None

    script = (
        "import sys\n"
        "from lora_gui.ui.app import build_app\n"
        "from lora_gui.ui.session import AppSession\n"
        "from lora_gui.ui.workspace import Workspace\n"
        f"build_app(AppSession(workspace=Workspace.create({str(tmp_path / 'ws')!r})))\n"
        "print(sorted(name for name in ('diffusers', 'transformers', 'peft', 'bitsandbytes', 'optimum.quanto')"
        " if name in sys.modules))\n"
        "print(sorted(name for name in ('torch',) if name in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    model_libraries, torch = done.stdout.strip().splitlines()[-2:]
    assert model_libraries == "[]", done.stdout
    if expected is not None:
        assert torch == expected, "torch was imported to build the page on a machine without a GPU driver"


def test_the_torch_build_read_from_its_version_file_is_the_imported_one():
    import torch

    from lora_gui.versions import _torch_version_file

    written = _torch_version_file()
    assert written["__version__"] == torch.__version__ and written["cuda"] == torch.version.cuda

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


HOSTILE_NUMBERS = (-1e9, 1e300, "12abc", [7], None)
NUMERIC_COMPONENTS = {"Number", "Slider", "Checkednumber", "Checkedslider"}
FILE_COMPONENTS = {"File", "Image", "Gallery", "Files", "UploadButton"}


def endpoints_with(url: str, components: set[str]) -> dict[str, list[dict]]:
    """Every named endpoint with one of ``components`` among its parameters, from the app's API description."""
    with urllib.request.urlopen(f"{url}gradio_api/info", timeout=60) as response:
        info = json.loads(response.read())
    return {name.lstrip("/"): endpoint["parameters"] for name, endpoint in info["named_endpoints"].items()
            if any(parameter.get("component") in components for parameter in endpoint["parameters"])}


def numeric_endpoints(url: str) -> dict[str, list[dict]]:
    return endpoints_with(url, NUMERIC_COMPONENTS)


def assert_every_handler_answers(url: str, log: Path, endpoints: dict[str, list[dict]], components: set[str],
                                 values) -> None:
    """Each value in every parameter of ``components`` (the others get what the page would send): no error
    event, and nothing logged as a traceback."""
    logged_before = len(log.read_text())
    for name, parameters in endpoints.items():
        for hostile in values:
            data = [hostile if parameter.get("component") in components else usual_value(parameter)
                    for parameter in parameters]
            answer = call(url, name, data)
            assert "event: error" not in answer, (name, hostile, answer[:600])
    logged = log.read_text()[logged_before:]
    assert "Traceback" not in logged, logged[-4000:]


def usual_value(parameter: dict):
    """A value the page itself would send: the component's value on the page, else the API's example (files
    get none: their examples are web links)."""
    if parameter.get("component") in FILE_COMPONENTS:
        return None
    if parameter.get("parameter_has_default"):
        return parameter.get("parameter_default")
    return parameter.get("example_input")


def test_every_numeric_field_of_every_handler_answers_hostile_values_with_a_message(app):
    """A value out of range, not a number, or missing, in every number and slider of every endpoint (the
    other parameters get the values the page would send): the handler answers (no error event, which the page
    shows as a toast naming no field and an "Error" badge on every output) and nothing is logged as a
    traceback."""
    url, _, _, log = app
    endpoints = numeric_endpoints(url)
    assert {"config_refresh", "config_save", "train_start", "test_render", "dataset_check"} <= set(endpoints)
    assert_every_handler_answers(url, log, endpoints, NUMERIC_COMPONENTS, HOSTILE_NUMBERS)


def test_a_value_out_of_range_is_named_with_its_range(app):
    url, *_ = app
    endpoints = numeric_endpoints(url)

    def answer(endpoint: str, label: str, value) -> str:
        parameters = endpoints[endpoint]
        assert any(parameter["label"] == label for parameter in parameters), (endpoint, label)
        return call(url, endpoint, [value if parameter["label"] == label else usual_value(parameter)
                                    for parameter in parameters])

    refreshed = answer("config_refresh", "Learning rate", -0.001)
    assert "train.learning_rate" in refreshed and "greater than 0" in refreshed, refreshed[:800]
    started = answer("train_start", "Learning rate", -0.001)
    assert started.count("train.learning_rate") == 1, started[:800]  # one message, not a toast and a message
    assert "from 64 to 4096" in answer("dataset_check", "Resolution", 7)


HOSTILE_CHOICES = ("../../etc", "no such choice", 7, ["x", 3], None, {"a": 1})
CHOICE_COMPONENTS = {"Dropdown", "Radio", "Checkboxgroup", "Checkeddropdown", "Checkedradio", "Checkedcheckboxgroup"}


def test_every_choice_field_of_every_handler_answers_foreign_values_with_a_message(app):
    """A value that is not among a dropdown's, radio's or checkbox group's choices, not a string, or missing
    (a share link can send anything): the handler answers, no error event, no traceback in the log."""
    url, _, _, log = app
    endpoints = endpoints_with(url, CHOICE_COMPONENTS)
    assert {"dataset_pick", "train_pick_run", "train_resume", "test_render", "queue_remove"} <= set(endpoints)
    assert_every_handler_answers(url, log, endpoints, CHOICE_COMPONENTS, HOSTILE_CHOICES)

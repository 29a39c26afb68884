"""Hostile workspaces and launches: links leading outside, open --listen, long values, password guessing.

Real files and real symlinks on disk, real Gradio servers called over HTTP the way a script would (a
share link or --listen lets anyone call any handler with any value). No assertion depends on timing:
the login throttle runs on a fake clock whose sleeps are recorded.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from app_server import call, running_app, serving
from PIL import Image

from lora_gui.cli_dataset import main as dataset_cli
from lora_gui.data.doctor import check_dataset
from lora_gui.data.scan import confined_to, find_image_files, outside_links
from lora_gui.ui import app as A
from lora_gui.ui import caption_bulk_view as B
from lora_gui.ui import caption_editor as E
from lora_gui.ui import captions_view as C
from lora_gui.ui import dataset_view as V
from lora_gui.ui import login as L
from lora_gui.ui.session import AppSession
from lora_gui.ui.workspace import BadPath, Workspace, clip

SECRET = "outside-secret-5c1e"


def picture(path: Path, color: str = "red") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (512, 512), color).save(path)  # usable at resolution 512: its caption is read
    return path


@pytest.fixture
def hostile(tmp_path):
    """A workspace whose datasets hold links to a folder outside it, next to ordinary files."""
    outside = tmp_path / "outside"
    (outside / "caps").mkdir(parents=True)
    (outside / "secret.txt").write_text(SECRET, encoding="utf-8")
    picture(outside / "secret.png", "blue")
    picture(outside / "pics" / "p.png", "green")
    (outside / "pics" / "p.txt").write_text(SECRET, encoding="utf-8")
    (outside / "undo.json").write_text(json.dumps({"version": 1, "description": SECRET, "files": []}))
    workspace = Workspace.create(tmp_path / "ws")
    ds = workspace.datasets / "ds"
    picture(ds / "good.png")
    (ds / "good.txt").write_text("sks, a good caption", encoding="utf-8")
    picture(ds / "a.png")
    (ds / "a.txt").symlink_to(outside / "secret.txt")  # a caption that is a link to an outside file
    (ds / "b.png").symlink_to(outside / "secret.png")  # an image that is a link
    (ds / "b.txt").write_text("sks, the linked image", encoding="utf-8")
    (ds / "sub").symlink_to(outside / "pics", target_is_directory=True)  # a folder that is a link
    (ds / "notes.txt").symlink_to(outside / "secret.txt")
    (workspace.datasets / "link_etc").symlink_to(outside, target_is_directory=True)  # a dataset that is a link
    layout = workspace.datasets / "layout"
    picture(layout / "images" / "x.png")
    (layout / "captions").symlink_to(outside / "caps", target_is_directory=True)  # images/ + captions/ layout
    return SimpleNamespace(workspace=workspace, outside=outside, ds=ds, layout=layout)


def names(files, root: Path) -> list[str]:
    return sorted(file.path.relative_to(root).as_posix() for file in files)


def result(stream: str) -> list:
    """The outputs of a completed call."""
    assert "event: complete" in stream, stream[:2000]
    return json.loads(stream.split("event: complete\ndata:", 1)[1].strip().splitlines()[0])


def post_json(url: str, body: dict) -> object:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


# ---------------------------------------------------------------------------- A: links leading outside


def test_cli_follows_links_but_a_confined_scan_leaves_them_out(hostile, capsys):
    ds, root = hostile.ds, hostile.workspace.root
    assert names(find_image_files(ds), ds) == ["a.png", "b.png", "good.png"]  # the CLI: links work
    assert SECRET in [file.caption for file in check_dataset(ds).files]
    assert dataset_cli(["dataset", "check", str(ds), "--json"]) == 0
    checked = json.loads(capsys.readouterr().out)["files"]
    assert sorted(file["path"] for file in checked if file["status"] != "error") == ["a.png", "b.png", "good.png"]
    assert names(find_image_files(ds, confine=root), ds) == ["good.png"]
    with confined_to(root):  # reaches code that scans by itself, such as the doctor
        assert names(find_image_files(ds), ds) == ["good.png"]
        assert SECRET not in str([(file.caption, file.path) for file in check_dataset(ds).files])
    assert names(find_image_files(ds), ds) == ["a.png", "b.png", "good.png"]  # only inside the block
    left_out = {link.path.name: link.reason for link in outside_links(ds, root)}
    assert set(left_out) == {"a.txt", "b.png", "notes.txt", "sub"}
    assert "a link to a folder outside" in left_out["sub"] and "a link to a file outside" in left_out["a.txt"]
    layout = hostile.layout
    assert names(find_image_files(layout), layout) == ["images/x.png"]
    assert find_image_files(layout, confine=root) == []  # its caption would be written through the link


def test_dataset_tab_neither_shows_nor_lists_outside_files(hostile):
    from lora_gui.ui.tabs import dataset

    workspace = hostile.workspace
    with serving(lambda: dataset.build(AppSession(workspace=workspace)),
                 allowed_paths=workspace.allowed_paths()) as url:
        shown = call(url, "dataset_show", ["datasets/ds", None])
        message, gallery = result(shown)[4], result(shown)[5]
        assert SECRET not in shown and len(gallery) == 1 and gallery[0]["caption"] == "good.png: sks, a good caption"
        assert "Left out 4 link(s) that lead outside the workspace" in message
        assert all(f"`{name}`" in message for name in ("a.txt", "b.png", "notes.txt", "sub"))

        checked = call(url, "dataset_check", ["datasets/ds", "sks", 512])
        message, summary, table = result(checked)[4], result(checked)[6], result(checked)[8]
        assert SECRET not in checked and [row[0] for row in table["data"]] == ["good.png"]
        assert "Left out 4 link(s)" in message and "Left out 4 link(s)" in summary
        assert "Captions without an image" not in summary  # notes.txt and a.txt were left out, not orphans

        for api, data in [("dataset_show", ["datasets/link_etc", None]), ("dataset_check", ["link_etc", "", 512]),
                          ("dataset_browse", [[["link_etc", "secret.txt"]]]), ("dataset_browse", [[["link_etc"]]])]:
            answer = call(url, api, data)
            assert SECRET not in answer and "outside the workspace" in result(answer)[4], (api, data)
        choices = json.dumps(result(call(url, "dataset_refresh", [])))
        assert "datasets/ds" in choices and "link_etc" not in choices and str(hostile.outside) not in choices

        config = json.loads(urllib.request.urlopen(f"{url}config", timeout=30).read())
        explorer = next(c["id"] for c in config["components"] if c["type"] == "fileexplorer")

        def ls(folder):
            body = {"component_id": explorer, "fn_name": "ls", "data": folder, "session_hash": "hostile"}
            return post_json(f"{url}gradio_api/component_server", body)

        assert {entry["name"] for entry in ls(None)} == {"ds", "layout"}
        assert ls(["link_etc"]) == [] and ls(["ds", "sub"]) == [] and ls(["layout", "captions"]) == []
        assert {entry["name"] for entry in ls(["ds"])} == {"good.png", "good.txt", "a.png", "b.txt"}


def test_captions_tab_never_reads_or_writes_through_outside_links(hostile):
    from gradio_client import Client

    from lora_gui.ui.tabs import captions, dataset

    workspace, outside = hostile.workspace, hostile.outside
    session = AppSession(workspace=workspace)

    def build():
        captions.build(session, dataset.build(session))

    before = {path: path.read_bytes() for path in outside.rglob("*") if path.is_file()}
    with serving(build, allowed_paths=workspace.allowed_paths()) as url:
        client = Client(url, verbose=False)
        table, note, _, _ = client.predict("datasets/ds", api_name="/captions_load")
        assert table["data"] == [["good.png", "sks, a good caption"]] and SECRET not in str(table)
        assert "Left out 4 link(s) that lead outside the dataset folder" in note and "`a.txt`" in note
        preview = client.predict("datasets/ds", "sks", "add_tag", "", "", False, True, "solo", "end",
                                 api_name="/captions_bulk_preview")
        assert [row[0] for row in preview[0]["data"]] == ["good.txt"] and SECRET not in str(preview)
        assert "Left out 4 link(s)" in preview[1]
        applied = client.predict("datasets/ds", api_name="/captions_bulk_apply")
        assert "Applied" in applied[3]
        for folder in ("datasets/ds", "datasets/layout"):
            run = client.predict(folder, "template", "", "{trigger}, {folder}", 0.35, "sks", "", "", "overwrite",
                                 0, 0, api_name="/captions_run")
            assert SECRET not in str(run) and "Left out" in run[-1], run[-1]
        forged = {"headers": ["File", "Caption"], "data": [["a.png", "written through the link?"]]}
        saved = client.predict("datasets/ds", forged, api_name="/captions_save")
        assert "not in the table as loaded" in saved[1]
    after = {path: path.read_bytes() for path in outside.rglob("*") if path.is_file()}
    assert after == before  # nothing outside was written or created
    assert (hostile.ds / "a.txt").is_symlink() and (hostile.ds / "good.txt").read_text() == "sks, ds"


def test_caption_views_refuse_outside_links_one_by_one(hostile):
    ds, layout = hostile.ds, hostile.layout
    with pytest.raises(C.CaptionsError, match="outside the dataset folder"):
        E.save_edits(ds, {"a.png": "x"}, {"a.png": ""})  # a forged row for an image left out of the table
    with pytest.raises(C.CaptionsError, match="outside the dataset folder"):
        E.save_edits(layout, {"images/x.png": "x"}, {"images/x.png": ""})
    with pytest.raises(C.CaptionsError):
        E.preview_image(ds, "b.png")
    pending = B.preview_bulk(ds, {"operation": "replace", "find": "o", "replace": "0"})
    assert [change.path.name for change in pending.changes] == ["good.txt"]
    (ds / ".lora-gui-undo.json").symlink_to(hostile.outside / "undo.json")
    note = B.last_edit_note(ds)
    assert "outside the dataset folder" in note and SECRET not in note
    with pytest.raises(C.CaptionsError, match="outside the dataset folder"):
        B.undo_bulk(ds)


# ---------------------------------------------------------------------------- B: --listen without a password


def test_listen_without_auth_is_warned_about():
    warning = A.open_access_warning(A.parse_args(["--listen", "--port", "7999"]), None)
    assert "Anyone who can reach this computer on port 7999" in warning and "--auth user:pass" in warning
    for argv in (["--listen", "--auth", "me:pw"], [], ["--share"], ["--listen", "--share"]):
        args = A.parse_args(argv)
        assert A.open_access_warning(args, A.resolve_auth(args)) is None, argv


@pytest.mark.slow
def test_listen_without_auth_warns_in_the_terminal_and_the_app(tmp_path):
    log = tmp_path / "app.log"
    with running_app(tmp_path / "ws", log, "--listen") as url:
        config = json.loads(urllib.request.urlopen(f"{url}config", timeout=30).read())
        printed = log.read_text()
    notice = next(c["props"]["value"] for c in config["components"]
                  if c["props"].get("elem_id") == "launch-notice")
    assert "No password is set" in notice and "--auth user:pass" in notice
    assert "No password is set" in printed and "--auth user:pass" in printed


# ---------------------------------------------------------------------------- C: Name after a hand-edited folder


def test_the_page_makes_the_same_output_folder_from_a_name_as_the_server():
    """output.dir follows output.name in the page (FOLLOW_NAME_JS): run in Chromium, it gives the folder
    ``name_folder`` gives for hostile names too, and leaves a folder the user typed alone."""
    from app_server import CHROMIUM, CHROMIUM_ARGS

    from lora_gui.ui.tabs.config import FOLLOW_NAME_JS, name_folder

    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium")
    names = ["portrait-style", "cats v2", "  ..hidden..  ", "ünïcode ✨ name", "a/b\\c", "", "...", "x" * 200,
             "../../etc", "semi;colon$(rm)"]
    with sync_api.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            follow = f"([name, folder, follows]) => ({FOLLOW_NAME_JS})(name, folder, follows)"
            for name in names:
                assert page.evaluate(follow, [name, "outputs/old", True]) == [name_folder(name), True], name
            assert page.evaluate(follow, ["cats", "outputs/custom", False]) == ["outputs/custom", False]
            assert page.evaluate(follow, [None, "outputs/x", True]) == ["outputs/my-lora", True]
        finally:
            browser.close()


# ---------------------------------------------------------------------------- D: long values echoed


def test_long_values_are_cut_in_messages(hostile, tmp_path):
    workspace = hostile.workspace
    assert clip("a" * 50) == "a" * 50 and clip("a" * 500) == "a" * 120 + "... (500 characters)"
    assert clip("two\nlines") == "two lines"
    for text in ("x" * 200_000, "x" * 900, "/" + "y" * 300, "a\x00b"):
        for refused in (V.resolve_dataset, V.folder_from_selection,
                        lambda workspace, text: C.resolve_model(workspace, "blip", text[:1000])):
            with pytest.raises(ValueError) as error:
                refused(workspace, text)
            message = str(error.value)
            assert "x" * 121 not in message and "y" * 121 not in message and "\x00" not in message, message[:400]
    with pytest.raises(BadPath, match=r"\.\.\. \(200000 characters\) is not a usable path"):
        workspace.resolve("x" * 200_000)
    with pytest.raises(BadPath, match="NUL"):
        workspace.resolve("a\x00b")
    with pytest.raises(V.DatasetViewError, match=r"\.\.\. \(301 characters\) is outside the workspace"):
        V.resolve_dataset(workspace, "/" + "y" * 300)
    with pytest.raises(C.CaptionsError, match=r"\.\.\. \(900 characters\) is not an image"):
        E.image_path(hostile.ds, "z" * 900)
    pending = B.preview_bulk(hostile.ds, {"operation": "replace", "find": "s" + "q" * 900, "replace": "x"})
    message = B.preview_rows(pending)[1]
    assert "... (903 characters)" in message and "q" * 121 not in message


def test_a_200000_character_folder_is_not_echoed_by_the_server(hostile):
    from lora_gui.ui.tabs import dataset

    workspace = hostile.workspace
    with serving(lambda: dataset.build(AppSession(workspace=workspace))) as url:
        for api, data in [("dataset_show", ["x" * 200_000, None]), ("dataset_check", ["x" * 200_000, "", 512]),
                          ("dataset_browse", [[["y" * 200_000]]]), ("dataset_check", ["z" * 900, "", 512])]:
            answer = call(url, api, data)
            message = result(answer)[4]
            assert len(answer) < 5000 and message.startswith("⚠") and "Unexpected" not in message, message[:300]


# ---------------------------------------------------------------------------- E: password guessing


class FakeTime:
    """A clock that only moves when the guard sleeps; every sleep is recorded."""

    def __init__(self) -> None:
        self.now, self.sleeps = 1000.0, []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def guard_on(fake: FakeTime, **options) -> L.LoginGuard:
    return L.LoginGuard("me", "right-pass", free_failures=3, base_delay=1.0, max_delay=8.0, clock=fake.clock,
                        sleep=fake.sleep, **options)


def attempt(guard: L.LoginGuard, client: str, password: str, user: str = "me") -> bool:
    async def run():
        guard.client.set(client)
        return await guard.check(user, password)

    return asyncio.run(run())


def test_failed_logins_slow_down_that_client_only():
    fake = FakeTime()
    guard = guard_on(fake)
    assert [attempt(guard, "attacker", f"guess{i}") for i in range(3)] == [False] * 3 and fake.sleeps == []
    for _ in range(6):
        assert not attempt(guard, "attacker", "guess")
    assert fake.sleeps == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]  # doubling after 3 free failures, up to max_delay
    assert guard.failures["attacker"][0] == 9
    assert attempt(guard, "user", "right-pass") and fake.sleeps[-1] == 8.0 and len(fake.sleeps) == 6
    assert not attempt(guard, "attacker", "right-pass", user="you")  # both parts must match
    assert attempt(guard, "attacker", "right-pass") and "attacker" not in guard.failures  # waited, then let in
    fake.now += 10_000  # an old failure is forgotten
    guard.failures["old"] = (50, fake.now - 4000)
    assert guard.delay("old") == 0.0


def test_parallel_guesses_from_one_client_are_refused_unchecked(monkeypatch):
    fake = FakeTime()
    guard = guard_on(fake)
    compared = []
    real_compare = L.hmac.compare_digest
    monkeypatch.setattr(L.hmac, "compare_digest", lambda a, b: compared.append(a) or real_compare(a, b))
    for i in range(3):
        attempt(guard, "attacker", f"guess{i}")
    assert len(compared) == 6  # user and password, each in constant time

    async def race():
        release = asyncio.Event()

        async def held_sleep(seconds):
            fake.sleeps.append(seconds)
            await release.wait()

        guard.sleep = held_sleep
        guard.client.set("attacker")
        first = asyncio.create_task(guard.check("me", "guess3"))
        await asyncio.sleep(0)  # the first attempt is now waiting out its delay
        parallel = await guard.check("me", "right-pass")  # refused before the first one ends
        elsewhere = asyncio.create_task(_as_client(guard, "user", "right-pass"))
        other = await elsewhere  # another client is not held up by the waiting attempt
        release.set()
        return parallel, other, await first

    parallel, other, first = asyncio.run(race())
    assert (parallel, other, first) == (False, True, False)
    assert b"right-pass" in compared and compared.count(b"right-pass") == 1  # only the other client's check
    assert guard.failures["attacker"][0] == 4 and not guard.busy


async def _as_client(guard: L.LoginGuard, client: str, password: str) -> bool:
    guard.client.set(client)
    return await guard.check("me", password)


def test_guard_remembers_a_bounded_number_of_clients():
    fake = FakeTime()
    guard = guard_on(fake, max_clients=3)
    for client in ("a", "b", "c", "d"):
        attempt(guard, client, "wrong")
    assert list(guard.failures) == ["b", "c", "d"]


def login(url: str, password: str, forwarded: str | None = None) -> int:
    data = urllib.parse.urlencode({"username": "me", "password": password}).encode()
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{url}login", data=data, headers=headers), timeout=30):
            return 200
    except urllib.error.HTTPError as err:
        return err.code


def test_login_route_is_throttled_per_client(tmp_path):
    import gradio as gr

    fake = FakeTime()
    guard = guard_on(fake)
    options = L.login_options(guard)
    assert "3 wrong passwords" in options["auth_message"]
    with serving(lambda: gr.Markdown("hi"), **options) as url:
        assert [login(url, f"guess{i}") for i in range(4)] == [400] * 4
        assert guard.failures["127.0.0.1"][0] == 4 and fake.sleeps == [1.0]  # the 4th waited
        assert login(url, "guess", forwarded="198.51.100.1, 203.0.113.9") == 400  # a proxy here: its last hop
        assert guard.failures["203.0.113.9"][0] == 1 and "198.51.100.1" not in guard.failures
        assert login(url, "right-pass", forwarded="192.0.2.7") == 200 and fake.sleeps == [1.0]  # not held up
        assert login(url, "right-pass") == 200 and fake.sleeps == [1.0, 2.0]  # waited its turn, then let in
        assert "127.0.0.1" not in guard.failures
    assert L.login_options(None) == {"auth": None}


@pytest.mark.slow
def test_training_from_the_app_leaves_out_links_out_of_the_workspace(tmp_path):
    import time

    from helpers import make_dataset, tiny_config

    workspace = Workspace.create(tmp_path / "ws")
    dataset = make_dataset(workspace.datasets / "cats")
    outside = make_dataset(tmp_path / "outside")
    (dataset / "linked.png").symlink_to(outside / "img0.png")
    (dataset / "linked.txt").symlink_to(outside / "img0.txt")
    session = AppSession(workspace=workspace)
    session.runner.start(tiny_config("sd15", dataset, workspace.outputs / "run", "train.max_steps=1"))
    deadline = time.monotonic() + 120
    while session.runner.is_active and time.monotonic() < deadline:
        time.sleep(0.1)
    log = "\n".join(session.runner.snapshot().log)
    assert session.runner.snapshot().state == "finished", log
    assert "6 images" in log and "7 images" not in log, log

"""Polling the Train tab stays cheap however many browser tabs watch a run (behaviour only, no timings).

The timer's event carries the status line, the memory line and one version string per panel group,
fetched by the browser from a bare route (no Gradio event); the heavy panels (plots, gallery, log, errors/buttons/checkpoints) are fetched by separate events
that the browser fires only when their version string changed. The view is rendered once per change
of the run and shared by every tab. Speed itself is measured by bench/poll_load.py.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import replace

import gradio as gr
import pytest
from test_ui_train import make_workspace

from lora_gui.engine.runner import RunSnapshot, TrainingRunner
from lora_gui.events import Progress, SamplesReady, Status
from lora_gui.ui import run_view
from lora_gui.ui.light_routes import AppBlocks
from lora_gui.ui.login import LoginGuard, login_options
from lora_gui.ui.run_view import PLOT_REFRESH_S, SharedView
from lora_gui.ui.tabs import train


class CountingRunner:
    """A runner whose snapshot the test edits; counts how often the UI copies it."""

    def __init__(self, snapshot: RunSnapshot, output_dir=None) -> None:
        self.snap, self.output_dir, self.is_active = snapshot, output_dir, True
        self.changes, self.copies = 0, 0

    def version(self):
        return self.changes

    def snapshot(self) -> RunSnapshot:
        self.copies += 1
        return replace(self.snap, losses=list(self.snap.losses), samples=list(self.snap.samples),
                       log=list(self.snap.log))

    def change(self, **fields) -> None:
        self.snap = replace(self.snap, **fields)
        self.changes += 1

    def step(self) -> None:
        step = self.snap.step + 1
        self.change(step=step, loss=1 / step, losses=[*self.snap.losses, (step, 1 / step, 1e-4)])


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def live_session(tmp_path):
    session, _ = make_workspace(tmp_path)
    clock = Clock()
    session.train_view = SharedView(clock=clock)
    session.runner = CountingRunner(RunSnapshot(state="running", max_steps=100, status="Training"))
    return session, clock


def groups(session) -> dict[str, str]:
    return dict(zip(run_view.GROUPS, train.poll(session)[2:-1], strict=True))  # the last: the queue's version


def test_runner_version_changes_exactly_when_the_snapshot_does():
    runner = TrainingRunner()
    first = runner.version()
    assert runner.version() == first  # nothing happened
    runner._record(Progress(step=1, max_steps=10, epoch=0, loss=0.5, lr=1e-4, sec_per_step=0.1, eta_seconds=1))
    second = runner.version()
    assert second != first and runner.version() == second
    runner._record(Status(text="Sampling"))
    assert runner.version() != second
    third = runner.version()
    runner._snapshot = RunSnapshot(state="running")  # what start() does for a new run
    assert runner.version() != third


def test_many_tabs_polling_render_once_per_change(tmp_path):
    session, _ = live_session(tmp_path)
    runner = session.runner
    first = [train.poll(session) for _ in range(20)]  # twenty tabs
    assert runner.copies == 1 and all(result == first[0] for result in first)
    runner.step()
    later = [train.poll(session) for _ in range(20)]
    assert runner.copies == 2 and later[0] != first[0] and all(result == later[0] for result in later)
    assert "step 1 / 100" in later[0][0]
    for panel in (train.plots_panel, train.log_panel, train.controls_panel, train.gallery_panel):
        panel(session)  # the change listeners read the same shared view
    assert runner.copies == 2


def test_unchanged_run_sends_the_same_versions_so_no_panel_is_fetched(tmp_path):
    session, _ = live_session(tmp_path)
    before = train.poll(session)
    assert [train.poll(session) for _ in range(3)] == [before] * 3
    session.runner.change()  # a change the panels do not show (the runner's version moved only)
    assert groups(session) == dict(zip(run_view.GROUPS, before[2:-1], strict=True))


def test_each_change_moves_only_its_groups_version(tmp_path):
    session, _ = live_session(tmp_path)
    runner = session.runner
    runner.step()
    start = groups(session)
    loss, _ = train.plots_panel(session)
    assert loss is not None and len(loss["data"]) == 2  # the first point is drawn at once

    runner.change(log=["Caching latents"])
    assert {k for k, v in groups(session).items() if start[k] != v} == {"log"}
    assert train.log_panel(session) == "Caching latents"

    image = SamplesReady(step=1, paths=("a.png", "b.png"), prompts=("p0", "p1"))
    now = groups(session)
    runner.change(samples=[image])
    assert {k for k, v in groups(session).items() if now[k] != v} == {"gallery"}
    gallery = train.gallery_panel(session)
    assert gallery["value"] == [("a.png", "step 1 · p0"), ("b.png", "step 1 · p1")] and gallery["columns"] == 2

    now = groups(session)
    runner.change(state="paused")
    assert {k for k, v in groups(session).items() if now[k] != v} == {"controls"}
    controls = train.controls_panel(session)
    states = {name: update["interactive"] for name, update in zip(train.BUTTONS, controls[5:-1], strict=True)}
    assert states == run_view.button_states("paused")
    assert controls[-1].value == train.POLL_S  # the run is active: poll at the active rate


def test_plots_are_resent_at_most_every_few_seconds_while_training(tmp_path):
    session, clock = live_session(tmp_path)
    runner = session.runner
    runner.step()
    plots = groups(session)["plots"]
    for _ in range(5):  # steps inside the refresh interval: the status shows them, the plots wait
        clock.now += 0.5
        runner.step()
        assert groups(session)["plots"] == plots
        assert "step" in train.poll(session)[0]
    assert len(train.plots_panel(session)[0]["data"]) == 2  # still the first point
    assert f"step {runner.snap.step} / 100" in train.poll(session)[0]

    clock.now += PLOT_REFRESH_S  # due: sent without waiting for another step
    copies = runner.copies
    assert groups(session)["plots"] != plots and runner.copies == copies + 1
    assert len(train.plots_panel(session)[0]["data"]) == 2 * runner.snap.step

    plots = groups(session)["plots"]
    runner.step()
    runner.change(state="finished")  # no longer training: the last steps are drawn at once
    assert groups(session)["plots"] != plots
    assert len(train.plots_panel(session)[0]["data"]) == 2 * runner.snap.step
    assert train.controls_panel(session)[-1].value == train.POLL_S  # is_active is still True in this stub
    runner.is_active = False
    runner.change()
    assert train.controls_panel(session)[-1].value == train.IDLE_POLL_S  # run over: poll slowly


def test_the_timer_event_never_touches_a_heavy_panel(tmp_path):
    session, tab = make_workspace(tmp_path)
    with gr.Blocks() as app:
        for component in tab.components.values():
            component.render()
        train.build(session, tab)
    config = app.get_config_file()
    kinds = {component["id"]: component["type"] for component in config["components"]}
    [poll] = [dep for dep in config["dependencies"] if dep["targets"][0][1] == "tick"]
    assert [kinds[i] for i in poll["outputs"]] == ["markdown", "markdown"] + ["textbox"] * (len(run_view.GROUPS) + 1)
    assert poll["backend_fn"] is False and "lora-gui/train-poll" in poll["js"]  # never reaches Gradio's server
    assert poll["inputs"] == poll["outputs"]  # the current values, kept when a fetch fails
    heavy = {"plots": {"nativeplot"}, "gallery": {"gallery"}, "log": {"textbox"},
             "controls": {"markdown", "column", "accordion", "textbox", "dropdown", "button", "timer"}}
    for trigger, group in zip(poll["outputs"][2:-1], run_view.GROUPS, strict=True):
        listeners = [dep for dep in config["dependencies"] if (trigger, "change") in map(tuple, dep["targets"])]
        assert len(listeners) == 1 and listeners[0]["queue"] is False and listeners[0]["api_name"] == f"train_{group}"
        assert {kinds[i] for i in listeners[0]["outputs"]} <= heavy[group]
    queue_trigger = poll["outputs"][-1]  # the queue's version: its panel is fetched only when it moved
    [listener] = [dep for dep in config["dependencies"] if (queue_trigger, "change") in map(tuple, dep["targets"])]
    assert listener["queue"] is False and listener["api_name"] == "queue_panel"


def test_values_sent_without_postprocessing_are_what_the_components_would_send(tmp_path):
    """The poll and plots events skip Gradio's postprocessing: their values must already be final."""
    session, _ = live_session(tmp_path)
    session.runner.change(status="  Caching latents\n    12/12  ", log=["x"])
    for _ in range(3):
        session.runner.step()
    _, tab = make_workspace(tmp_path / "form")
    with gr.Blocks() as app:
        for component in tab.components.values():
            component.render()
        train.build(session, tab)
    skipped = {fn.api_name for fn in app.fns.values() if fn.api_name and not fn.postprocess}
    assert skipped == {"train_plots"}
    status, memory, *triggers = train.poll(session)
    assert gr.Markdown().postprocess(status) == status and gr.Markdown().postprocess(memory) == memory
    assert all(gr.Textbox().postprocess(trigger) == trigger for trigger in triggers)
    loss, lr = train.plots_panel(session)
    assert gr.LinePlot(x="step", y="loss", color="series").postprocess(loss) is loss
    assert gr.LinePlot(x="step", y="lr").postprocess(lr) is lr


def test_polling_over_http_like_a_browser(tmp_path):
    session, tab = make_workspace(tmp_path)
    session.runner = CountingRunner(RunSnapshot(state="running", max_steps=100, status="Training"),
                                    session.workspace.outputs / "run")
    with AppBlocks() as app:
        for component in tab.components.values():
            component.render()
        app.light_routes += train.build(session, tab)
    _, url, _ = app.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)

    def poll() -> list:  # what the timer's JavaScript fetches
        with urllib.request.urlopen(f"{url}lora-gui/train-poll", timeout=30) as response:
            assert response.headers["Cache-Control"] == "no-store"
            return json.loads(response.read())

    def call(api_name: str, tab_id: str) -> list:
        body = {"data": [], "event_data": None, "fn_index": None, "trigger_id": None, "session_hash": tab_id}
        request = urllib.request.Request(f"{url}gradio_api/run/{api_name}", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())["data"]

    try:
        first = poll()
        assert first == train.poll(session) and poll() == first  # same versions: no fetches
        assert call("train_plots", "tab-a") == [None, None]  # no loss yet: no table
        session.runner.step()
        later = poll()
        assert "step 1 / 100" in later[0] and later[2] != first[2] and later[3:] == first[3:]
        loss, lr = call("train_plots", "tab-b")
        assert loss["data"] == [[1, 1.0, "raw"], [1, 1.0, "smoothed"]] and lr["data"] == [[1, 1e-4]]
        assert session.runner.copies == 2  # two tabs, five calls: one copy per change
    finally:
        app.close()


def test_the_poll_route_wants_the_password_when_one_is_set(tmp_path):
    session, tab = make_workspace(tmp_path)
    with AppBlocks() as app:
        for component in tab.components.values():
            component.render()
        app.light_routes += train.build(session, tab)
    _, url, _ = app.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True,
                           **login_options(LoginGuard("me", "a-long-password")))
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            opener.open(f"{url}lora-gui/train-poll", timeout=30)
        assert refused.value.code == 401 and "Idle" not in refused.value.read().decode()
        form = urllib.parse.urlencode({"username": "me", "password": "wrong"}).encode()
        with pytest.raises(urllib.error.HTTPError):
            opener.open(f"{url}login", form, timeout=30)
        with pytest.raises(urllib.error.HTTPError):
            opener.open(f"{url}lora-gui/train-poll", timeout=30)
        form = urllib.parse.urlencode({"username": "me", "password": "a-long-password"}).encode()
        opener.open(f"{url}login", form, timeout=30).read()
        with opener.open(f"{url}lora-gui/train-poll", timeout=30) as response:
            assert json.loads(response.read()) == train.poll(session)
    finally:
        app.close()

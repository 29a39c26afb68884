"""Train tab: the pure view functions, the handlers' refusals, and a real Gradio server smoke test."""

from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass

import gradio as gr
import pytest
from helpers import make_dataset, tiny_config

from lora_gui.config import TrainingConfig, config_to_dict, deep_merge, validate_config
from lora_gui.engine.runner import RunSnapshot
from lora_gui.events import Failed, SamplesReady
from lora_gui.ui import run_view
from lora_gui.ui.light_routes import AppBlocks
from lora_gui.ui.session import AppSession
from lora_gui.ui.tabs import train
from lora_gui.ui.workspace import Workspace


@dataclass
class FakeConfigTab:
    """The Config tab's contract: components keyed "section.key", to_config(values), inputs()."""

    components: dict
    base: TrainingConfig

    def to_config(self, values: dict) -> TrainingConfig:
        data = config_to_dict(self.base)
        for key, component in self.components.items():
            section, field = key.split(".")
            data = deep_merge(data, {section: {field: values[component]}})
        return validate_config(data)

    def inputs(self) -> set:
        return set(self.components.values())

    def outputs(self) -> list:
        return list(self.components.values())

    def load_file(self, path, label: str) -> tuple[dict, str]:
        from lora_gui.config import build_config

        config = build_config(file=path)
        return ({component: getattr(getattr(config, key.split(".")[0]), key.split(".")[1])
                 for key, component in self.components.items()}, f"Loaded {label}")


def fake_config_tab(base: TrainingConfig) -> FakeConfigTab:
    keys = {"output.dir": gr.Textbox, "dataset.dir": gr.Textbox, "train.max_steps": gr.Number}
    components = {}
    for key, kind in keys.items():
        section, field = key.split(".")
        components[key] = kind(getattr(getattr(base, section), field), label=key, render=False)
    return FakeConfigTab(components, base)


def form_values(tab: FakeConfigTab, **changes) -> dict:
    values = {component: getattr(getattr(tab.base, key.split(".")[0]), key.split(".")[1])
              for key, component in tab.components.items()}
    for key, value in changes.items():
        values[tab.components[key.replace("__", ".")]] = value
    return values


def make_workspace(tmp_path, *overrides: str):
    workspace = Workspace.create(tmp_path / "ws")
    dataset = make_dataset(workspace.datasets / "shapes")
    config = tiny_config("sd15", dataset, workspace.outputs / "run", *overrides)
    config.dataset.dir, config.output.dir = "datasets/shapes", "outputs/run"
    return AppSession(workspace=workspace), fake_config_tab(config)


# ----------------------------------------------------------------------------- pure view functions


def test_button_states_follow_the_run_state():
    assert run_view.button_states("idle") == {
        "start": True, "resume_checkpoint": True, "pause": False, "continue": False, "stop": False,
        "sample": False, "save": False}
    running = run_view.button_states("running")
    assert not running["start"] and running["pause"] and running["stop"] and not running["continue"]
    paused = run_view.button_states("paused")
    assert paused["continue"] and not paused["pause"] and paused["sample"] and paused["save"]
    assert not any(run_view.button_states("stopping").values())
    for state in ("finished", "stopped", "failed"):
        assert run_view.button_states(state)["start"] and not run_view.button_states(state)["stop"]


def test_status_text_and_durations():
    snap = RunSnapshot(state="running", step=12, max_steps=100, epoch=2, loss=0.12345, lr=1e-4,
                       sec_per_step=0.5, eta_seconds=3725, status="Training")
    text = run_view.status_markdown(snap)
    assert "**Running**" in text and "step 12 / 100" in text and "epoch 2" in text
    assert "loss 0.1235" in text and "lr 1.00e-04" in text and "0.50 s/step" in text and "ETA 1h 02m" in text
    assert "Start" in run_view.status_markdown(RunSnapshot())
    assert run_view.format_duration(75) == "1m 15s" and run_view.format_duration(None) == "-"
    assert run_view.memory_text(None).startswith("GPU memory: -")
    assert "3.0 GiB in use" in run_view.memory_text({"allocated_gib": 3, "peak_gib": 4, "total_gib": 24})


def test_smoothed_loss_and_plot_tables():
    assert run_view.smoothed([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # bias-corrected from step 1
    smooth = run_view.smoothed([1.0, 0.0] * 50)
    assert 0.4 < smooth[-1] < 0.6
    losses = [(step, 1.0 / step, 1e-4) for step in range(1, 2001)]
    plot = run_view.loss_plot(losses, limit=100)
    assert plot["columns"] == ["step", "loss", "series"] and plot["mark"] == "line"
    assert plot["datatypes"] == {"step": "quantitative", "loss": "quantitative", "series": "nominal"}
    assert {row[2] for row in plot["data"]} == {"raw", "smoothed"} and len(plot["data"]) <= 2 * 101
    assert max(row[0] for row in plot["data"]) == 2000  # the newest step is always drawn
    lr = run_view.lr_plot(losses[:3])
    assert lr["columns"] == ["step", "lr"] and lr["data"] == [[1, 1e-4], [2, 1e-4], [3, 1e-4]]
    # no finite loss: no table at all, as an empty one would fix the plot's colour legend to nothing
    assert run_view.loss_plot([(1, float("nan"), 1e-4)]) is None and run_view.lr_plot([]) is None


def test_plot_tables_are_what_gradio_makes_of_a_data_frame():
    """The prebuilt tables equal gr.LinePlot's own postprocessing of the equivalent DataFrame."""
    import pandas as pd

    losses = [(step, 2.0 / step, 1e-4 * step) for step in range(1, 50)]
    rows = run_view.loss_rows(losses)
    frame = pd.DataFrame(rows, columns=["step", "loss", "series"]).astype({"series": "object"})
    plot = gr.LinePlot(x="step", y="loss", color="series", render=False)
    ours = run_view.loss_plot(losses)
    assert_same_plot(plot.postprocess(frame).model_dump(), ours)
    assert plot.postprocess(ours) is ours  # sent as it is: no DataFrame per browser
    lr_frame = pd.DataFrame(run_view.lr_rows(losses), columns=["step", "lr"])
    assert_same_plot(gr.LinePlot(x="step", y="lr", render=False).postprocess(lr_frame).model_dump(),
                     run_view.lr_plot(losses))


def assert_same_plot(theirs: dict, ours: dict) -> None:
    """Equal tables, numbers to the 10 decimals pandas keeps (its JSON export rounds them)."""
    assert {k: v for k, v in theirs.items() if k != "data"} == {k: v for k, v in ours.items() if k != "data"}
    assert len(theirs["data"]) == len(ours["data"])
    for mine, other in zip(ours["data"], theirs["data"], strict=True):
        assert len(mine) == len(other)
        for a, b in zip(mine, other, strict=True):
            assert a == b if isinstance(a, str) else a == pytest.approx(b, rel=1e-9, abs=1e-10)


def test_gallery_rows_are_steps_newest_first():
    samples = [SamplesReady(step=5, paths=("a/00.png", "a/01.png"), prompts=("p0", "p1")),
               SamplesReady(step=10, paths=("b/00.png", "b/01.png"), prompts=("p0", "p1"))]
    items = run_view.gallery_items(samples)
    assert items[0] == ("b/00.png", "step 10 · p0") and items[-1] == ("a/01.png", "step 5 · p1")
    assert run_view.gallery_columns(samples) == 2
    assert run_view.log_text([str(i) for i in range(500)]).splitlines()[0] == "300"


def test_next_preset_down_and_the_out_of_memory_message():
    presets = ["sd15-8gb", "sd15-12gb", "sd15-16gb", "sd15-24gb", "sd15-48gb", "flux-24gb", "sd15-cpu-demo"]
    assert run_view.next_preset_down("sd15", 23.6, presets) == "sd15-16gb"  # a 24 GB card
    assert run_view.next_preset_down("sd15", 80.0, presets) == "sd15-24gb"
    assert run_view.next_preset_down("sd15", 8.0, presets) is None
    assert run_view.next_preset_down("flux", 24.0, presets) is None
    assert run_view.next_preset_down("sd15", None, presets) is None
    assert run_view.next_preset_down("sdxl", 12.0) == "sdxl-8gb"  # the real presets folder
    oom = Failed(message="The GPU ran out of memory.", hint="Pick a smaller preset.", details="Traceback ...")
    text = run_view.error_markdown(oom, "sd15", 23.6, presets)
    assert "⚠ The GPU ran out of memory." in text and "`sd15-16gb`" in text and "Traceback" not in text
    other = run_view.error_markdown(Failed(message="dataset.dir is empty.", hint="Set it."), "sd15", 24.0)
    assert "Set it." in other and "preset" not in other


def test_view_keys_change_only_with_content():
    snap = RunSnapshot(state="running", step=1, losses=[(1, 0.5, 1e-4)])
    same = RunSnapshot(state="running", step=1, losses=[(1, 0.5, 1e-4)])
    assert run_view.view_keys(snap) == run_view.view_keys(same)
    later = RunSnapshot(state="running", step=2, losses=[(1, 0.5, 1e-4), (2, 0.4, 1e-4)])
    changed = {k for k, v in run_view.view_keys(later).items() if run_view.view_keys(snap)[k] != v}
    assert changed == {"status", "plots"}


# ----------------------------------------------------------------------------- handlers


def test_start_refusals_say_what_to_do(tmp_path):
    session, tab = make_workspace(tmp_path)
    bad = train.start_run(session, tab, form_values(tab, train__max_steps=0))
    assert bad.startswith("⚠") and "train.max_steps" in bad and "Config tab" in bad
    outside = train.start_run(session, tab, form_values(tab, output__dir=str(tmp_path / "elsewhere")))
    assert "outside the workspace" in outside
    escaped = train.start_run(session, tab, form_values(tab, output__dir="datasets/x"))
    assert "under" in escaped and "outputs" in escaped
    run = session.workspace.outputs / "run"
    run.mkdir()
    (run / "test-lora.safetensors").write_bytes(b"x")
    refused = train.start_run(session, tab, form_values(tab))
    assert "already holds a finished LoRA" in refused and "Overwrite" in refused
    assert not session.runner.is_active
    assert "not a complete checkpoint" in train.resume_run(session, tab, form_values(tab), "outputs/run",
                                                           "outputs/run/../../x")
    assert "not a run folder under outputs" in train.resume_run(session, tab, form_values(tab), "datasets", "x")
    assert train.control(session, "pause").startswith("⚠ Pause is not possible while the run is idle")
    status, memory, *triggers = train.poll(session)
    assert "Idle" in status and memory.startswith("GPU memory") and len(triggers) == len(run_view.GROUPS) + 1  # + the queue
    assert train.poll(session) == [status, memory, *triggers]  # nothing changed: the browser fetches nothing more
    controls = train.controls_panel(session)
    assert controls[5 + train.BUTTONS.index("start")]["interactive"] is True
    assert controls[5 + train.BUTTONS.index("stop")]["interactive"] is False


def write_run(workspace, name: str, steps: list[int], finished: bool = False, config=None):
    """A run folder as training leaves it: config.toml, complete checkpoints, the final LoRA when finished."""
    from lora_gui.config import save_config
    from lora_gui.engine.checkpoint import COMPLETE_MARKER, checkpoints_dir

    folder = workspace.outputs / name
    folder.mkdir(parents=True)
    if config is not None:
        saved = config.model_copy(deep=True)
        saved.output.dir = str(folder)
        save_config(saved, folder / "config.toml")
    for step in steps:
        checkpoint = checkpoints_dir(folder) / f"step-{step:06d}"
        checkpoint.mkdir(parents=True)
        (checkpoint / COMPLETE_MARKER).write_text("ok")
    if finished:
        (folder / "test-lora.safetensors").write_bytes(b"x")
    return folder


def test_runs_are_listed_live_first_then_newest_with_their_state(tmp_path):
    import os

    from lora_gui.ui import runs

    session, tab = make_workspace(tmp_path)
    for age, (name, steps, finished) in enumerate([("done", [10, 20], True), ("halted", [34], False),
                                                   ("empty", [], False), ("live", [], False)]):
        folder = write_run(session.workspace, name, steps, finished, tab.base)
        for path in [*folder.rglob("*"), folder]:  # written in that order, a second apart
            os.utime(path, (1000 - age, 1000 - age))
    session.runner = StubRunner(RunSnapshot(state="paused", step=12), session.workspace.outputs / "live")
    session.runner.is_active = True
    listed = runs.list_runs(session.workspace, session.runner)
    assert [entry.label for entry in listed] == ["outputs/live · paused at step 12", "outputs/done · finished at step 20",
                                                "outputs/halted · stopped at step 34", "outputs/empty · no checkpoints"]
    choices, chosen = train.run_choices(session)
    assert chosen == "outputs/live" and choices[1] == ("outputs/done · finished at step 20", "outputs/done")


def test_picking_a_run_loads_its_config_and_lists_its_checkpoints(tmp_path):
    session, tab = make_workspace(tmp_path)
    run_config = tab.base.model_copy(deep=True)
    run_config.train.max_steps = 80
    write_run(session.workspace, "halted", [17, 34], config=run_config)
    updates, checkpoints, text = train.pick_run(session, tab, "outputs/halted")
    assert updates[tab.components["train.max_steps"]] == 80
    assert updates[tab.components["output.dir"]].endswith("outputs/halted")
    assert checkpoints == [("step 34", "outputs/halted/checkpoints/step-000034"),
                           ("step 17", "outputs/halted/checkpoints/step-000017")]
    assert "Loaded `outputs/halted/config.toml`" in text
    other_form = form_values(tab)  # output.dir still names outputs/run
    refused = train.resume_run(session, tab, other_form, "outputs/halted", checkpoints[0][1])
    assert "not the run `outputs/halted`" in refused and not session.runner.is_active
    _, none, text = train.pick_run(session, tab, "outputs/../../etc")
    assert none == [] and "outside the workspace" in text


class StubRunner:
    """A runner frozen in a failed state with losses and validation images, to drive the real server."""

    def __init__(self, snapshot: RunSnapshot, output_dir) -> None:
        self._snapshot, self.output_dir, self.is_active = snapshot, output_dir, False

    def snapshot(self) -> RunSnapshot:
        return self._snapshot

    def version(self):
        return id(self._snapshot)


def test_gradio_server_smoke(tmp_path):
    from gradio_client import Client
    from PIL import Image

    from lora_gui.ui.tabs import test as test_tab

    session, tab = make_workspace(tmp_path)
    image = session.workspace.outputs / "run" / "samples" / "step-000005" / "00.png"
    image.parent.mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(image)
    oom = Failed(message="The GPU ran out of memory.", hint="Lower the batch size.", details="Traceback: OOM")
    session.runner = StubRunner(RunSnapshot(
        state="failed", step=5, max_steps=10, losses=[(1, 0.5, 1e-4), (2, 0.4, 1e-4)], log=["Error: OOM"],
        samples=[SamplesReady(step=5, paths=(str(image),), prompts=("sks",))], error=oom), image.parents[2])
    with AppBlocks() as app:
        for component in tab.components.values():
            component.render()
        with gr.Tabs():
            with gr.Tab("Train"):
                app.light_routes += train.build(session, tab)
            with gr.Tab("Test"):
                test_tab.build(session, tab)
    app.queue()
    _, url, _ = app.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True,
                           allowed_paths=session.workspace.allowed_paths())
    try:
        with urllib.request.urlopen(url + "config", timeout=10) as response:
            config = json.loads(response.read())
        events = {target[1] for dep in config["dependencies"] for target in dep["targets"]}
        assert {"tick", "click", "select", "input"} <= events
        client = Client(url, verbose=False)
        with urllib.request.urlopen(url + "lora-gui/train-poll", timeout=10) as response:  # the timer's fetch
            status, memory, *triggers = json.loads(response.read())
        assert "Failed" in status and memory.startswith("GPU memory") and len(triggers) == 5
        assert triggers[-1].startswith("queue-")
        queue_status, table, *_ = client.predict(None, api_name="/queue_panel")  # (the accordion is not returned)
        assert "The queue is empty" in queue_status and table["data"] in ([], [["", "", "", ""]])
        assert client.predict("no-such-run", api_name="/queue_remove").startswith("⚠ That run is no longer")
        loss, lr = client.predict(api_name="/train_plots")
        assert len(loss["data"]) == 4 and len(lr["data"]) == 2
        gallery = client.predict(api_name="/train_gallery")
        assert gallery["value"][0]["caption"] == "step 5 · sks"
        assert client.predict(api_name="/train_log") == "Error: OOM"
        error, details, *_, timer = client.predict(api_name="/train_controls")  # no accordion, no buttons
        assert error["visible"] and "The GPU ran out of memory." in error["value"] and details == "Traceback: OOM"
        assert timer["value"] == train.IDLE_POLL_S  # no run active: the timer slows down
        assert client.predict(api_name="/train_pause").startswith("⚠")
    finally:
        app.close()

"""The app on a machine with several GPUs: the Train tab's GPUs choice, a run started on two of them (two
processes, followed and driven like a run on the app's thread), the queue, and the Config tab's effective batch.

This machine has no GPU: the session's GPU facts are set by hand (what ``detect_gpu`` would read from CUDA), and
the runner's launcher, finding no CUDA, starts the processes with torchrun on the CPU (gloo)."""

from __future__ import annotations

import csv
import json
import time
import urllib.request

import pytest
from app_server import serving
from test_ui_train import form_values, make_workspace

from lora_gui.ui import comparison, queue_view
from lora_gui.ui.run_start import StartRefused
from lora_gui.ui.session import GpuInfo
from lora_gui.ui.tabs import config as config_tab_module
from lora_gui.ui.tabs import queue_panel, train

WAIT_S = 300


def with_gpus(session, count: int):
    session.__dict__["gpu"] = GpuInfo("NVIDIA H100 80GB HBM3", 79.1, count)  # no CUDA here: set, not probed
    return session


def test_the_gpus_choice_is_checked_on_the_server(tmp_path):
    session, tab = make_workspace(tmp_path)
    with_gpus(session, 2)
    for value, said in ((3, "not a choice on this machine, which has 2 CUDA GPU(s)"), (0, "not a choice"),
                        ("two", "not a number"), (1.5, "not a choice"), (True, "pick a number"),
                        ([2], "pick a number"), ({"n": 2}, "pick a number"), ("nan", "not a choice")):
        assert said in train.start_run(session, tab, form_values(tab), gpus=value), value
        assert said in queue_panel.add_run(session, tab, form_values(tab), value), value
        assert said in train.resume_run(session, tab, form_values(tab), "outputs/run", "x", value), value
    assert not session.runner.is_active and not session.run_queue.rows()
    one_gpu = make_workspace(tmp_path / "one")[0]
    assert "not a choice on this machine, which has 0 CUDA GPU(s)" in train.start_run(
        one_gpu, tab, form_values(tab), gpus=2)


def test_the_choice_is_shown_only_with_several_gpus(tmp_path):
    import gradio as gr

    for count, shown in ((0, False), (1, False), (4, True)):
        session = with_gpus(make_workspace(tmp_path / str(count))[0], count)

        def build(session=session):
            picker = train.gpu_picker(session)
            gr.Button("x").click(lambda value: value, picker, None)

        with serving(build) as url, urllib.request.urlopen(url + "config", timeout=10) as response:
            components = json.loads(response.read())["components"]
        picker = next(c for c in components if c.get("props", {}).get("elem_id") == "lg-train-gpus")
        assert picker["props"]["visible"] is shown
        assert [choice[1] for choice in picker["props"]["choices"]] == list(range(1, max(count, 1) + 1))


def test_the_config_tab_says_the_effective_batch(tmp_path):
    session, _ = make_workspace(tmp_path)
    form = config_tab_module.initial_values("24 GB")
    form.update({"train.batch_size": 2, "train.gradient_accumulation": 4})
    one = config_tab_module.panel_texts(form, "24 GB", None, session.workspace, None)["validate"]
    assert "**Effective batch:** 2 per GPU × 4 accumulation = 8 samples per step." in one
    several = config_tab_module.panel_texts(form, "24 GB", None, session.workspace,
                                            GpuInfo("NVIDIA H100 80GB HBM3", 79.1, 8))["validate"]
    assert "on 8 GPUs (Train tab → GPUs): 2 × 8 × 4 = 64" in several


def test_a_queued_run_keeps_its_gpus(tmp_path):
    from lora_gui.ui.run_queue import QUEUE_FILE, RunQueue

    session, tab = make_workspace(tmp_path)
    with_gpus(session, 2)
    queue_view.hold_queue(session)
    assert "Added to the queue" in queue_panel.add_run(session, tab, form_values(tab), 2)
    assert session.run_queue.rows()[0].label.endswith("· 2 GPUs")
    restarted = RunQueue(session.workspace.state / QUEUE_FILE, session.runner, session.prepare_queued_run)
    assert restarted._entries[0].processes == 2  # kept in queue.json
    fewer = with_gpus(make_workspace(tmp_path / "fewer")[0], 1)  # the queue file moved to a 1-GPU machine
    with pytest.raises(StartRefused, match="not a choice on this machine"):
        fewer.prepare_queued_run(restarted._entries[0].config, 2)


def wait_for(condition, session, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        snap = session.runner.snapshot()
        assert time.monotonic() < deadline and session.runner.is_active, f"{what}: {snap.state} {snap.log[-5:]}"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_run_on_two_gpus_trains_in_two_processes_driven_from_the_train_tab(tmp_path):
    """Started, paused, sampled, saved, continued and stopped through the Train tab's handlers, as a run on the
    app's thread is; the Test tab says what it cannot do with it."""
    from lora_gui.engine.runner import InOtherProcesses

    session, tab = make_workspace(tmp_path, "train.max_steps=100000", "train.batch_size=1")
    with_gpus(session, 2)
    runner = session.runner
    said = train.start_run(session, tab, form_values(tab, train__max_steps=100000), gpus=2)
    assert said.startswith("Started") and "on 2 GPUs (batch 1 each)" in said, said
    run_dir = session.workspace.outputs / "run"
    try:
        wait_for(lambda: runner.snapshot().step >= 2, session, "two steps")
        assert "2 processes train together: effective batch 1 per process x 2 processes" in "\n".join(
            runner.snapshot().log)
        assert "its weights in memory cannot be tested" in train.control(session, "pause")
        wait_for(lambda: any(line.startswith("Paused at step") for line in runner.snapshot().log), session, "pause")
        paused_at = runner.snapshot().step
        assert comparison.paused_step(session, run_dir) is None  # no "current weights" choice
        assert all(choice.value != comparison.CURRENT
                   for choice in comparison.lora_choices(run_dir, comparison.paused_step(session, run_dir)))
        with pytest.raises(comparison.ComparisonError, match="one GPU"):
            comparison._render_on_active_run(runner, comparison.ComparisonRequest(
                run_dir=run_dir, config=None, loras=(), scales=(1.0,), settings=None), [], [], None)
        with pytest.raises(InOtherProcesses, match="one GPU"):
            runner.submit(lambda family, components: None)
        train.control(session, "sample")
        train.control(session, "save")
        wait_for(lambda: runner.snapshot().samples and runner.snapshot().checkpoints, session, "sample and save")
        snap = runner.snapshot()
        assert snap.state == "paused" and snap.step == paused_at  # no step while paused
        assert snap.samples[-1].step == paused_at and snap.checkpoints[-1].endswith(f"step-{paused_at:06d}")
        train.control(session, "continue")
        wait_for(lambda: runner.snapshot().step > paused_at + 1, session, "steps after continue")
    finally:
        train.control(session, "stop")
        runner.wait(WAIT_S)
    snap = runner.snapshot()
    assert snap.state == "stopped" and snap.error is None and len(snap.checkpoints) == 2, snap.log[-5:]
    assert snap.checkpoints[-1].endswith(f"step-{snap.step:06d}")
    with (run_dir / "metrics.csv").open() as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle)]
    assert steps == list(range(1, snap.step + 1))  # one line per step: one process writes
    assert [loss[0] for loss in snap.losses] == steps  # the plots got every step

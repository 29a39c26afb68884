"""Test tab: form checks, LoRA listing, and a real run on the tiny model: start from the Train tab,
pause, compare on the paused model, continue, finish, compare on the finished run (base model cached)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from test_ui_train import form_values, make_workspace

from lora_gui.engine.checkpoint import COMPLETE_MARKER
from lora_gui.engine.compare import NO_LORA, label_width
from lora_gui.ui import comparison
from lora_gui.ui.comparison import ComparisonError
from lora_gui.ui.tabs import test as test_tab
from lora_gui.ui.tabs import train


def wait_for(predicate, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_scales_are_parsed_and_checked():
    assert comparison.parse_scales("0, 0.5 0.75;1,1.25") == [0.0, 0.5, 0.75, 1.0, 1.25]
    assert comparison.parse_scales("1, 1, -1") == [1.0, -1.0]
    for text, problem in [("", "at least one"), ("1, x", "not a number"), ("5", "-4 to 4"), ("nan", "-4 to 4"),
                          (", ".join(str(i / 10) for i in range(9)), "at most 8")]:
        with pytest.raises(ComparisonError, match=problem):
            comparison.parse_scales(text)


def fake_checkpoint(run, step: int, complete: bool = True):
    folder = run / "checkpoints" / f"step-{step:06d}"
    folder.mkdir(parents=True)
    (folder / "test-lora.safetensors").write_bytes(b"x")
    (folder / "test-lora.diffusers.safetensors").write_bytes(b"x")
    if complete:
        (folder / COMPLETE_MARKER).write_text("{}")


def test_lora_choices_and_request_checks(tmp_path):
    session, tab = make_workspace(tmp_path)
    run = session.workspace.outputs / "run"
    from lora_gui.config import save_config

    save_config(tab.base, run / "config.toml")
    fake_checkpoint(run, 20)
    fake_checkpoint(run, 10)
    fake_checkpoint(run, 30, complete=False)
    (run / "test-lora.safetensors").write_bytes(b"x")
    choices = comparison.lora_choices(run)
    assert [(c.label, c.value) for c in choices] == [
        (NO_LORA, NO_LORA), ("step 10", "checkpoints/step-000010/test-lora.safetensors"),
        ("step 20", "checkpoints/step-000020/test-lora.safetensors"), ("final LoRA", "test-lora.safetensors")]
    form = test_tab.load_run(session, "outputs/run")
    assert form["selected"] == [NO_LORA, "test-lora.safetensors"] and form["defaults"]["prompt"] == "sks, a red square"

    good = dict(run="outputs/run", loras=[NO_LORA], scales="0, 1", prompt="p", negative_prompt="", seed=1, steps=2,
                guidance=5, width=64, height=64)
    request = comparison.build_request(session, *good.values())
    assert request.scales == (0.0, 1.0) and request.settings.width == 64
    for change, problem in [({"run": "../../etc"}, "outside the workspace"), ({"run": "datasets/shapes"}, "not a run"),
                            ({"loras": ["/etc/passwd"]}, "not a LoRA of run"), ({"loras": []}, "at least one"),
                            ({"prompt": " "}, "Enter a prompt"), ({"steps": 0}, "Steps"), ({"seed": 1.5}, "Seed"),
                            ({"width": "wide"}, "Width"), ({"scales": "9"}, "-4 to 4")]:
        with pytest.raises(ComparisonError, match=problem):
            comparison.build_request(session, *{**good, **change}.values())
    image, path, message = test_tab.render(session, {**good, "run": "/"})
    assert image is None and message.startswith("⚠")


def adapter_facts(family, components):
    """The training adapter as the optimizer sees it: weights, trainable flags, adapters, train mode."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    unet = components.denoiser
    weights = {n: p.detach().clone() for n, p in unet.named_parameters() if ".default." in n}
    return {
        "weights": weights,
        "ids": {n: id(p) for n, p in unet.named_parameters() if ".default." in n},
        "trainable": sorted(n for n, p in unet.named_parameters() if p.requires_grad),
        "adapters": sorted(unet.peft_config),
        "active": {tuple(m.active_adapters) for m in unet.modules() if isinstance(m, BaseTunerLayer)},
        "disabled": any(m.disable_adapters for m in unet.modules() if isinstance(m, BaseTunerLayer)),
        "training": unet.training,
    }


def cell(grid, row: int, column: int, size: int = 64):
    left, top = label_width(size) + column * size, 28 + row * size  # engine.compare.grid_image's label margins
    return np.asarray(grid.crop((left, top, left + size, top + size)))


@pytest.mark.slow
def test_pause_compare_continue_finish_and_compare_again(tmp_path):
    session, tab = make_workspace(tmp_path, "train.max_steps=14", "output.save_every=2", "train.learning_rate=1e-2")
    values = form_values(tab)
    assert train.start_run(session, tab, values).startswith("Started")
    assert "already in progress" in train.start_run(session, tab, values, overwrite=True)
    runner = session.runner
    wait_for(lambda: runner.snapshot().checkpoints)
    form = dict(run="outputs/run", loras=[NO_LORA, "checkpoints/step-000002/test-lora.safetensors"], scales="0, 1",
                prompt="sks, a red square", negative_prompt="", seed=3, steps=2, guidance=5, width=64, height=64)
    if runner.snapshot().state == "running":
        assert "Pause training first" in test_tab.render(session, form)[2]
    assert train.control(session, "pause").startswith("Pausing")
    wait_for(lambda: runner.snapshot().status.startswith("Paused"))
    paused_at = runner.snapshot().step
    before = runner.submit(adapter_facts).result(timeout=60)

    reports = []
    grid, path, message = test_tab.render(session, form, lambda fraction, desc: reports.append(desc))
    assert "paused run's model" in message and path.endswith(".png"), message
    assert grid.size == (96 + 2 * 64, 28 + 2 * 64) and reports  # a narrow label gutter beside 64 px images
    assert np.array_equal(cell(grid, 0, 0), cell(grid, 1, 0))  # scale 0 and no LoRA: both the bare base model
    assert np.array_equal(cell(grid, 0, 0), cell(grid, 0, 1))  # the no-LoRA row is filled, not left blank
    assert not np.array_equal(cell(grid, 1, 0), cell(grid, 1, 1))
    offered = test_tab.load_run(session, "outputs/run")  # the weights in memory, without a Save now first
    assert (f"current weights (step {paused_at})", "current") in offered["choices"]
    assert offered["selected"] == [NO_LORA, "current"]
    now, _, message = test_tab.render(session, dict(form, loras=[NO_LORA, "current"]))
    assert "paused run's model" in message, message
    assert np.array_equal(cell(now, 1, 0), cell(grid, 0, 0))  # the current weights at scale 0: the base model
    assert not np.array_equal(cell(now, 1, 1), cell(grid, 0, 0))  # at scale 1 the training adapter changes it
    assert not np.array_equal(cell(now, 1, 1), cell(grid, 1, 1))  # and it has moved on since step 2
    after = runner.submit(adapter_facts).result(timeout=60)
    assert after["adapters"] == ["default"] and after["active"] == {("default",)} and not after["disabled"]
    assert after["trainable"] == before["trainable"] and after["ids"] == before["ids"]
    assert after["training"] == before["training"]
    assert all(np.array_equal(before["weights"][n], after["weights"][n]) for n in before["weights"])
    assert runner.snapshot().step == paused_at

    assert train.control(session, "continue") == "Continuing."
    moved = runner.submit(adapter_facts).result(timeout=60)  # runs at the next step boundary
    wait_for(lambda: runner.snapshot().step > paused_at)
    later = runner.submit(adapter_facts).result(timeout=60)
    assert any(not np.array_equal(later["weights"][n], moved["weights"][n]) for n in moved["weights"])
    assert runner.wait(timeout=120) and runner.snapshot().state == "finished", runner.snapshot().log
    assert [step for step, _, _ in runner.snapshot().losses] == list(range(1, 15))

    final = dict(form, loras=[NO_LORA, "test-lora.safetensors"])
    grid2, _, message = test_tab.render(session, final)
    assert "base model" in message, message
    assert np.array_equal(cell(grid2, 0, 0), cell(grid, 0, 0))  # the base model is the same in and out of training
    assert not np.array_equal(cell(grid2, 1, 1), cell(grid2, 0, 0))  # the final LoRA loads and changes the image
    test_tab.render(session, dict(final, scales="1"))
    assert comparison.pipeline_cache(session).loads == 1
    assert len(list((session.workspace.outputs / "run" / "comparisons").glob("compare-*.png"))) == 4
    assert "current" not in str(test_tab.load_run(session, "outputs/run")["choices"])  # finished: files only
    assert "Overwrite" in train.start_run(session, tab, values)
    assert train.start_run(session, tab, values, overwrite=True).startswith("Started")
    assert comparison.pipeline_cache(session)._entry is None  # the cached base model was freed
    runner.stop()
    runner.wait(timeout=120)
    assert not (session.workspace.outputs / "run" / "test-lora.safetensors").exists()  # the old run was cleared

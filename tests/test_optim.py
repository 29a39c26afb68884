import math
import sys

import pytest
import torch

from lora_gui.config import TrainSection
from lora_gui.engine.optim import OPTIMIZERS, build_lr_scheduler, build_optimizer, current_lr

LEARNING_RATES = {"prodigy": 1.0}


def _param(seed: int = 0) -> torch.nn.Parameter:
    # 4096 elements: large enough for bitsandbytes to use its 8-bit state
    return torch.nn.Parameter(torch.randn(64, 64, generator=torch.Generator().manual_seed(seed)))


def _take_steps(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        sum((p**2).sum() for p in params).backward()
        optimizer.step()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_each_optimizer_changes_the_parameter(name):
    param = _param()
    before = param.detach().clone()
    train = TrainSection(optimizer=name, learning_rate=LEARNING_RATES.get(name, 1e-2))
    optimizer = build_optimizer([{"params": [param]}], train)
    _take_steps(optimizer, [param], 3)
    assert torch.isfinite(param).all()
    assert not torch.equal(param.detach(), before)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_param_group_lr_overrides_the_default(name):
    unet, text = _param(0), _param(1)
    train = TrainSection(optimizer=name, learning_rate=1e-3)
    optimizer = build_optimizer([{"params": [unet]}, {"params": [text], "lr": 1e-5}], train)
    assert optimizer.param_groups[0]["lr"] == 1e-3
    assert optimizer.param_groups[1]["lr"] == 1e-5


def test_group_lr_scales_the_adamw_update():
    unet, text = _param(0), _param(1)
    start_unet, start_text = unet.detach().clone(), text.detach().clone()
    optimizer = build_optimizer(
        [{"params": [unet]}, {"params": [text], "lr": 1e-5}], TrainSection(learning_rate=1e-3, weight_decay=0.0)
    )
    _take_steps(optimizer, [unet, text], 1)
    unet_step = (unet.detach() - start_unet).abs().mean().item()
    text_step = (text.detach() - start_text).abs().mean().item()
    assert unet_step == pytest.approx(1e-3, rel=0.05)  # Adam's first step is lr per element
    assert text_step == pytest.approx(1e-5, rel=0.05)


def test_param_groups_given_as_generators_are_accepted():
    model = torch.nn.Linear(4, 4)
    optimizer = build_optimizer([{"params": model.parameters()}], TrainSection())
    assert len(optimizer.param_groups[0]["params"]) == 2


def test_missing_package_says_what_to_change(monkeypatch):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)
    with pytest.raises(ValueError, match=r"pip install prodigyopt.*train\.optimizer = 'adamw'"):
        build_optimizer([{"params": [_param()]}], TrainSection(optimizer="prodigy"))


def test_bitsandbytes_failing_on_the_device_says_what_to_change(monkeypatch):
    import bitsandbytes.optim

    class Broken(torch.optim.SGD):
        def step(self, closure=None):
            raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(bitsandbytes.optim, "AdamW8bit", Broken)
    with pytest.raises(ValueError, match=r"no kernel for this device.*train\.optimizer = 'adamw'"):
        build_optimizer([{"params": [_param()]}], TrainSection(optimizer="adamw8bit"))


def test_unknown_optimizer_lists_the_choices():
    train = TrainSection.model_construct(optimizer="sgd")
    with pytest.raises(ValueError, match="train.optimizer = 'sgd'.*adamw8bit"):
        build_optimizer([{"params": [_param()]}], train)


def test_current_lr_reports_d_times_lr_for_prodigy():
    param = _param()
    optimizer = build_optimizer([{"params": [param]}], TrainSection(optimizer="prodigy", learning_rate=1.0))
    _take_steps(optimizer, [param], 3)
    group = optimizer.param_groups[0]
    assert group["d"] != 1.0
    assert current_lr(optimizer) == pytest.approx(group["d"] * group["lr"])


# ----------------------------------------------------------------------------- schedules


def _lr_curve(**settings) -> list[float]:
    """The lr used at each optimizer step over the whole run, with a peak lr of 1."""
    train = TrainSection(learning_rate=1.0, **settings)
    optimizer = build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(2))]}], train)
    scheduler = build_lr_scheduler(optimizer, train)
    curve = []
    for _ in range(train.max_steps):
        curve.append(current_lr(optimizer))
        optimizer.step()
        scheduler.step()
    return curve


def test_constant():
    assert _lr_curve(lr_scheduler="constant", max_steps=10) == [1.0] * 10


@pytest.mark.parametrize("name", ["constant_with_warmup", "constant"])
def test_warmup_ramps_up_linearly(name):
    curve = _lr_curve(lr_scheduler=name, warmup_steps=4, max_steps=10)
    assert curve[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert curve[5:] == pytest.approx([1.0] * 5)


def test_linear_decays_to_zero_after_warmup():
    curve = _lr_curve(lr_scheduler="linear", warmup_steps=2, max_steps=12)
    assert curve[:3] == pytest.approx([0.0, 0.5, 1.0])
    assert curve[7] == pytest.approx(0.5)
    assert curve[-1] == pytest.approx(0.1)
    assert curve[2:] == sorted(set(curve[2:]), reverse=True)  # strictly decreasing


def test_cosine_reaches_about_zero_at_the_end():
    curve = _lr_curve(lr_scheduler="cosine", warmup_steps=2, max_steps=40)
    assert curve[2] == pytest.approx(1.0)
    assert curve[21] == pytest.approx(0.5, abs=0.05)
    assert curve[-1] < 0.01
    assert curve[2:] == sorted(curve[2:], reverse=True)


def test_cosine_with_restarts_restarts():
    curve = _lr_curve(lr_scheduler="cosine_with_restarts", lr_cycles=2, max_steps=20)
    assert curve[0] == pytest.approx(1.0)
    assert curve[9] < 0.05
    assert curve[10] == pytest.approx(1.0)
    assert curve[19] < 0.05


def test_polynomial_follows_its_power():
    curve = _lr_curve(lr_scheduler="polynomial", lr_power=2.0, max_steps=10)
    assert curve[0] == pytest.approx(1.0)
    assert curve[5] == pytest.approx(0.25, abs=1e-6)  # (1 - 5/10) ** 2
    assert curve[-1] == pytest.approx(0.01, abs=1e-6)


def test_warmup_longer_than_the_run_is_refused():
    with pytest.raises(ValueError, match="lower train.warmup_steps"):
        _lr_curve(lr_scheduler="cosine", warmup_steps=10, max_steps=10)


def test_schedule_applies_to_every_group_proportionally():
    train = TrainSection(learning_rate=1e-3, lr_scheduler="linear", max_steps=4)
    optimizer = build_optimizer(
        [
            {"params": [torch.nn.Parameter(torch.zeros(2))]},
            {"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1e-4},
        ],
        train,
    )
    scheduler = build_lr_scheduler(optimizer, train)
    optimizer.step()
    scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.75e-3, 0.75e-4])
    assert math.isclose(current_lr(optimizer), 0.75e-3)


def test_adamw_is_fused_on_cuda_and_torchs_default_elsewhere():
    """No GPU here: the CUDA parameters are fake tensors (shapes and devices only), which is all the choice reads."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    train = TrainSection(optimizer="adamw")
    on_cpu = build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(4, 4))]}], train)
    assert not on_cpu.defaults.get("fused")
    with FakeTensorMode(allow_non_fake_inputs=True):
        on_cuda = build_optimizer([{"params": [torch.nn.Parameter(torch.empty(4, 4, device="cuda"))]}], train)
    assert on_cuda.defaults["fused"] is True

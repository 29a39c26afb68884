"""The memory planner: the config's training step traced on fake tensors.

Its figures are checked against the same step run for real (real tensors on this CPU, random weights)
with the same byte counter; a GPU adds what no trace sees (the CUDA context, the allocator's rounding),
which the plan shows as a separate allowance.
"""

from __future__ import annotations

import pytest
import torch

from lora_gui.cli import main
from lora_gui.config import build_config, list_presets, preset_description
from lora_gui.engine.families.registry import get_family
from lora_gui.engine.planner import GIB, HEADROOM, plan_memory
from lora_gui.engine.planner.architecture import denoiser_config
from lora_gui.engine.planner.live_bytes import LiveBytes
from lora_gui.engine.planner.stand_ins import QuantizedLinearStandIn, optimizer_state_bytes
from lora_gui.engine.planner.trace import SWAPPED, _adapted_denoiser, _forward_backward, _track_parameters


def tiny_config(tmp_path, *overrides):
    return build_config(preset="sd15-cpu-demo", overrides=[
        "model.base=builtin:tiny-sd15", "model.family=sd15", "dataset.resolution=128", "train.batch_size=2",
        "model.weight_dtype=fp32", "train.mixed_precision=fp32", f"output.dir={tmp_path / 'out'}", *overrides])


def real_step_peak(config) -> tuple[int, dict, int]:
    """The same step with real tensors on the CPU, counted by the same tracker; and its FLOPs."""

    family = get_family("sd15")
    architecture = denoiser_config(family, config.model)
    denoiser = _adapted_denoiser(family, config, architecture, torch.float32).to_empty(device="cpu")
    for parameter in denoiser.parameters():
        torch.nn.init.normal_(parameter, std=0.02)
    trainable = [p for p in denoiser.parameters() if p.requires_grad]
    tracker = LiveBytes()
    _track_parameters(tracker, denoiser, trainable)
    if config.train.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    tracker.count_flops = True
    with tracker:
        _forward_backward(tracker, family, config, denoiser, architecture, config.dataset.resolution,
                          torch.float32, torch.float32)
    return tracker.peak, tracker.peak_split, tracker.flops


def test_the_fake_trace_equals_the_real_step_on_the_cpu(tmp_path):
    flops = {}
    for checkpointing in ("true", "false"):
        config = tiny_config(tmp_path, f"train.gradient_checkpointing={checkpointing}", "train.gradient_accumulation=2")
        plan = plan_memory(config)
        real_peak, real_split, real_flops = real_step_peak(config)
        assert plan.step_split["weights"] == real_split["weights"] > 0
        # the optimizer's states come after the backward pass's peak in both
        step_peak = plan.phases["training step"]
        assert abs(step_peak - real_peak) <= 0.02 * real_peak, (checkpointing, step_peak, real_peak)
        assert plan.step_flops == 2 * real_flops > 0  # two micro-batches per optimizer step
        flops[checkpointing] = plan.step_flops
    # checkpointing runs each checkpointed block's forward pass a second time during the backward pass
    assert 1.1 * flops["false"] < flops["true"] < 1.5 * flops["false"]


def test_the_plan_follows_the_config(tmp_path):
    base = plan_memory(tiny_config(tmp_path))
    bigger = plan_memory(tiny_config(tmp_path, "dataset.resolution=256"))
    rank = plan_memory(tiny_config(tmp_path, "lora.rank=64"))
    checkpointed = plan_memory(tiny_config(tmp_path, "dataset.resolution=256", "train.gradient_checkpointing=true"))
    assert bigger.step_split["activations"] > 3 * base.step_split["activations"]
    assert rank.step_split["LoRA"] > 3 * base.step_split["LoRA"] and rank.step_split["weights"] == base.step_split["weights"]
    assert checkpointed.step_split["activations"] < bigger.step_split["activations"] / 2


def test_quantized_weights_and_8_bit_states_take_their_real_sizes():
    linear = torch.nn.Linear(4096, 1024, device="meta")
    assert QuantizedLinearStandIn(linear, "int8", torch.bfloat16).weight.numel() == 4096 * 1024 + 2 * 1024
    assert QuantizedLinearStandIn(linear, "nf4", torch.bfloat16).weight.numel() == 4096 * 1024 // 2 + 4096 * 1024 // 64
    lora_a = torch.empty(16, 3072, device="meta")
    assert optimizer_state_bytes("adamw", lora_a) == 2 * 4 * lora_a.numel()
    assert optimizer_state_bytes("adamw8bit", lora_a) == 2 * (lora_a.numel() + 4 * lora_a.numel() // 256)
    assert optimizer_state_bytes("adamw8bit", torch.empty(16, 16)) == 2 * 4 * 256  # small: 32-bit states


def test_cli_plan_prints_the_split_and_the_verdict(tmp_path, capsys):
    tiny = ["--preset", "sd15-cpu-demo", "--set", f"output.dir={tmp_path}"]
    assert main(["plan", *tiny, "--vram", "8"]) == 0
    out = capsys.readouterr().out
    assert "peak" in out and "weights" in out and "fits a 8 GB card" in out and "Allowance" in out
    assert main(["plan", *tiny, "--vram", "0.001"]) == 0
    assert "more than a 0.001 GB card has" in capsys.readouterr().out
    assert main(["plan", *tiny, "--vram", "-3"]) == 2
    assert main(["plan", *tiny, "--set", "model.base=/nowhere/model"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["plan", "--preset", "flux-8gb"]) == 2  # a tier the family cannot fit
    assert "block swap" in capsys.readouterr().err.lower()


def test_the_config_tab_shows_the_plan_and_the_verdict(tmp_path):
    from lora_gui.ui import presets
    from lora_gui.ui.session import GpuInfo

    plan = plan_memory(tiny_config(tmp_path))
    fits = presets.plan_text(plan, GpuInfo("NVIDIA GeForce RTX 4090", 23.6))
    assert "✓" in fits and "fits a 23.6 GB card" in fits and "weights" in fits
    assert "✗" in presets.plan_text(plan, GpuInfo("a tiny card", 0.5))
    assert "TFLOP (traced)" in fits and "run the plan on the GPU itself" in fits
    timed = presets.plan_text(plan, GpuInfo("NVIDIA GeForce RTX 4090", 23.6), matmul_tflops=100.0)
    assert f"at least {plan.step_flops / 100e12:.2f} s per step" in timed
    on_cpu = presets.plan_text(plan, None)  # a CPU-only machine: no VRAM figures at all
    assert "no GPU detected" in on_cpu and "GiB" not in on_cpu and "GB card" not in on_cpu


def test_long_block_stacks_are_traced_a_few_blocks_deep_with_the_same_figures(tmp_path):
    from lora_gui.engine.planner.trace import _extrapolated, trace_step

    family = get_family("flux")
    config = build_config(preset="flux-cpu-demo", overrides=[
        "model.base=builtin:tiny-flux", "dataset.resolution=64", f"output.dir={tmp_path / 'out'}"])
    architecture = {**denoiser_config(family, config.model), "num_layers": 4, "num_single_layers": 5}
    for checkpointing in (True, False):
        config = config.model_copy(update={"train": config.train.model_copy(
            update={"gradient_checkpointing": checkpointing})})
        exact = trace_step(family, config, architecture)
        assert _extrapolated(family, config, architecture, {"num_layers": 4, "num_single_layers": 5}) == exact
        fewer = trace_step(family, config, {**architecture, "num_layers": 3})
        assert max(peak for peak, _ in fewer.phases.values()) < max(peak for peak, _ in exact.phases.values())
        assert 0 < fewer.flops < exact.flops


def test_only_top_level_embeddings_and_output_layers_stay_unquantized():
    from lora_gui.engine.quantize import keeps_full_precision

    assert keeps_full_precision("proj_out") and keeps_full_precision("time_text_embed.timestep_embedder.linear_1")
    # Flux's 38 single blocks each have a proj_out (1.8 B parameters in all): those are quantized
    assert not keeps_full_precision("single_transformer_blocks.0.proj_out")
    assert not keeps_full_precision("transformer_blocks.3.ff.net.2")


GPU_PRESETS = [name for name in list_presets() if not name.endswith("cpu-demo")]


def planned_total(name: str) -> tuple[int, bool]:
    """The preset's planned total, and whether its captions are encoded on its card."""
    plan = plan_memory(build_config(preset=name))
    return plan.total_bytes, plan.captions_on_gpu(preset_description(name)["vram_gb"])


@pytest.fixture(scope="module")
def preset_plans() -> dict[str, tuple[int, bool]]:
    """Every GPU preset's planned total, traced in parallel processes (one per core): each trace is
    independent, single-threaded Python work."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    workers = max(1, min(len(os.sched_getaffinity(0)), 4))
    if workers == 1:
        return {name: planned_total(name) for name in GPU_PRESETS}
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return dict(zip(GPU_PRESETS, pool.map(planned_total, GPU_PRESETS), strict=True))


@pytest.mark.parametrize("name", GPU_PRESETS)
def test_every_gpu_preset_fits_its_card_with_headroom(name, preset_plans):
    card = preset_description(name)["vram_gb"]
    total, captions_on_gpu = preset_plans[name]
    headroom = 1.0 - total / (card * GIB)
    assert headroom >= HEADROOM, f"{name}: {total / GIB:.2f} GiB planned for {card} GB"
    assert captions_on_gpu, f"{name}: its text encoders do not fit the card (set model.quantize_text_encoders)"


def test_a_unet_level_is_traced_a_block_deep_with_the_same_figures(tmp_path):
    from lora_gui.engine.planner.trace import _extrapolated, trace_step

    family = get_family("sdxl")
    config = build_config(preset="sdxl-cpu-demo", overrides=["dataset.resolution=64", f"output.dir={tmp_path}"])
    architecture = {**denoiser_config(family, config.model), "transformer_layers_per_block": [1, 4]}
    key = "transformer_layers_per_block[1]"
    assert _extrapolated(family, config, architecture, {key: 4}) == trace_step(family, config, architecture)


def test_train_refuses_a_run_its_gpu_cannot_fit_unless_told(tmp_path, monkeypatch, capsys):
    from helpers import make_dataset

    from lora_gui import cli_plan

    dataset = make_dataset(tmp_path / "images")
    args = ["train", "--preset", "sd15-cpu-demo", "--set", f"dataset.dir={dataset}", "--set", f"output.dir={tmp_path / 'out'}",
            "--set", "train.max_steps=1", "--set", "sample.every=0", "--set", "output.save_every=0"]
    monkeypatch.setattr(cli_plan, "_gpu_gib", lambda: 0.001)  # a GPU cannot exist here: this says there is a tiny one
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "more than a 0.001 GB card has" in err and "--no-plan" in err and "peak" in err
    assert not (tmp_path / "out").exists()  # refused before anything was loaded or written
    assert main([*args, "--no-plan"]) == 0  # the run itself goes to the CPU: there is no real GPU
    monkeypatch.setattr(cli_plan, "_gpu_gib", lambda: 24.0)
    assert main([*args, "--overwrite"]) == 0
    assert "Memory plan: fits a 24 GB card" in capsys.readouterr().err


def test_block_swap_moves_the_swapped_weights_out_of_the_gpu_plan(tmp_path):
    common = ["model.base=builtin:tiny-zimage", "model.family=zimage", "train.gradient_checkpointing=true",
              f"output.dir={tmp_path}"]
    plain = plan_memory(build_config(preset="zimage-cpu-demo", overrides=common))
    swapped = plan_memory(build_config(preset="zimage-cpu-demo", overrides=[*common, "model.block_swap=2"]))
    offloaded = swapped.step_split["system memory (block swap)"]
    assert offloaded > 0 and plain.step_split["system memory (block swap)"] == 0
    assert swapped.step_split["weights"] == plain.step_split["weights"] - offloaded
    assert any("Block swap keeps" in line for line in swapped.lines())


def test_block_swap_in_a_long_stack_is_planned_from_block_sizes_with_the_figures_of_a_whole_trace(tmp_path):
    from lora_gui.engine.planner.trace import _extrapolated, _with_blocks_swapped, trace_step

    family = get_family("flux")
    common = ["model.base=builtin:tiny-flux", "dataset.resolution=64", "train.gradient_checkpointing=true",
              f"output.dir={tmp_path / 'out'}"]
    plain = build_config(preset="flux-cpu-demo", overrides=common)
    counts = {"num_layers": 4, "num_single_layers": 5}
    architecture = {**denoiser_config(family, plain.model), **counts}
    unswapped = _extrapolated(family, plain, architecture, counts)
    for swapped_blocks in (6, 9):  # both kinds of block, every block
        config = build_config(preset="flux-cpu-demo", overrides=[*common, f"model.block_swap={swapped_blocks}"])
        whole = trace_step(family, config, architecture)
        from_sizes = _with_blocks_swapped(unswapped, config, architecture)
        for phase, (peak, split) in whole.phases.items():
            assert from_sizes.phases[phase][0] == peak, phase
            assert from_sizes.phases[phase][1][SWAPPED] == split[SWAPPED] > 0, phase


def test_a_plan_over_the_card_gets_the_block_swap_count_that_fits_it(tmp_path):
    from lora_gui.engine.planner.advice import fitting_advice

    overrides = ["model.quantize=none", "dataset.resolution=256", f"output.dir={tmp_path}"]
    config = build_config(preset="zimage-24gb", overrides=overrides)
    plan = plan_memory(config)
    card = plan.total_bytes / GIB * 0.7
    advice = fitting_advice(config, plan, card)
    count = int(advice.split("model.block_swap = ")[1].split()[0])
    swapped = plan_memory(build_config(preset="zimage-24gb", overrides=[*overrides, f"model.block_swap={count}"]))
    fewer = plan_memory(build_config(preset="zimage-24gb", overrides=[*overrides, f"model.block_swap={count - 1}"]))
    assert swapped.headroom(card) >= HEADROOM > fewer.headroom(card)  # the fewest blocks that fit
    assert "model.block_swap" not in fitting_advice(build_config(preset="sdxl-24gb"), plan, card)  # a UNet


def test_offloaded_activations_leave_the_gpu_plan_for_system_memory(tmp_path, monkeypatch):
    from lora_gui.engine import activation_offload

    monkeypatch.setattr(activation_offload, "SMALLEST_OFFLOADED_BYTES", 0)  # the tiny model's are all small
    kept = plan_memory(tiny_config(tmp_path, "dataset.resolution=256"))
    offloaded = plan_memory(tiny_config(tmp_path, "dataset.resolution=256", "train.offload_activations=true"))
    assert offloaded.step_split["activations"] < kept.step_split["activations"] / 2
    assert offloaded.step_split["system memory (offloaded activations)"] > kept.step_split["activations"] / 2
    assert offloaded.phases["training step"] < kept.phases["training step"]
    assert offloaded.step_split["weights"] == kept.step_split["weights"] and offloaded.step_flops == kept.step_flops
    assert any("Activation offloading keeps" in line for line in offloaded.lines())


def test_validation_sampling_and_latent_caching_are_planned(tmp_path):
    """Sampling renders with the training state still on the device: one denoising pass without gradients
    (two batches with true CFG) and the VAE's decoding at the validation size; caching runs the VAE's encoder
    before the denoiser loads."""
    small = plan_memory(tiny_config(tmp_path, "sample.width=128", "sample.height=128", "sample.guidance_scale=1.0"))
    cfg = plan_memory(tiny_config(tmp_path, "sample.width=128", "sample.height=128", "sample.guidance_scale=7.0"))
    large = plan_memory(tiny_config(tmp_path, "sample.width=512", "sample.height=512", "sample.guidance_scale=7.0"))
    sampling = "validation sampling"
    assert 0 < small.phases[sampling] <= cfg.phases[sampling] < large.phases[sampling]
    from lora_gui.engine.planner.trace import sampling_batch

    sd15, flux = get_family("sd15"), get_family("flux")
    with_cfg = build_config(preset="sd15-cpu-demo", overrides=["sample.guidance_scale=7"])
    assert sampling_batch(sd15, with_cfg) == 2 and sampling_batch(flux, with_cfg) == 1  # Flux: embedded guidance
    assert sampling_batch(sd15, build_config(preset="sd15-cpu-demo", overrides=["sample.guidance_scale=1"])) == 1
    assert large.peak_bytes == max(large.phases.values()) == large.phases[sampling]
    assert small.phases["caching latents"] > 0
    bigger_images = plan_memory(tiny_config(tmp_path, "dataset.resolution=512"))
    assert bigger_images.phases["caching latents"] > 3 * small.phases["caching latents"]
    assert any(line.startswith("Peaks by phase: training step") for line in large.lines())


def test_the_flop_count_covers_products_convolutions_and_attention():
    """What the planner adds up per operation: torch's formulas, with the CPU flash-attention kernels the fake
    trace runs counted as the GPU's flash attention (torch's own counter has no formula for them)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lora_gui.engine.planner.flops import FlopCount

    query = torch.randn(1, 4, 256, 64, requires_grad=True)
    with FlopCount() as counted, sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        torch.nn.functional.scaled_dot_product_attention(query, query, query).sum().backward()
    forward = 2 * 2 * 4 * 256 * 256 * 64  # QK^T and (softmax)V: 2 FLOPs per multiply-add
    assert counted.flops == forward + int(2.5 * forward)  # torch's formula: the backward pass does 2.5x the work
    linear = torch.nn.Linear(64, 32)
    with FlopCount() as counted:
        linear(torch.randn(10, 64))
    assert counted.flops == 2 * 10 * 64 * 32

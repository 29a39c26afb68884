"""The VRAM/time estimate: monotonic in the settings, presets fit their tier, known anchor points."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lora_gui.config import build_config
from lora_gui.engine.estimate import FAMILY_COSTS, GPU_PEAK_TFLOPS, estimate, gpu_peak_tflops

GPU = "NVIDIA H100 80GB HBM3"


def config(family: str = "sd15", **sections):
    base = {"sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5", "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
            "flux": "black-forest-labs/FLUX.1-dev"}[family]
    data = {"model": {"family": family, "base": base}}
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return build_config(data=data)


def peak(cfg) -> float:
    return estimate(cfg, 80.0, GPU).peak_vram_gib


def step(cfg) -> float:
    return estimate(cfg, 80.0, GPU).seconds_per_step


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux"])
def test_resolution_and_batch_raise_memory_and_time(family):
    small, large = config(family, dataset={"resolution": 512}), config(family, dataset={"resolution": 1024})
    assert peak(large) > peak(small) and step(large) > step(small)
    one, four = config(family, train={"batch_size": 1}), config(family, train={"batch_size": 4})
    assert peak(four) > peak(one) and step(four) > step(one)


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux"])
def test_checkpointing_trades_time_for_memory(family):
    plain, ckpt = config(family), config(family, train={"gradient_checkpointing": True})
    assert peak(ckpt) < peak(plain)
    assert step(ckpt) > step(plain)


@pytest.mark.parametrize("mode", ["int8", "fp8", "int4", "nf4"])
def test_quantization_saves_memory(mode):
    assert peak(config("flux", model={"quantize": mode})) < peak(config("flux"))
    assert peak(config("flux", model={"quantize": "nf4"})) <= peak(config("flux", model={"quantize": "int8"}))


def test_caches_and_offloading_save_memory():
    cached = config("flux")
    assert peak(config("flux", dataset={"cache_text": False})) > peak(cached)
    assert peak(config("flux", dataset={"cache_latents": False})) > peak(cached)
    # Training the text encoder keeps it on the GPU even with the text cache on.
    assert peak(config("sdxl", lora={"train_text_encoder": True})) > peak(config("sdxl"))


def test_optimizer_rank_and_8bit_states():
    assert peak(config("sdxl", train={"optimizer": "adamw8bit"})) < peak(config("sdxl"))
    assert peak(config("sdxl", train={"optimizer": "prodigy"})) > peak(config("sdxl"))
    assert peak(config("sdxl", lora={"rank": 128})) > peak(config("sdxl", lora={"rank": 8}))


def test_sd15_512_batch1_is_a_few_gib():
    result = estimate(config("sd15", dataset={"resolution": 512}), 24.0, "NVIDIA GeForce RTX 4090")
    assert 2.0 < result.peak_vram_gib < 8.0
    assert result.fits is True
    assert 0.05 < result.seconds_per_step < 2.0


def test_flux_bf16_1024_does_not_fit_24gb():
    result = estimate(config("flux", dataset={"resolution": 1024}, train={"gradient_checkpointing": True}),
                      23.6, "NVIDIA GeForce RTX 4090")
    assert result.fits is False
    assert result.peak_vram_gib > 24
    assert any("does not fit" in n or "needs about" in n for n in result.notes)


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux"])
def test_cpu_demo_on_cpu_says_seconds_and_gpu_only(family):
    result = estimate(build_config(preset=f"{family}-cpu-demo"), None, None)
    assert result.fits is None
    assert result.total_minutes < 1.0
    assert any("tiny" in note for note in result.notes)
    full = estimate(config(family), None, None)
    assert full.fits is None and any("No GPU" in note for note in full.notes)


def test_time_follows_the_design_flop_model():
    # SDXL 1024 px batch 1: 6.76 TFLOP forward x 2.2 at 16% of 989 TFLOP/s, plus 0.05 s overhead.
    result = estimate(config("sdxl", dataset={"resolution": 1024}), 80.0, GPU)
    assert result.seconds_per_step == pytest.approx(6.76 * 2.2 / (989 * 0.16) + 0.05, rel=1e-3)
    flux512 = estimate(config("flux", dataset={"resolution": 512}), 80.0, GPU).seconds_per_step - 0.05
    flux1024 = estimate(config("flux", dataset={"resolution": 1024}), 80.0, GPU).seconds_per_step - 0.05
    assert flux1024 / flux512 == pytest.approx(74.4 / 21.5, rel=1e-2)


def test_gpu_names_and_unknown_gpu_note():
    assert gpu_peak_tflops("NVIDIA H100 PCIe") < gpu_peak_tflops("NVIDIA H100 80GB HBM3")
    assert gpu_peak_tflops("NVIDIA GeForce RTX 4090") == 165.0
    assert gpu_peak_tflops("Mystery Card") == 100.0
    assert all(tflops > 0 for _, tflops in GPU_PEAK_TFLOPS)
    result = estimate(config("sd15"), 16.0, "Mystery Card")
    assert any("not in the speed table" in note for note in result.notes)


def test_sampling_and_caching_peaks_leave_out_what_is_not_on_the_gpu():
    result = estimate(build_config(preset="flux-12gb"), 12.0, "NVIDIA GeForce RTX 3060")
    assert result.sampling_gib < 12.0 and result.loading_gib < 12.0  # prompts pre-encoded; denoiser loads later
    small = estimate(build_config(preset="flux-12gb"), 8.0, "NVIDIA GeForce RTX 3070")
    assert small.loading_gib > 8.0 and any("encoded on the CPU" in note for note in small.notes)
    assert not any("Rendering validation images" in note for note in result.notes)
    shuffled = estimate(build_config(preset="flux-12gb", overrides=["dataset.shuffle_tags=true"]), 12.0, "RTX 3060")
    assert shuffled.peak_vram_gib > 12.0 and shuffled.sampling_gib > result.sampling_gib + 8  # T5 stays resident
    assert any("Rendering validation images" in note for note in shuffled.notes)


def test_target_tables_match_the_family_classes():
    from lora_gui.engine.families.registry import family_class

    for family, costs in FAMILY_COSTS.items():
        cls = family_class(family)
        assert set(costs.lora_m_per_rank) == set(cls.lora_target_presets)
        assert costs.default_targets == cls.default_lora_targets


def test_estimate_module_imports_no_gradio_or_torch():
    code = ("import sys, lora_gui.engine.estimate\n"
            "print([m for m in ('gradio', 'torch') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

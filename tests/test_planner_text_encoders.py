"""The text encoders in the memory plan: encoding the captions, and training their LoRA."""

from __future__ import annotations

import pytest
import torch

from lora_gui.config import build_config
from lora_gui.engine.families import published_text_encoders as published
from lora_gui.engine.families.builtin import ensure_builtin
from lora_gui.engine.families.registry import get_family
from lora_gui.engine.planner import GIB, plan_memory
from lora_gui.engine.planner.live_bytes import LiveBytes
from lora_gui.engine.planner.text_encoders import (
    build_text_encoder,
    plan_text_encoders,
    planned_text_encoders,
)


@pytest.mark.parametrize("name", sorted(published.PUBLISHED_PARAMETERS))
def test_the_published_text_encoders_build_to_their_released_parameter_counts(name):
    encoder = build_text_encoder(getattr(published, name), torch.bfloat16, "none")
    assert sum(p.numel() for p in encoder.parameters()) == published.PUBLISHED_PARAMETERS[name]


def test_the_caption_encoding_trace_equals_real_encoding_on_the_cpu(tmp_path):
    """The built-in tiny Flux.1 (CLIP and T5) read from its folder: the fake trace's peak is what the same
    encoders, loaded for real, hold while they encode a batch, counted by the same tracker."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import CLIPTextModel, T5EncoderModel

    folder = ensure_builtin("builtin:tiny-flux")
    config = build_config(preset="flux-cpu-demo", overrides=["train.batch_size=2", f"output.dir={tmp_path}"])
    family = get_family("flux")
    entries = planned_text_encoders(family, config)
    assert [entry.tokens for entry in entries] == [77, 512]  # the folder's configs, Flux.1 dev's token counts
    plan = plan_text_encoders(family, config, dtype=torch.float32)

    encoders = [CLIPTextModel.from_pretrained(folder / "text_encoder"),
                T5EncoderModel.from_pretrained(folder / "text_encoder_2")]
    tracker = LiveBytes()
    for encoder in encoders:
        for tensor in (*encoder.parameters(), *encoder.buffers()):
            tracker.track(tensor, "text encoders")
    assert plan.weights == tracker.total
    with tracker, torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # the kernel a GPU uses
        outputs = []
        for encoder, entry in zip(encoders, entries, strict=True):
            ids = torch.zeros(2, entry.tokens, dtype=torch.long)
            padded = torch.ones_like(ids)
            padded[:, entry.tokens // 2:] = 0  # short captions padded to the token count
            outputs.append(encoder(input_ids=ids, attention_mask=padded, output_hidden_states=True))
    assert plan.caching_peak == tracker.peak > plan.weights


def test_the_plan_says_where_the_captions_are_encoded(tmp_path):
    plan = plan_memory(build_config(preset="flux-24gb", overrides=[f"output.dir={tmp_path}"]))
    assert 9.0 < plan.text_encoder_bytes / GIB < 9.5  # T5-XXL and CLIP-L in bf16
    assert plan.phases["caching captions"] > plan.text_encoder_bytes
    assert plan.captions_on_gpu(12) and not plan.captions_on_gpu(10)  # 85% of the card less the allowance
    assert "encoded on the 24 GB card" in plan.caption_line(24)
    assert "encoded on the CPU" in plan.caption_line(10) and "quantize_text_encoders" in plan.caption_line(10)
    quantized = plan_memory(build_config(preset="flux-24gb", overrides=[f"output.dir={tmp_path}",
                                                                           "model.quantize_text_encoders=nf4"]))
    assert quantized.text_encoder_bytes < plan.text_encoder_bytes / 3
    assert not any("text encoders" in line for line in plan.not_traced)


def test_a_text_encoder_lora_is_planned_in_the_training_step(tmp_path):
    common = ["model.base=builtin:tiny-sd15", "dataset.resolution=64", f"output.dir={tmp_path}"]
    frozen = plan_memory(build_config(preset="sd15-cpu-demo", overrides=common))
    trained = plan_memory(build_config(preset="sd15-cpu-demo", overrides=[*common, "lora.train_text_encoder=true"]))
    added = trained.step_split["text encoders"]
    assert added > frozen.text_encoder_bytes  # weights, LoRA, its state, activations
    assert trained.phases["training step"] == frozen.phases["training step"] + added
    assert trained.caption_line(24) is None and trained.phases["caching captions"] == 0

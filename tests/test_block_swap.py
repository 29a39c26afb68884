"""Block swap: the last blocks' frozen weights live in system memory and visit the accelerator one at a time.

There is no GPU here, so the accelerator is the CPU too: the swapped weights are still copied into separate
slot buffers and back, so what is resident when, and that training gives the same LoRA, are checked for real.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import make_dataset, tiny_config
from safetensors.torch import load_file

from lora_gui.config import build_config
from lora_gui.engine.block_swap import SLOTS, BlockSwapError, attach_block_swap, repeated_blocks
from lora_gui.engine.errors import TrainingError
from lora_gui.engine.families.builtin import ensure_builtin
from lora_gui.engine.train import train


def tiny_zimage_transformer(layers: int = 5):
    """The built-in tiny Z-Image transformer with more main layers (random weights)."""
    from diffusers import ZImageTransformer2DModel

    config = ZImageTransformer2DModel.load_config(ensure_builtin("builtin:tiny-zimage") / "transformer")
    model = ZImageTransformer2DModel.from_config({**config, "n_layers": layers})
    model.requires_grad_(False)
    return model


def test_swapped_blocks_are_loaded_one_at_a_time_and_give_the_same_gradients():
    torch.manual_seed(0)
    plain = tiny_zimage_transformer()
    swapped = copy.deepcopy(plain)
    blocks = repeated_blocks(swapped)
    assert len(blocks) >= 4  # the refiners and the main layers
    for model in (plain, swapped):
        model.layers[0].attention.to_q.weight.requires_grad_(True)  # one trainable tensor, as a LoRA would be
        model.enable_gradient_checkpointing()
    swap = attach_block_swap(swapped, len(blocks), torch.device("cpu"), True, "none")
    frozen = swap.frozen[id(blocks[-1])]
    assert all(p.data_ptr() == s.data_ptr() for p, s in zip(frozen, swap.stored[id(blocks[-1])], strict=True))

    resident = []
    for block in blocks:
        block.register_forward_hook(lambda *_: resident.append(swap.resident_blocks()))
    frames = [torch.randn(16, 1, 8, 8)]
    captions = [torch.randn(6, plain.config.cap_feat_dim)]
    t = torch.tensor([0.3])
    def step(model):
        model.layers[0].attention.to_q.weight.grad = None
        output = model([f.clone() for f in frames], t, [c.clone() for c in captions], return_dict=False)[0]
        torch.stack(output).square().mean().backward()
        return model.layers[0].attention.to_q.weight.grad

    expected = step(plain)
    torch.testing.assert_close(step(swapped), expected, rtol=0, atol=0)
    assert max(resident) <= 2 * SLOTS  # at most SLOTS per block shape on the accelerator at once
    assert swap.loads > len(blocks)  # the backward pass loaded them again to recompute
    first_waits = swap.waits
    assert first_waits > 1  # nothing is known about the order before the first step

    torch.testing.assert_close(step(swapped), expected, rtol=0, atol=0)  # prefetched slots held the right weights
    # From the second step on, the order is known: only the first block after an unknown stretch waits
    # (the first swapped block, whose predecessor ran long before); every other block was copied ahead.
    assert swap.waits - first_waits <= 2 < first_waits
    assert max(resident) <= 2 * SLOTS


def test_a_run_with_block_swap_trains_the_same_lora(tmp_path):
    dataset = make_dataset(tmp_path / "images")
    common = ["train.max_steps=3", "train.gradient_checkpointing=true"]
    plain = train(tiny_config("zimage", dataset, tmp_path / "plain", *common))
    events = []
    swapped = train(tiny_config("zimage", dataset, tmp_path / "swapped", *common, "model.block_swap=3"), events.append)
    assert any("Block swap: the frozen weights of the last 3" in str(getattr(e, "text", "")) for e in events)
    expected, actual = load_file(plain.lora_path), load_file(swapped.lora_path)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)


def test_settings_that_cannot_swap_are_refused_before_loading(tmp_path):
    dataset = make_dataset(tmp_path / "images")
    with pytest.raises(TrainingError, match="needs train.gradient_checkpointing"):
        train(tiny_config("zimage", dataset, tmp_path / "a", "model.block_swap=2"))
    with pytest.raises(TrainingError, match="does not work with model.quantize"):
        train(tiny_config("zimage", dataset, tmp_path / "b", "model.block_swap=2", "model.quantize=int8",
                          "train.gradient_checkpointing=true"))
    with pytest.raises(BlockSwapError, match="has no repeated transformer blocks"):
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(ensure_builtin("builtin:tiny-sd15") / "unet")
        attach_block_swap(unet, 2, torch.device("cpu"), True, "none")
    with pytest.raises(BlockSwapError, match="repeated blocks. Set it to"):
        attach_block_swap(tiny_zimage_transformer(), 99, torch.device("cpu"), True, "none")
    assert build_config(overrides=["model.block_swap=4"]).model.block_swap == 4

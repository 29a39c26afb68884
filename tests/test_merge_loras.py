"""model.merge_loras: LoRA files fused into the base before training, checked to apply completely."""

from __future__ import annotations

import pytest
from helpers import make_dataset, tiny_config

torch = pytest.importorskip("torch")

from lora_gui.config import ConfigError, build_config  # noqa: E402
from lora_gui.engine.checkpoint import list_checkpoints  # noqa: E402
from lora_gui.engine.errors import TrainingError  # noqa: E402
from lora_gui.engine.merge import MergeEntry, merge_loras, parse_merge_entry  # noqa: E402
from lora_gui.events import Status  # noqa: E402

pytestmark = pytest.mark.slow


def test_entries_parse_paths_and_scales():
    assert parse_merge_entry("loras/a.safetensors") == MergeEntry("loras/a.safetensors", 1.0)
    assert parse_merge_entry(" loras/a.safetensors:0.75 ") == MergeEntry("loras/a.safetensors", 0.75)
    assert parse_merge_entry(r"C:\loras\a.safetensors") == MergeEntry(r"C:\loras\a.safetensors", 1.0)
    assert parse_merge_entry(r"C:\loras\a.safetensors:-1e-1") == MergeEntry(r"C:\loras\a.safetensors", -0.1)
    with pytest.raises(ConfigError, match="model.merge_loras.*not a .safetensors file"):
        build_config(overrides=['model.merge_loras=["style.ckpt"]'])


@pytest.fixture(scope="module")
def trained_lora(tmp_path_factory):
    from lora_gui.engine.train import train

    root = tmp_path_factory.mktemp("merge")
    dataset = make_dataset(root / "images")
    result = train(tiny_config("sd15", dataset, root / "style", "train.max_steps=3", "train.learning_rate=0.05"))
    return root, dataset, result.lora_path


def load_sd15():
    from lora_gui.engine.families.registry import get_family

    family = get_family("sd15")
    config = build_config(preset="sd15-cpu-demo")
    return family, family.load(config.model, torch.device("cpu"), torch.float32, lambda event: None)


def test_fused_weights_equal_the_base_plus_the_scaled_lora(trained_lora):
    from safetensors.torch import load_file

    _, _, lora_path = trained_lora
    family, base = load_sd15()
    _, merged = load_sd15()
    seen = []
    merge_loras(family, merged, [f"{lora_path}:0.5"], seen.append)
    assert any(isinstance(e, Status) and e.text.startswith("Merged") and "at scale 0.5" in e.text for e in seen)
    assert not any("lora" in name for name, _ in merged.denoiser.named_parameters())  # unloaded after fusing

    diffusers_file = lora_path.replace(".safetensors", ".diffusers.safetensors")
    state = load_file(diffusers_file)
    down = state["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"]
    up = state["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"]
    config = build_config(preset="sd15-cpu-demo")
    scaling = config.lora.alpha / config.lora.rank
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    before, after = dict(base.denoiser.named_parameters())[name], dict(merged.denoiser.named_parameters())[name]
    torch.testing.assert_close(after, before + 0.5 * scaling * up.float() @ down.float(), atol=1e-5, rtol=1e-4)


def test_a_run_trains_on_the_merged_base_and_resume_keeps_the_list(trained_lora, tmp_path):
    from lora_gui.engine.train import train

    root, dataset, lora_path = trained_lora
    seen = []
    config = tiny_config("sd15", dataset, tmp_path / "on-top", "train.max_steps=2",
                         f'model.merge_loras=["{lora_path}:0.8"]')
    result = train(config, lambda event: seen.append(event.text) if isinstance(event, Status) else None)
    assert result.status == "finished"
    assert any(text.startswith("Merged") for text in seen)
    checkpoint = list_checkpoints(tmp_path / "on-top")[-1]
    without = tiny_config("sd15", dataset, tmp_path / "on-top", "train.max_steps=4")
    with pytest.raises(TrainingError, match="model.merge_loras is .* but the checkpoint was trained with merge_loras"):
        train(without, resume_from=checkpoint)


def test_a_lora_for_another_family_is_refused(trained_lora, tmp_path):
    from lora_gui.engine.families.registry import get_family
    from lora_gui.engine.train import train

    _, dataset, lora_path = trained_lora
    with pytest.raises(TrainingError, match="does not fit this base model"):
        train(tiny_config("flux", dataset, tmp_path / "flux", "train.max_steps=1",
                          f'model.merge_loras=["{lora_path}"]'))
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(TrainingError, match="model.merge_loras: .*does not exist"):
        merge_loras(get_family("sd15"), load_sd15()[1], [str(missing)], lambda event: None)


def test_a_distilled_base_is_warned_about(trained_lora, tmp_path):
    from lora_gui.engine.train import train

    _, dataset, _ = trained_lora
    for base, warned in (("builtin:tiny-flux-schnell", True), ("builtin:tiny-flux", False)):
        seen: list = []
        train(tiny_config("flux", dataset, tmp_path / base.split(":")[1], "train.max_steps=1", f"model.base={base}"),
              seen.append)
        texts = [event.text for event in seen if isinstance(event, Status)]
        assert any(text.startswith("Warning: this base is step-distilled") for text in texts) == warned, base

"""model.quantize_text_encoders: the frozen text encoders run in int8 (optimum-quanto) or nf4 (bitsandbytes)
for the one-time caption encoding; the embeddings stay close to full precision's, and a run trains with them."""

from __future__ import annotations

import pytest
from helpers import make_dataset, tiny_config

torch = pytest.importorskip("torch")

from lora_gui.config import build_config  # noqa: E402
from lora_gui.engine.errors import TrainingError  # noqa: E402
from lora_gui.engine.families.registry import get_family  # noqa: E402
from lora_gui.engine.quantize import quantize_text_encoder  # noqa: E402
from lora_gui.engine.train import train  # noqa: E402

pytestmark = pytest.mark.slow
CAPTIONS = ["sks, a red square on a table", "a blue circle"]


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_encoder_embeddings_stay_close(mode):
    family = get_family("zimage")
    config = build_config(preset="zimage-cpu-demo")
    components = family.load(config.model, torch.device("cpu"), torch.float32, lambda event: None)
    with torch.no_grad():
        full = family.encode_prompts(components, CAPTIONS)["prompt_embeds"]
        count = quantize_text_encoder(components.text_encoders[0], mode, torch.device("cpu"))
        quantized = family.encode_prompts(components, CAPTIONS)["prompt_embeds"]
    assert count > 0
    assert not torch.equal(full, quantized)  # the weights really changed
    similarity = torch.nn.functional.cosine_similarity(full.flatten(1), quantized.flatten(1)).min()
    assert similarity > 0.95, similarity


def test_a_run_trains_with_int8_text_encoders_and_refuses_them_with_text_encoder_training(tmp_path):
    dataset = make_dataset(tmp_path / "images")
    events = []
    result = train(tiny_config("qwen-image", dataset, tmp_path / "out", "train.max_steps=2", "sample.every=2",
                               "model.quantize_text_encoders=int8"), events.append)
    assert result.status == "finished"
    assert any("text encoder(s) to int8" in getattr(event, "text", "") for event in events)
    assert (tmp_path / "out" / "samples" / "step-000002" / "00.png").is_file()
    with pytest.raises(TrainingError, match="model.quantize_text_encoders cannot be used with lora.train_text_encoder"):
        train(tiny_config("sd15", dataset, tmp_path / "sd15", "model.quantize_text_encoders=int8",
                          "lora.train_text_encoder=true"))

"""The text encoders of the published models, for the memory planner: each release's transformers config
(the sizes that set its weights and activations; transformers fills in the rest) and how many tokens a
caption is encoded to. A test checks that each builds to the release's parameter count."""

from __future__ import annotations

from typing import Any, NamedTuple


class PlannedTextEncoder(NamedTuple):
    config: dict[str, Any]  # transformers config.json, with its "architectures"
    tokens: int  # a caption's token count as the family encodes it


def clip(hidden: int, intermediate: int, layers: int, heads: int, activation: str, with_projection: bool):
    return {"architectures": ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"],
            "model_type": "clip_text_model", "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": layers, "num_attention_heads": heads, "max_position_embeddings": 77,
            "vocab_size": 49408, "hidden_act": activation, "projection_dim": hidden}


def qwen3(architecture: str, hidden: int, intermediate: int, tied: bool) -> dict[str, Any]:
    return {"architectures": [architecture], "model_type": "qwen3", "hidden_size": hidden,
            "intermediate_size": intermediate, "num_hidden_layers": 36, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": tied}


CLIP_L = clip(768, 3072, 12, 12, "quick_gelu", False)  # 123 M parameters
CLIP_G = clip(1280, 5120, 32, 20, "gelu", True)  # 695 M, SDXL's second encoder
T5_XXL = {"architectures": ["T5EncoderModel"], "model_type": "t5", "d_model": 4096, "d_ff": 10240, "d_kv": 64,
          "num_heads": 64, "num_layers": 24, "vocab_size": 32128, "feed_forward_proj": "gated-gelu"}  # 4.76 B
QWEN3_4B = qwen3("Qwen3Model", 2560, 9728, True)  # 4.02 B, Z-Image
QWEN3_4B_CAUSAL = qwen3("Qwen3ForCausalLM", 2560, 9728, True)  # Flux.2 Klein 4B
QWEN3_8B = qwen3("Qwen3ForCausalLM", 4096, 12288, False)  # 8.19 B, Flux.2 Klein 9B
QWEN25_VL_7B = {  # 8.29 B with the vision tower, Qwen-Image
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", "tie_word_embeddings": False,
    "vocab_size": 152064,
    "text_config": {"model_type": "qwen2_5_vl_text", "hidden_size": 3584, "intermediate_size": 18944,
                    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                    "vocab_size": 152064, "tie_word_embeddings": False},
    "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                      "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                      "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "in_chans": 3},
}
MISTRAL_SMALL_31 = {  # 24.0 B with the vision tower, Flux.2 dev
    "architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3", "tie_word_embeddings": False,
    "spatial_merge_size": 2, "multimodal_projector_bias": False, "projector_hidden_act": "gelu",
    "vision_feature_layer": -1,
    "text_config": {"model_type": "mistral", "hidden_size": 5120, "intermediate_size": 32768, "num_hidden_layers": 40,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 131072,
                    "tie_word_embeddings": False},
    "vision_config": {"model_type": "pixtral", "hidden_size": 1024, "intermediate_size": 4096,
                      "num_hidden_layers": 24, "num_attention_heads": 16, "head_dim": 64, "patch_size": 14,
                      "image_size": 1540, "num_channels": 3},
}
PUBLISHED_PARAMETERS = {"CLIP_L": 123_060_480, "CLIP_G": 694_659_840, "T5_XXL": 4_762_310_656,
                        "QWEN3_4B": 4_022_468_096, "QWEN3_8B": 8_190_735_360, "QWEN25_VL_7B": 8_292_166_656,
                        "MISTRAL_SMALL_31": 24_011_361_280}

"""The built-in tiny Qwen-Image: its transformer, 5-D VAE and Qwen2.5-VL text encoder at toy size.

The pipeline wraps every caption in a fixed system template and drops the template's first tokens
(34 with Qwen's tokenizer) from the text encoder's output. So the tiny tokenizer is byte-level BPE
whose merges are learnt here from the template's words: the template's prefix comes out as exactly
as many tokens as the pipeline drops, and any other text still round-trips byte by byte.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]


def pipeline_template() -> tuple[str, int]:
    """The pipeline's caption template and how many of its leading tokens it drops (set by its constructor)."""
    from diffusers import QwenImagePipeline

    bare = QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None)
    return bare.prompt_template_encode, bare.prompt_template_encode_start_idx


def qwen_image_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    template, dropped = pipeline_template()
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, min_frequency=1, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator([template.format("")] * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                        model_max_length=1024 + dropped)
    count = len(tokenizer(template.split("{}")[0], add_special_tokens=False).input_ids)
    if count != dropped:
        raise RuntimeError(f"the tiny Qwen-Image tokenizer splits the template's prefix into {count} tokens; the "
                           f"pipeline drops {dropped}")
    return tokenizer


def tiny_qwen25_vl(tokenizer):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "vocab_size": len(tokenizer), "max_position_embeddings": 2048,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
            "bos_token_id": None, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 16,
              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "fullatt_block_indexes": [0]}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                              image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
                              video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
                              vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
                              vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"))
    return Qwen2_5_VLForConditionalGeneration(config)


def build_tiny_qwen_image(folder: Path, seed: int) -> None:
    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    torch.manual_seed(seed)
    tokenizer = qwen_image_tokenizer()
    text_encoder = tiny_qwen25_vl(tokenizer)
    generator = torch.Generator().manual_seed(seed)
    # trained statistics are far from 0 and 1: skipping them must show
    mean = (torch.randn(16, generator=generator) * 0.5).tolist()
    std = (torch.rand(16, generator=generator) * 1.5 + 0.5).tolist()
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
                                 temperal_downsample=[False, True, True], latents_mean=mean, latents_std=std)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                              axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(  # Qwen-Image's own schedule: exponential shift from the size
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
    )
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)
    pipe.save_pretrained(folder, safe_serialization=True)

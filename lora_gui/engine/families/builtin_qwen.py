"""Built-in tiny models whose text encoder is a Qwen-style chat model (Z-Image, Flux.2 Klein).

The tokenizer is byte-level BPE over the 256 byte symbols (any text round-trips) plus the chat
special tokens, with a chat template of the same shape as Qwen3's, made here so nothing is fetched.
"""

from __future__ import annotations

from pathlib import Path

CHAT_SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]
PAD_TOKEN = "<|endoftext|>"
# user/assistant turns; with enable_thinking false the assistant turn opens with an empty thinking block
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def chat_tokenizer(max_length: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lora_gui.engine.families.builtin import byte_symbols

    vocab = {symbol: index for index, symbol in enumerate(byte_symbols())}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD_TOKEN, eos_token="<|im_end|>",
                                        model_max_length=max_length)
    tokenizer.add_special_tokens({"additional_special_tokens": CHAT_SPECIAL_TOKENS})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_qwen3_config(tokenizer, layers: int, **extra):
    """A 16-wide Qwen3 over ``tokenizer`` with its special-token ids."""
    from transformers import Qwen3Config

    return Qwen3Config(
        hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
        head_dim=8, vocab_size=len(tokenizer), max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **extra,
    )


def build_tiny_zimage(folder: Path, seed: int) -> None:
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        ZImagePipeline,
        ZImageTransformer2DModel,
    )
    from transformers import Qwen3Model

    torch.manual_seed(seed)
    tokenizer = chat_tokenizer()
    text_encoder = Qwen3Model(tiny_qwen3_config(tokenizer, layers=2))
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
        axes_dims=[8, 4, 4], axes_lens=[256, 32, 32],
    )
    with torch.no_grad():  # the pad tokens start as constants: make them distinct, as trained ones are
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
        latent_channels=16, norm_num_groups=4, sample_size=128, shift_factor=0.1159, scaling_factor=0.3611,
        use_quant_conv=False, use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=6.0, use_dynamic_shifting=False)
    pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)
    pipe.save_pretrained(folder, safe_serialization=True)


def build_tiny_flux2_klein(folder: Path, seed: int) -> None:
    """A base (not distilled) Klein: 27 text-encoder layers so that hidden states 9, 18 and 27 exist."""
    import torch
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    tokenizer = chat_tokenizer()
    text_encoder = Qwen3ForCausalLM(tiny_qwen3_config(tokenizer, layers=27, tie_word_embeddings=True))
    vae = AutoencoderKLFlux2(
        sample_size=64, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
        latent_channels=16, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
    )
    with torch.no_grad():  # trained statistics are far from 0 and 1: skipping them must show
        vae.bn.running_mean.normal_(0.0, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=3 * 16, timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4], guidance_embeds=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=False)
    pipe.save_pretrained(folder, safe_serialization=True)

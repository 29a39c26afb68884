"""Built-in offline models: the real diffusers/transformers classes at tiny sizes.

Each is built from configs with random weights from a fixed seed, with tokenizers made
locally, and saved once as an ordinary diffusers folder in the cache. After that it loads
through exactly the same local-folder code path as a real downloaded model.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path

BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = {
    "tiny-sd15": "sd15",
    "tiny-sdxl": "sdxl",
    "tiny-flux": "flux",
    "tiny-flux-schnell": "flux",
    "tiny-zimage": "zimage",
    "tiny-flux2-klein": "flux2-klein",
    "tiny-flux2-dev": "flux2-dev",
    "tiny-qwen-image": "qwen-image",
}
# Bump when a builder changes so stale cached folders are rebuilt.
BUILTIN_VERSION = 1
SEED = 20240601
CLIP_MAX_LENGTH = 77


def is_builtin(base: str) -> bool:
    return base.startswith(BUILTIN_PREFIX)


def builtin_family(base: str) -> str:
    name = base[len(BUILTIN_PREFIX):]
    if name not in BUILTIN_MODELS:
        known = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS)
        raise ValueError(f"Unknown built-in model {base!r}. Built-in models: {known}")
    return BUILTIN_MODELS[name]


def default_cache_dir() -> Path:
    env = os.environ.get("LORA_GUI_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "lora-gui"


def ensure_builtin(base: str, cache_dir: str | Path | None = None) -> Path:
    """Return the folder of a built-in model, building it on first use."""
    builtin_family(base)  # validates the name
    name = base[len(BUILTIN_PREFIX):]
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    folder = root / "builtin" / f"{name}-v{BUILTIN_VERSION}"
    if (folder / "model_index.json").is_file():
        return folder
    root.joinpath("builtin").mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root / "builtin"))
    try:
        _BUILDERS[name](staging)
        try:
            staging.rename(folder)
        except OSError:  # another process finished first
            if not (folder / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


# ----------------------------------------------------------------------------- tokenizers


def _byte_level_clip_tokenizer(folder: Path):
    """A CLIP tokenizer whose vocabulary is the 256 bytes (plus word-final forms) and no merges."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    symbols = byte_symbols()
    vocab = {symbol: i for i, symbol in enumerate(symbols)}
    vocab.update({symbol + "</w>": i + len(symbols) for i, symbol in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    if "vocab_file" in inspect.signature(CLIPTokenizer.__init__).parameters:  # transformers 4.x
        files = {"vocab_file": str(folder / "vocab.json"), "merges_file": str(folder / "merges.txt")}
    else:
        files = {"vocab": vocab, "merges": []}
    tokenizer = CLIPTokenizer(**files, model_max_length=CLIP_MAX_LENGTH, pad_token="<|endoftext|>")
    return tokenizer


def byte_symbols() -> list[str]:
    """The printable stand-in character byte-level BPE uses for each of the 256 byte values."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[byte] for byte in range(256)]


def _unigram_t5_tokenizer():
    """A T5 tokenizer over a small unigram vocabulary of single characters."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import T5TokenizerFast

    characters = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-:;()"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + c, -3.0) for c in characters] + [(c, -4.0) for c in characters]
    model = models.Unigram(pieces, unk_id=2, byte_fallback=False)
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return T5TokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        extra_ids=0, model_max_length=512,
    )


def _clip_text_config(tokenizer, hidden_size: int, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=projection_dim or hidden_size,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        hidden_act="quick_gelu",
    )


# ----------------------------------------------------------------------------- components


def _vae(latent_channels: int, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=128,
        **extra,
    )


def _sd_scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
    )


def _build_sd15(folder: Path) -> None:
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(SEED)
    tokenizer = _byte_level_clip_tokenizer(folder / "_tok")
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer, 32))
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    pipe = StableDiffusionPipeline(
        vae=_vae(4), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=_sd_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(folder / "_tok")


def _build_sdxl(folder: Path) -> None:
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(SEED)
    tokenizer = _byte_level_clip_tokenizer(folder / "_tok")
    tokenizer_2 = _byte_level_clip_tokenizer(folder / "_tok2")
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer, 32))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(tokenizer_2, 64, projection_dim=32))
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32 + 64,
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=32 + 6 * time_embed_dim,
        norm_num_groups=8,
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(4, force_upcast=False), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=_sd_scheduler(),
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(folder / "_tok")
    shutil.rmtree(folder / "_tok2")


def _build_flux(folder: Path, guidance_embeds: bool = True) -> None:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(SEED)
    tokenizer = _byte_level_clip_tokenizer(folder / "_tok")
    tokenizer_2 = _unigram_t5_tokenizer()
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer, 32))
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
            feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
        )
    )
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16 * 4,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )
    vae = _vae(16, shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0 if guidance_embeds else 1.0, use_dynamic_shifting=guidance_embeds,
        base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(folder / "_tok")


_BUILDERS = {
    "tiny-sd15": _build_sd15,
    "tiny-sdxl": _build_sdxl,
    "tiny-flux": _build_flux,
    "tiny-flux-schnell": lambda folder: _build_flux(folder, guidance_embeds=False),
    "tiny-zimage": lambda folder: _build_tiny_zimage(folder),
    "tiny-flux2-klein": lambda folder: _build_tiny_flux2_klein(folder),
    "tiny-flux2-dev": lambda folder: _build_tiny_flux2_dev(folder),
    "tiny-qwen-image": lambda folder: _build_tiny_qwen_image(folder),
}


def _build_tiny_qwen_image(folder: Path) -> None:
    from lora_gui.engine.families.builtin_qwen_image import build_tiny_qwen_image

    build_tiny_qwen_image(folder, SEED)


def _build_tiny_flux2_dev(folder: Path) -> None:
    from lora_gui.engine.families.builtin_flux2_dev import build_tiny_flux2_dev

    build_tiny_flux2_dev(folder, SEED)


def _build_tiny_flux2_klein(folder: Path) -> None:
    from lora_gui.engine.families.builtin_qwen import build_tiny_flux2_klein

    build_tiny_flux2_klein(folder, SEED)


def _build_tiny_zimage(folder: Path) -> None:
    from lora_gui.engine.families.builtin_qwen import build_tiny_zimage

    build_tiny_zimage(folder, SEED)

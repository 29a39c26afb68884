"""The built-in tiny Flux.2 dev: a guidance-embedded Flux.2 transformer with a Mistral-3 text encoder.

As on the Hub, the tokenizer folder is a ``PixtralProcessor``'s, whose chat template (system prompt
and user turn, content given as lists of parts) is the one the pipeline's prompt encoding uses. The
tokenizer is byte-level BPE over the 256 byte symbols plus Mistral's control tokens, made here so
nothing is fetched.
"""

from __future__ import annotations

import json
from pathlib import Path

CONTROL_TOKENS = ["[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
# Text parts only; the processor's template. The tokenizer itself is saved without one, so reading the
# processor's template is what makes text-only encoding match the processor.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') "
    "| join('') %}{% endif %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]{{ text }}[/INST]"
    "{% else %}{{ text }}{{ eos_token }}{% endif %}{% endfor %}"
)
TEXT_LAYERS = 30  # the pipeline reads hidden states 10, 20 and 30


def mistral_tokenizer():
    """A byte-level tokenizer with Mistral's special and control tokens (no chat template of its own)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lora_gui.engine.families.builtin import byte_symbols

    vocab = {symbol: index for index, symbol in enumerate(["<unk>", "<s>", "</s>", "<pad>", *byte_symbols()])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>", model_max_length=512)
    tokenizer.add_special_tokens({"additional_special_tokens": CONTROL_TOKENS})
    return tokenizer


def write_processor_files(folder: Path) -> None:
    """Make ``folder`` (a saved tokenizer) a PixtralProcessor folder as the Hub ships it: the processor's and
    image processor's configs and the processor's chat template. Loading it as a processor needs torchvision."""
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    (folder / "processor_config.json").write_text(json.dumps({
        "processor_class": "PixtralProcessor", "patch_size": 8, "spatial_merge_size": 2, "image_token": "[IMG]",
        "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]",
    }, indent=2), encoding="utf-8")
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "PixtralImageProcessor", "processor_class": "PixtralProcessor",
        "patch_size": {"height": 8, "width": 8}, "size": {"longest_edge": 32}, "do_resize": True,
        "do_rescale": True, "do_normalize": True, "do_convert_rgb": True, "rescale_factor": 1 / 255,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    }, indent=2), encoding="utf-8")


def tiny_mistral3(tokenizer):
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        MistralConfig,
        PixtralVisionConfig,
    )

    text = MistralConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=TEXT_LAYERS, num_attention_heads=2,
        num_key_value_heads=2, head_dim=8, vocab_size=len(tokenizer), max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    vision = PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 head_dim=8, image_size=32, patch_size=8)
    config = Mistral3Config(text_config=text, vision_config=vision,
                            image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2)
    return Mistral3ForConditionalGeneration(config)


def build_tiny_flux2_dev(folder: Path, seed: int) -> None:
    import torch
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2Pipeline,
        Flux2Transformer2DModel,
    )

    torch.manual_seed(seed)
    tokenizer = mistral_tokenizer()
    text_encoder = tiny_mistral3(tokenizer)
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
        joint_attention_dim=3 * 16, timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4], guidance_embeds=True,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    pipe = Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         transformer=transformer)
    pipe.save_pretrained(folder, safe_serialization=True)
    write_processor_files(folder / "tokenizer")
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    index["tokenizer"] = ["transformers", "PixtralProcessor"]
    index_path.write_text(json.dumps(index, indent=2), encoding="utf-8")

"""Shared test helpers: a small real dataset on disk and configs for the built-in tiny models."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from lora_gui.config import TrainingConfig, build_config

CAPTIONS = [
    "sks, a red square on white",
    "sks, a blue circle",
    "sks, green stripes",
    "sks, a yellow triangle",
    "sks, a purple cross",
    "sks, orange dots",
]
SIZES = [(64, 64), (96, 64), (64, 96), (80, 80), (128, 64), (64, 64)]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange"]


def make_dataset(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index, (caption, size, color) in enumerate(zip(CAPTIONS, SIZES, COLORS, strict=True)):
        image = Image.new("RGB", size, "white")
        draw = ImageDraw.Draw(image)
        width, height = size
        draw.rectangle([width // 4, height // 4, 3 * width // 4, 3 * height // 4], fill=color)
        draw.line([0, 0, width, height], fill="black", width=3)
        image.save(folder / f"img{index}.png")
        (folder / f"img{index}.txt").write_text(caption, encoding="utf-8")
    return folder


def tiny_config(family: str, dataset: Path, output: Path, *overrides: str) -> TrainingConfig:
    return build_config(
        preset=f"{family}-cpu-demo" if family != "flux-schnell" else "flux-cpu-demo",
        overrides=[
            f"dataset.dir={dataset}",
            f"output.dir={output}",
            "output.name=test-lora",
            "train.max_steps=10",
            "output.save_every=0",
            "sample.every=0",
            "sample.steps=2",
            'sample.prompts=["sks, a red square"]',
            *overrides,
        ],
    )


def stop_resume_and_straight_loras(family: str, tmp_path: Path, *overrides: str):
    """The LoRA tensors of a 4-step run, and of one stopped at step 2 then resumed (expected equal)."""
    from safetensors.torch import load_file

    from lora_gui.engine.train import train
    from lora_gui.events import Controls, Progress

    dataset = make_dataset(tmp_path / "images")
    overrides = ("train.max_steps=4", "sample.every=0", "output.save_every=0", *overrides)
    straight = train(tiny_config(family, dataset, tmp_path / "straight", *overrides))
    controls = Controls()
    stopped = train(tiny_config(family, dataset, tmp_path / "split", *overrides),
                    lambda event: controls.stop() if isinstance(event, Progress) and event.step == 2 else None,
                    controls)
    assert stopped.status == "stopped" and stopped.step == 2
    resumed = train(tiny_config(family, dataset, tmp_path / "split", *overrides), resume_from=stopped.checkpoint)
    return load_file(straight.lora_path), load_file(resumed.lora_path), straight.lora_path


def cli_train_from_a_copied_builtin(family: str, tmp_path: Path):
    """``lora-gui train`` with model.family=auto on a local copy of ``builtin:tiny-<family>``."""
    import shutil
    import subprocess
    import sys

    from lora_gui.engine.families.builtin import ensure_builtin

    dataset = make_dataset(tmp_path / "images")
    folder = tmp_path / "base"
    shutil.copytree(ensure_builtin(f"builtin:tiny-{family}"), folder)
    return subprocess.run(
        [sys.executable, "-m", "lora_gui", "train", "--preset", f"{family}-cpu-demo", "--set", "model.family=auto",
         "--set", f"model.base={folder}", "--set", f"dataset.dir={dataset}", "--set", f"output.dir={tmp_path / 'out'}",
         "--set", "train.max_steps=2", "--set", "sample.every=0"],
        capture_output=True, text=True, timeout=300)


def flux2_original_layout(state: dict) -> dict:
    """A Flux.2 transformer's weights as Black Forest Labs' release names them (fused q/k/v, ``*.scale`` norms,
    ``final_layer`` with shift and scale swapped): the inverse of diffusers' single-file conversion."""
    import torch

    renames = [("x_embedder.", "img_in."), ("context_embedder.", "txt_in."),
               ("time_guidance_embed.timestep_embedder.linear_1.", "time_in.in_layer."),
               ("time_guidance_embed.timestep_embedder.linear_2.", "time_in.out_layer."),
               ("time_guidance_embed.guidance_embedder.linear_1.", "guidance_in.in_layer."),
               ("time_guidance_embed.guidance_embedder.linear_2.", "guidance_in.out_layer."),
               ("_modulation_img.linear.", "_modulation_img.lin."), ("_modulation_txt.linear.", "_modulation_txt.lin."),
               ("single_stream_modulation.linear.", "single_stream_modulation.lin."), ("proj_out.", "final_layer.linear.")]
    double = {"attn.norm_q.weight": "img_attn.norm.query_norm.scale", "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
              "attn.to_out.0": "img_attn.proj", "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
              "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
              "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale", "attn.to_add_out": "txt_attn.proj",
              "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2"}
    single = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2", "attn.norm_q.weight": "norm.query_norm.scale",
              "attn.norm_k.weight": "norm.key_norm.scale"}
    fused = {"attn.to_q": ("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
             "attn.add_q_proj": ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"))}
    original = {}
    for name, tensor in state.items():
        block, _, rest = name.partition(".")
        if block in ("transformer_blocks", "single_transformer_blocks"):
            index, _, inner = rest.partition(".")
            module, _, param = inner.rpartition(".")
            target = "double_blocks" if block == "transformer_blocks" else "single_blocks"
            if block == "transformer_blocks" and module in fused:
                bfl, parts = fused[module]
                original[f"{target}.{index}.{bfl}.{param}"] = torch.cat(
                    [state[f"{block}.{index}.{part}.{param}"] for part in parts])
                continue
            if module.endswith(("to_k", "to_v", "add_k_proj", "add_v_proj")) and block == "transformer_blocks":
                continue
            table = double if block == "transformer_blocks" else single
            mapped = table.get(inner) or f"{table[module]}.{param}"
            original[f"{target}.{index}.{mapped}"] = tensor
            continue
        if name.startswith("norm_out.linear."):
            shift, scale = tensor.chunk(2, dim=0)  # diffusers keeps (scale, shift); the release (shift, scale)
            original[name.replace("norm_out.linear.", "final_layer.adaLN_modulation.1.")] = torch.cat([scale, shift])
            continue
        for old, new in renames:
            name = name.replace(old, new)
        original[name] = tensor
    return original


VAE_ATTENTION_NAMES = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def _renamed(rest: str) -> str:
    for new, old in VAE_ATTENTION_NAMES:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def ldm_vae_key(key: str, blocks: int) -> str:
    """A diffusers AutoencoderKL tensor name as the original (LDM, Black Forest Labs) release names it."""
    coder, kind, *rest = key.split(".")
    if kind in ("down_blocks", "up_blocks"):
        down = kind == "down_blocks"
        block = int(rest[0]) if down else blocks - 1 - int(rest[0])
        name = "down" if down else "up"
        if rest[1] in ("downsamplers", "upsamplers"):
            return f"{coder}.{name}.{block}.{name}sample.conv.{'.'.join(rest[4:])}"
        return f"{coder}.{name}.{block}.block.{rest[2]}.{'.'.join(rest[3:]).replace('conv_shortcut', 'nin_shortcut')}"
    if kind == "mid_block":
        tail = ".".join(rest[2:])
        if rest[0] == "resnets":
            return f"{coder}.mid.block_{int(rest[1]) + 1}.{tail.replace('conv_shortcut', 'nin_shortcut')}"
        return f"{coder}.mid.attn_1.{_renamed(tail)}"
    return f"{coder}.norm_out.{rest[0]}" if kind == "conv_norm_out" else key

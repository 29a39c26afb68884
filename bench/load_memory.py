"""Peak system memory while a run loads its base model, against the size of each part.

Builds a Z-Image folder with random bf16 weights: the transformer at full width (dim 3840) and the
Qwen3-4B text encoder at full width (hidden 2560), each with fewer blocks so that both fit this
machine's disk and memory (``--transformer-layers``, ``--text-encoder-layers``); tokenizer, scheduler
and a small VAE come from the built-in tiny model. Then it starts a real run on the CPU
(``lora_gui.engine.train``) in a fresh process and stops it once the transformer is loaded (before
LoRA and the first step). It reports that process's peak resident set (VmHWM, which counts pages of the
memory-mapped weight files it touched) and its peak private memory (RssAnon, sampled every 20 ms: what
cannot be dropped and read back from the files), with bf16 weights (read in place from the files) and
fp32 weights (every weight copied), against the size of the largest part and of all parts.

    python bench/load_memory.py                       # 3.6 GB transformer, 3.2 GB text encoder
    python bench/load_memory.py --transformer-layers 20 --text-encoder-layers 24
    python bench/load_memory.py --full qwen-image --quantize nf4

``--full FAMILY`` writes that family's transformer at its published size instead (Qwen-Image: 20 B
parameters, a 41 GB bf16 file, written shard by shard so that building it needs no more memory than a
block), with the built-in tiny model's text encoder and VAE; ``--quantize`` quantizes it as it loads, and
the run stops once it is quantized.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

GIB = 1024**3


def build_folder(folder: Path, transformer_layers: int, text_encoder_layers: int) -> dict[str, float]:
    """The model folder; returns the size of each part's weights file in GiB."""
    import torch
    from diffusers import ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from lora_gui.engine.families.builtin import ensure_builtin

    shutil.copytree(ensure_builtin("builtin:tiny-zimage"), folder)
    tiny = json.loads((folder / "text_encoder" / "config.json").read_text())
    torch.manual_seed(0)
    config = Qwen3Config(hidden_size=2560, intermediate_size=9728, num_hidden_layers=text_encoder_layers,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=tiny["vocab_size"],
                         pad_token_id=tiny["pad_token_id"], eos_token_id=tiny["eos_token_id"],
                         max_position_embeddings=4096, tie_word_embeddings=False)
    save_random(Qwen3Model(config).to(torch.bfloat16), folder / "text_encoder")
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=transformer_layers,
        n_refiner_layers=2, n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560,
        rope_theta=256.0, t_scale=1000.0, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512])
    save_random(transformer.to(torch.bfloat16), folder / "transformer")
    return {part: sum(f.stat().st_size for f in (folder / part).glob("*.safetensors")) / GIB
            for part in ("text_encoder", "transformer", "vae")}


def build_full_folder(folder: Path, family_name: str) -> dict[str, float]:
    """The built-in tiny model with its transformer replaced by a full-size one (random bf16 weights)."""
    from lora_gui.engine.families.builtin import ensure_builtin
    from lora_gui.engine.families.registry import get_family

    family = get_family(family_name)
    shutil.copytree(ensure_builtin(f"builtin:tiny-{family_name}"), folder)
    architecture = dict(next(iter(family.planning_architectures.values())))
    write_random_sharded(architecture, folder / family.denoiser_key)
    return {part: sum(f.stat().st_size for f in (folder / part).glob("*.safetensors")) / GIB
            for part in ("text_encoder", family.denoiser_key, "vae")}


def write_random_sharded(architecture: dict, target: Path) -> None:
    """A diffusers model folder with random bf16 weights, one shard per top-level block: only one block's
    weights are ever in memory."""
    import torch
    from safetensors.torch import save_file

    from lora_gui.engine.planner.architecture import build_on_meta

    model = build_on_meta(architecture)
    shutil.rmtree(target, ignore_errors=True)
    model.save_config(target)
    groups: dict[str, list[tuple[str, torch.Size]]] = {}
    for name, tensor in model.state_dict().items():
        parts = name.split(".")
        key = ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]
        groups.setdefault(key, []).append((name, tensor.shape))
    weight_map, total = {}, 0
    for index, entries in enumerate(groups.values(), start=1):
        shard = f"diffusion_pytorch_model-{index:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 0.02) for name, shape in entries}
        save_file(tensors, target / shard)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, shard))
    (target / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}), encoding="utf-8")


def save_random(module, target: Path) -> None:
    """Small random weights (finite activations), written in place of the tiny model's."""
    import torch

    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0.0, 0.02)
    shutil.rmtree(target, ignore_errors=True)
    module.save_pretrained(target)


def measure(folder: Path, dataset: Path, output: Path, dtype: str, family: str = "zimage",
            quantize: str = "none") -> dict:
    """Runs in a fresh process: a real run that stops once the transformer is loaded."""
    from lora_gui.config import build_config
    from lora_gui.engine.train import train
    from lora_gui.events import Controls, Status

    controls, timeline = Controls(), []

    def watch(event) -> None:
        if isinstance(event, Status):
            timeline.append((event.text, status_gib("VmHWM"), status_gib("RssAnon")))
            if event.text == "Loading the transformer" and quantize == "none":
                controls.stop()  # honoured right after the transformer is loaded
            if event.text.startswith("Quantized") and "transformer" in event.text:
                controls.stop()  # honoured before the first step

    config = build_config(preset=f"{family}-cpu-demo", overrides=[
        f"model.base={folder}", f"model.family={family}", f"model.weight_dtype={dtype}", "model.device=cpu",
        f"model.quantize={quantize}",
        f"dataset.dir={dataset}", f"output.dir={output}", "dataset.resolution=256", "sample.every=0"])
    peak_private, done = [0.0], threading.Event()

    def sample_private() -> None:  # every 20 ms: transient copies while a part loads count too
        while not done.wait(0.02):
            peak_private[0] = max(peak_private[0], status_gib("RssAnon"))

    sampler = threading.Thread(target=sample_private, daemon=True)
    sampler.start()
    try:
        result = train(config, watch, controls)
    finally:
        done.set()
        sampler.join()
    return {"weight_dtype": dtype, "status": result.status, "peak_rss_gib": round(status_gib("VmHWM"), 2),
            "peak_private_gib": round(peak_private[0], 2),
            "peak_before_transformer_gib": round(next(rss for text, rss, _ in timeline
                                                      if text == "Loading the transformer"), 2),
            "anonymous_at_end_gib": round(status_gib("RssAnon"), 2),
            "timeline": [(text[:60], round(rss, 2), round(anon, 2)) for text, rss, anon in timeline]}


def status_gib(field: str) -> float:
    """A memory figure of this process from /proc (VmHWM: peak resident set since exec, unlike ru_maxrss,
    which keeps the parent's peak across fork and exec; RssAnon: private memory, which cannot be dropped
    and read back from the weight files)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024**2
    return float("nan")


def make_dataset(folder: Path) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    for index, color in enumerate(("red", "blue", "green", "white")):
        Image.new("RGB", (256, 256), color).save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text(f"a {color} square", encoding="utf-8")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transformer-layers", type=int, default=10)
    parser.add_argument("--text-encoder-layers", type=int, default=12)
    parser.add_argument("--full", default=None, metavar="FAMILY", help="a full-size transformer of this family")
    parser.add_argument("--quantize", default="none", choices=["none", "int8", "nf4", "fp8"])
    parser.add_argument("--work", default=None, help="Scratch folder (default: a temporary one, removed after).")
    parser.add_argument("--measure", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        folder, dataset, output, dtype, family, quantize = args.measure
        print(json.dumps(measure(Path(folder), Path(dataset), Path(output), dtype, family, quantize)))
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="lora-gui-load-"))
    try:
        family = args.full or "zimage"
        sizes = (build_full_folder(work / "model", family) if args.full
                 else build_folder(work / "model", args.transformer_layers, args.text_encoder_layers))
        dataset = make_dataset(work / "images")
        parts = {k: round(v, 2) for k, v in sizes.items()}
        print(json.dumps({"parts_gib_bf16": parts}))
        kinds = (("bf16", 1),) if args.full else (("bf16", 1), ("fp32", 2))  # fp32 copies every weight
        for dtype, scale in kinds:
            answer = subprocess.run([sys.executable, __file__, "--measure", str(work / "model"), str(dataset),
                                     str(work / f"out-{dtype}"), dtype, family, args.quantize],
                                    capture_output=True, text=True, check=True)
            measured = json.loads(answer.stdout.strip().splitlines()[-1])
            print(json.dumps({**measured, "largest_part_gib": round(scale * max(sizes.values()), 2),
                              "sum_of_parts_gib": round(scale * sum(sizes.values()), 2)}))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""``lora-gui plan CONFIG``: the traced memory plan of a config's training step, before loading anything."""

from __future__ import annotations

import argparse
import sys

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_plan_command(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "plan", help="how much GPU memory a config's training needs (traced, no download)",
        description="Run the config's training step on fake tensors at full size and report the peak GPU memory, "
                    "split into weights, LoRA, gradients, optimizer state and activations. Takes seconds to a "
                    "minute on a CPU; loads no weights.")
    parser.add_argument("config", nargs="?", help="config file (.toml, .yaml or .json); optional with --preset/--set")
    parser.add_argument("--preset", help="preset applied under the config file (see `lora-gui presets`)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. --set dataset.resolution=768 (repeatable)")
    parser.add_argument("--vram", type=float, metavar="GB",
                        help="the card to check against (default: this machine's GPU, if it has one)")
    parser.set_defaults(func=run_plan)
    return parser


def run_plan(args) -> int:
    from lora_gui.config import build_config
    from lora_gui.engine.planner import HEADROOM, PlanError, plan_memory
    from lora_gui.engine.planner.advice import fitting_advice

    if not (args.config or args.preset or args.overrides):
        print("error: give a config file, a --preset or --set options, e.g. lora-gui plan --preset flux-24gb",
              file=sys.stderr)
        return EXIT_USAGE
    if args.vram is not None and not 0 < args.vram <= 4096:
        print(f"error: --vram {args.vram:g} is not a card size in GB; give e.g. --vram 24", file=sys.stderr)
        return EXIT_USAGE
    config = build_config(file=args.config, preset=args.preset, overrides=args.overrides)
    print("Tracing the training step on fake tensors ...", file=sys.stderr, flush=True)
    try:
        plan = plan_memory(config)
    except PlanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print("\n".join(plan.lines()))
    print(plan.time_line(_local_tflops() if args.vram is None else None))
    card = args.vram if args.vram is not None else _gpu_gib()
    captions = plan.caption_line(card)
    if captions:
        print(captions)
    if card is None:
        print("No GPU here: give --vram GB to check the plan against a card.")
        return EXIT_OK
    print(f"Verdict: {plan.verdict(card)}.")
    if plan.headroom(card) < HEADROOM:
        print(f"To fit with {int(100 * HEADROOM)}% to spare: {fitting_advice(config, plan, card)}")
    return EXIT_OK


def refuse_if_too_big(config) -> str | None:
    """Before ``train`` loads anything on a GPU: the reasons it cannot fit, or None (fits, no GPU, or no plan)."""
    card = _gpu_gib()
    if card is None or config.model.device == "cpu":
        return None
    from lora_gui.engine.launch_env import launch_from_environment

    if config.train.shard_model and launch_from_environment().world_size > 1:
        print("Memory plan skipped: it counts one GPU holding the whole model, and train.shard_model spreads the "
              "model over the GPUs.", file=sys.stderr)
        return None
    from lora_gui.engine.planner import PlanError, plan_memory
    from lora_gui.engine.planner.advice import fitting_advice

    print("Checking the memory plan (lora-gui plan) ...", file=sys.stderr, flush=True)
    try:
        plan = plan_memory(config)
    except PlanError as exc:
        print(f"Memory plan skipped: {exc}", file=sys.stderr)
        return None
    if plan.total_bytes <= card * 1024**3:
        print(f"Memory plan: {plan.verdict(card)}.", file=sys.stderr)
        return None
    lines = "\n".join(f"  {line}" for line in plan.lines())
    return f"error: this run {plan.verdict(card)}.\n{lines}\n{fitting_advice(config, plan, card)} To start anyway, add --no-plan."


def _gpu_gib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / 1024**3


def _local_tflops() -> float | None:
    """This machine's GPU's measured matrix speed (None without one)."""
    import torch

    from lora_gui.engine.devices import measured_matmul_tflops

    return measured_matmul_tflops(torch.device("cuda", 0)) if torch.cuda.is_available() else None

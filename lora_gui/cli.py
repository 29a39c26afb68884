"""The ``lora-gui`` command line. Heavy libraries load only inside the command that needs them."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_STOPPED = 0, 1, 2, 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-gui",
        description="Train LoRA adapters for diffusion image models (see `lora-gui presets` for the families).",
    )
    parser.add_argument("--version", action="store_true",
                        help="print the app's version, PyTorch's CUDA build and GPU, and the library versions")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    gui = commands.add_parser("gui", help="start the web app (the default command)")
    gui.add_argument("args", nargs=argparse.REMAINDER, help="options for the app")

    train = commands.add_parser("train", help="train a LoRA from a config file")
    train.add_argument("config", nargs="?", help="config file (.toml, .yaml or .json); optional with --preset/--set")
    train.add_argument("--preset", help="preset applied under the config file (see `lora-gui presets`)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a setting, e.g. --set lora.rank=32 (repeatable)")
    train.add_argument("--resume", metavar="CHECKPOINT_DIR",
                       help="continue from a checkpoint folder, or 'latest' for the newest one in output.dir")
    train.add_argument("--overwrite", action="store_true",
                       help="train from step 0 even if output.dir holds an earlier run (deletes its LoRA, "
                            "checkpoints, samples and metrics)")
    train.add_argument("--no-plan", action="store_true",
                       help="on a GPU, start even if the memory plan says the run does not fit")
    train.add_argument("--gpus", metavar="N", help="train on N GPUs of this machine (or 'all'), one process each, "
                                                   "started through accelerate launch; the effective batch is "
                                                   "train.batch_size x N x train.gradient_accumulation")
    train.add_argument("--events", action="store_true",
                       help="for programs that drive the run (the app): print the run's events as JSON lines on "
                            "stdout and read commands ({\"command\": \"pause\"}; pause, continue, sample, "
                            "save, stop) from stdin; stdin closing stops the run with a checkpoint")
    train.add_argument("--dataset-root", metavar="DIR",
                       help="read the dataset's images only inside DIR (links out of it are left out)")

    sample = commands.add_parser("sample", help="render images with a LoRA at one or more scales")
    sample.add_argument("--config", required=True, help="config file naming the base model and sample settings")
    sample.add_argument("--lora", required=True, action="append", help="LoRA .safetensors file (repeatable)")
    sample.add_argument("--scale", type=float, action="append", help="LoRA scale (repeatable; default 1.0)")
    sample.add_argument("--prompt", help="prompt (default: the config's first sample prompt)")
    sample.add_argument("--seed", type=int, help="seed (default: the config's sample.seed)")
    sample.add_argument("--out", default="samples.png", help="output PNG (default samples.png)")
    sample.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    init = commands.add_parser("init-config", help="write a config file to edit")
    init.add_argument("path", help="where to write it (.toml, .yaml or .json)")
    init.add_argument("--preset", help="start from a preset")
    init.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    commands.add_parser("presets", help="list the presets")

    from lora_gui.cli_caption import add_caption_command
    from lora_gui.cli_dataset import add_dataset_commands
    from lora_gui.cli_plan import add_plan_command

    add_dataset_commands(commands)
    add_caption_command(commands)
    add_plan_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    from lora_gui.quiet import quiet_expected_noise

    quiet_expected_noise()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        return run_version()
    handlers = {
        None: run_gui, "gui": run_gui, "train": run_train, "sample": run_sample,
        "init-config": run_init_config, "presets": run_presets,
    }
    if getattr(args, "func", None) is not None:
        handlers[args.command] = args.func
    from lora_gui.config import ConfigError

    try:
        return handlers[args.command](args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def run_version() -> int:
    from lora_gui.versions import version_report

    print("\n".join(version_report()))
    return EXIT_OK


def run_gui(args) -> int:
    extra = getattr(args, "args", None) or []
    from lora_gui.app_entry import launch_app

    return launch_app(extra)


def run_presets(_args) -> int:
    from lora_gui.config import list_presets, preset_description, unavailable_presets

    for name in list_presets():
        summary = preset_description(name).get("summary", "")
        print(f"{name:24s} {summary}")
    unavailable = unavailable_presets()
    if unavailable:
        print("\nTiers these families cannot fit (the memory planner's figures):")
        for name, reason in unavailable.items():
            print(f"{name:24s} {reason}")
    return EXIT_OK


def run_init_config(args) -> int:
    from lora_gui.config import build_config, save_config

    config = build_config(preset=args.preset, overrides=args.overrides)
    path = Path(args.path)
    if path.exists():
        print(f"error: {path} already exists; choose another name or delete it first.", file=sys.stderr)
        return EXIT_USAGE
    save_config(config, path)
    print(f"Wrote {path}. Edit it, then run: lora-gui train {path}")
    return EXIT_OK


def run_train(args) -> int:
    from lora_gui.cli_progress import ProgressPrinter
    from lora_gui.config import build_config
    from lora_gui.engine.launch_env import launch_from_environment

    # Under a launcher of several processes (accelerate launch, torchrun) they train one run together: every
    # process takes the same decisions below, and only the main one says them.
    main_process = launch_from_environment().is_main

    def refuse(text: str, code: int) -> int:
        if main_process:
            print(text, file=sys.stderr)
        return code

    if args.gpus is not None:
        from lora_gui.cli_gpus import (
            GpusRefused,
            accelerate_command,
            cuda_gpus,
            launch_on_gpus,
            wanted_processes,
        )

        if launch_from_environment().world_size > 1:
            return refuse("error: --gpus starts the processes itself; this command already runs under a launcher "
                          "of several processes. Leave --gpus out.", EXIT_USAGE)
        try:
            processes = wanted_processes(args.gpus, cuda_gpus())
        except GpusRefused as exc:
            return refuse(f"error: {exc}", EXIT_USAGE)
        if processes > 1:
            return launch_on_gpus(accelerate_command(args, processes))
    if not (args.config or args.preset or args.overrides):
        return refuse("error: give a config file, a --preset or --set options. Example: "
              "lora-gui train my-lora.toml   (create one with `lora-gui init-config my-lora.toml`)", EXIT_USAGE)
    config = build_config(file=args.config, preset=args.preset, overrides=args.overrides)
    resume = resolve_resume(args.resume, config)
    if resume is None and not args.overwrite:
        from lora_gui.engine.outputs import previous_run_problem

        problem = previous_run_problem(Path(config.output.dir), config.output.name)
        if problem:
            return refuse(f"error: {problem}; a new run would mix with it. Continue it with --resume latest, train "
                          "again from step 0 with --overwrite (deletes its LoRA, checkpoints, samples and metrics), "
                          "or choose another output.dir.", EXIT_USAGE)

    if not args.no_plan:
        from lora_gui.cli_plan import refuse_if_too_big

        refusal = refuse_if_too_big(config)
        if refusal:
            return refuse(refusal, EXIT_FAILED)

    from contextlib import nullcontext

    from lora_gui.data.scan import confined_to
    from lora_gui.engine.errors import TrainingError
    from lora_gui.engine.train import train
    from lora_gui.events import Controls, ignore_events

    controls = Controls()
    printer = ProgressPrinter(config.train.max_steps)
    emit = printer.handle if main_process else ignore_events
    if args.events and main_process:
        from lora_gui.event_lines import EventWriter, follow_commands

        emit = EventWriter(sys.stdout)
        follow_commands(sys.stdin, controls)
    restore = install_stop_handlers(controls, printer)
    try:
        with confined_to(Path(args.dataset_root)) if args.dataset_root else nullcontext():
            result = train(config, emit, controls, resume_from=resume, overwrite=args.overwrite)
    except TrainingError:
        return EXIT_FAILED  # the printer already showed the message and the hint
    except KeyboardInterrupt:
        printer.message("Stopped before training started; nothing was trained, so there is nothing to resume.")
        return EXIT_STOPPED
    finally:
        printer.close()
        restore()
    if args.events:  # the events said how it ended (a launcher reports any other code as a failure)
        return EXIT_OK
    if not main_process:
        return EXIT_STOPPED if result.status == "stopped" else EXIT_OK
    if result.status == "stopped":
        if result.checkpoint:
            print(f"Stopped. To continue, run the same command with --resume {result.checkpoint} "
                  "(or --resume latest).", file=sys.stderr)
        return EXIT_STOPPED
    print(f"Done: {result.lora_path}")
    return EXIT_OK


def resolve_resume(resume: str | None, config) -> str | None:
    if resume is None:
        return None
    if resume == "latest":
        from lora_gui.engine.checkpoint import latest_checkpoint

        found = latest_checkpoint(Path(config.output.dir))
        if found is None:
            from lora_gui.config import ConfigError

            raise ConfigError(f"--resume latest: no complete checkpoint in {config.output.dir}/checkpoints")
        return str(found)
    return resume


def install_stop_handlers(controls, printer):
    """Ctrl-C and SIGTERM ask the loop to save a resumable checkpoint and stop; repeats are harmless."""

    def request_stop(signum, _frame) -> None:
        if controls.stop_requested and not printer.training_started:
            raise KeyboardInterrupt  # nothing trained yet: a second request quits at once
        if controls.stop_requested:
            printer.message("Already stopping: saving a checkpoint, please wait.")
            return
        printer.message("Stopping after the current step and saving a resumable checkpoint...")
        controls.stop()

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, request_stop)

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def run_sample(args) -> int:
    from lora_gui.config import build_config
    from lora_gui.engine.compare import grid_image, load_pipeline, render_comparison
    from lora_gui.engine.sampling import SampleSettings

    config = build_config(file=args.config, overrides=args.overrides)
    for lora in args.lora:
        if not Path(lora).is_file():
            print(f"error: LoRA file {lora} does not exist.", file=sys.stderr)
            return EXIT_USAGE
    scales = args.scale or [1.0]
    family, components, pipeline = load_pipeline(config)
    settings = SampleSettings.from_config(config.sample, config.dataset.resolution, family.size_multiple)
    if args.prompt is not None:
        settings = _replace(settings, prompts=(args.prompt,))
    if args.seed is not None:
        settings = _replace(settings, seed=args.seed)

    def progress(done: int, total: int) -> None:
        print(f"rendered {done}/{total}", flush=True)

    try:
        cells = render_comparison(family, components, pipeline, args.lora, scales, settings, progress)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image = cells[0].image if len(cells) == 1 else grid_image(cells, scales)
    image.save(out)
    print(f"Wrote {out}")
    return EXIT_OK


def _replace(settings, **changes):
    from dataclasses import replace

    return replace(settings, **changes)


if __name__ == "__main__":
    sys.exit(main())

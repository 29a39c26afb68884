"""``lora-gui train CONFIG --gpus N`` (or ``all``): the same command started by ``accelerate launch`` with N
processes, one per GPU, which train the run together (see ``engine/distributed.py``)."""

from __future__ import annotations

import signal
import subprocess
import sys


class GpusRefused(ValueError):
    pass


def wanted_processes(text: str | None, available: int) -> int:
    """The process count ``--gpus`` asks for: a positive number or ``all``, at most the GPUs there are."""
    if text is None:
        return 1
    if text.strip().lower() == "all":
        count = available
    else:
        try:
            count = int(text)
        except ValueError:
            raise GpusRefused(f"--gpus {text!r}: give a number of GPUs (for example --gpus 2) or --gpus all.") from None
        if count < 1:
            raise GpusRefused(f"--gpus {count}: give at least 1.")
    if count > available:
        raise GpusRefused(f"--gpus {text}: {count} GPU(s) asked, {available} CUDA GPU(s) found on this machine. "
                          "Training on several GPUs needs CUDA GPUs; use --gpus 1 (or leave it out) otherwise.")
    return max(count, 1)


def accelerate_command(args, processes: int) -> list[str]:
    """``accelerate launch`` running this train command (without ``--gpus``) in ``processes`` processes."""
    return launcher_command(processes, cuda=True) + train_arguments(args)


def launcher_command(processes: int, cuda: bool) -> list[str]:
    """The launcher starting ``processes`` processes of ``-m lora_gui``: ``accelerate launch`` on CUDA GPUs;
    on CPUs torchrun (``accelerate launch --cpu`` starts one process however many are asked for)."""
    if cuda:
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                str(processes), "-m", "lora_gui"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            "-m", "lora_gui"]


def train_arguments(args) -> list[str]:
    """``train`` and its options, as given (``--gpus`` left out)."""
    command = ["train"]
    if args.config:
        command.append(args.config)
    if args.preset:
        command += ["--preset", args.preset]
    for item in args.overrides:
        command += ["--set", item]
    if args.resume:
        command += ["--resume", args.resume]
    if getattr(args, "dataset_root", None):
        command += ["--dataset-root", args.dataset_root]
    flags = (("--overwrite", args.overwrite), ("--no-plan", args.no_plan), ("--events", getattr(args, "events", False)))
    return command + [flag for flag, given in flags if given]


def cuda_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def launch_on_gpus(command: list[str]) -> int:
    """Run the launcher, passing SIGTERM on to it (Ctrl-C reaches it through the terminal); its exit code."""
    process = subprocess.Popen(command)
    previous = signal.signal(signal.SIGTERM, lambda *_: process.send_signal(signal.SIGTERM))
    try:
        return process.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)

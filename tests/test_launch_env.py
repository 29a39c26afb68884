"""A launch of several processes (torchrun, accelerate launch, MPI) is refused once, before anything is written,
instead of every process training the whole run into the same folder."""

from __future__ import annotations

import subprocess
import sys

from helpers import make_dataset

from lora_gui.engine.launch_env import launch_from_environment


def test_the_launchers_variables_are_read():
    assert launch_from_environment({}).world_size == 1
    torchrun = launch_from_environment({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert (torchrun.world_size, torchrun.rank, torchrun.is_main, torchrun.variable) == (4, 3, False, "WORLD_SIZE")
    mpi = launch_from_environment({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"})
    assert (mpi.world_size, mpi.is_main) == (2, True)
    assert launch_from_environment({"WORLD_SIZE": "two", "RANK": ""}).world_size == 1


def test_torchrun_with_two_processes_is_refused_once_and_writes_nothing(tmp_path):
    dataset = make_dataset(tmp_path / "images")
    output = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "lora_gui", "train", "--preset", "sd15-cpu-demo", "--no-plan",
               "--set", f"dataset.dir={dataset}", "--set", f"output.dir={output}", "--set", "train.max_steps=2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    said = done.stdout + done.stderr
    assert said.count("error: this is process 0 of 2 (WORLD_SIZE=2") == 1, said[-3000:]
    assert "process 1 of 2" not in said
    assert not output.exists()  # nothing trained, nothing written

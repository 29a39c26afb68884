"""What the launchers (torchrun, accelerate launch, MPI) say about this process."""

from __future__ import annotations

from lora_gui.engine.launch_env import launch_from_environment


def test_the_launchers_variables_are_read():
    assert launch_from_environment({}).world_size == 1
    torchrun = launch_from_environment({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert (torchrun.world_size, torchrun.rank, torchrun.is_main, torchrun.variable) == (4, 3, False, "WORLD_SIZE")
    mpi = launch_from_environment({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"})
    assert (mpi.world_size, mpi.is_main) == (2, True)
    assert launch_from_environment({"WORLD_SIZE": "two", "RANK": ""}).world_size == 1

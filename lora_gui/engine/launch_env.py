"""What a process launcher says about this process: torchrun, ``accelerate launch``, MPI and cluster launchers set
the world size and this process's rank in the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
RANK_VARIABLES = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")


@dataclass(frozen=True)
class Launch:
    world_size: int
    rank: int
    variable: str  # the variable that set the world size

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launch_from_environment(environ: Mapping[str, str] | None = None) -> Launch:
    environ = os.environ if environ is None else environ
    world, variable = 1, ""
    for name in WORLD_SIZE_VARIABLES:
        if _number(environ.get(name)) is not None:
            world, variable = _number(environ[name]), name
            break
    rank = next((_number(environ[name]) for name in RANK_VARIABLES if _number(environ.get(name)) is not None), 0)
    return Launch(max(world, 1), max(rank, 0), variable)


def _number(text: str | None) -> int | None:
    try:
        return int(str(text).strip()) if text is not None else None
    except ValueError:
        return None

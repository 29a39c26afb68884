"""What the app process owns: the workspace, the one training runner, the run queue, and facts about the machine.

One ``AppSession`` is created per app process and handed to every tab; nothing lives in module
globals, so tests can build several apps side by side. Browser tabs come and go; the session stays.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from lora_gui.engine.runner import TrainingRunner
from lora_gui.ui.run_queue import QUEUE_FILE, RunQueue
from lora_gui.ui.run_view import SharedView
from lora_gui.ui.workspace import Workspace
from lora_gui.versions import no_gpu_driver


@dataclass(frozen=True)
class GpuInfo:
    name: str
    total_gib: float
    count: int = 1  # CUDA GPUs on this machine (the first one is named)

    @property
    def label(self) -> str:
        label = f"{self.name} ({self.total_gib:.0f} GB)" if self.total_gib else self.name
        return f"{self.count} x {label}" if self.count > 1 else label


@dataclass
class AppSession:
    workspace: Workspace
    runner: TrainingRunner = field(default_factory=TrainingRunner)
    # The Train tab's view of the run, rendered once per change and shared by every browser tab.
    train_view: SharedView = field(default_factory=SharedView)
    # Guards work that must not overlap (captioning, comparisons) across browser tabs.
    busy_lock: threading.Lock = field(default_factory=threading.Lock)
    # The Test tab's base model for finished runs (freed when a run starts); see ui/comparison.py.
    comparison_cache: Any = None
    # The config of the last Start/Resume, used to name the next preset down after an out-of-memory error.
    train_started_config: Any = None

    run_queue: RunQueue = field(init=False)

    def __post_init__(self) -> None:
        self.runner.confine_to = self.workspace.dataset_root  # trains on exactly what the Dataset tab shows
        self.run_queue = RunQueue(self.workspace.state / QUEUE_FILE, self.runner, self.prepare_queued_run,
                                  self.record_start)

    def prepare_queued_run(self, config, processes: int = 1):
        """A queued config as it will train, checked again as Start checks it (folders may have changed, and the
        GPUs it asked for must be there)."""
        from lora_gui.ui.run_start import chosen_processes, prepare_new_run

        chosen_processes(self, processes)
        return prepare_new_run(self, config)

    @property
    def gpu_count(self) -> int:
        return self.gpu.count if self.gpu is not None else 0

    def record_start(self, config) -> None:
        self.train_started_config = config

    @cached_property
    def gpu(self) -> GpuInfo | None:
        return detect_gpu()


def detect_gpu() -> GpuInfo | None:
    """The first CUDA GPU, or None. Imports torch (seconds) unless no GPU driver is installed."""
    if no_gpu_driver():
        return None
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return GpuInfo(name=props.name, total_gib=props.total_memory / 1024**3, count=torch.cuda.device_count())

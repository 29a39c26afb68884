"""Live tensor bytes by category, counted from the storages that ops create (works on fake tensors)."""

from __future__ import annotations

import weakref
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.weak import WeakIdKeyDictionary


class LiveBytes(TorchDispatchMode):
    """Inside the mode, every storage an op creates counts under ``phase`` until it is freed.

    Tensors that exist before (weights, LoRA parameters) are counted with ``track``; ``track`` also
    moves a known storage to another category (a gradient created in the backward pass). Views share
    their base's storage and are counted once. ``peak`` is the most bytes live at one time and
    ``peak_split`` the categories at that moment; ``phase_peaks`` has both for each phase.
    """

    def __init__(self, off_device: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.off_device = off_device  # categories counted in ``live`` but not in ``total`` (system memory)
        self.entries = WeakIdKeyDictionary()  # storage -> [category, bytes]
        self.live: dict[str, int] = defaultdict(int)
        self.total = 0
        self.peak = 0
        self.peak_split: dict[str, int] = {}
        self.phase = "activations"
        self.phase_peaks: dict[str, tuple[int, dict[str, int]]] = {}
        self._finalizers: list[weakref.ref] = []
        self.count_flops = False  # while True, FLOPs of the dispatched operations add up in ``flops``
        self.flops = 0

    def track(self, tensor: torch.Tensor, category: str, move: bool = True) -> None:
        storage = tensor.untyped_storage()
        entry = self.entries.get(storage)
        if entry is not None:
            if move and entry[0] != category:
                self.live[entry[0]] -= entry[1]
                self.live[category] += entry[1]
                self.total += self._on_device(category, entry[1]) - self._on_device(entry[0], entry[1])
                entry[0] = category
            return
        entry = [category, storage.nbytes()]
        self.entries[storage] = entry
        self.live[category] += entry[1]
        self.total += self._on_device(category, entry[1])
        self._finalizers.append(weakref.ref(storage, lambda _, entry=entry: self._free(entry)))
        if self.total > self.phase_peaks.get(self.phase, (-1, None))[0]:
            self.phase_peaks[self.phase] = (self.total, dict(self.live))
            if self.total > self.peak:
                self.peak, self.peak_split = self.total, self.phase_peaks[self.phase][1]

    def _on_device(self, category: str, size: int) -> int:
        return 0 if category in self.off_device else size

    def _free(self, entry: list) -> None:
        self.live[entry[0]] -= entry[1]
        self.total -= self._on_device(entry[0], entry[1])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        tree_map_only(torch.Tensor, lambda tensor: self.track(tensor, self.phase, move=False), result)
        if self.count_flops:
            from lora_gui.engine.planner.flops import op_flops

            self.flops += op_flops(func, args, kwargs, result)
        return result

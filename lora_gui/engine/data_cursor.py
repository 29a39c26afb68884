"""Where a run is in its data, and the batches it will train on loaded ahead of the step that needs them."""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

from lora_gui.engine.distributed import Distributed, Share


class DataCursor:
    """Where training is in the data: epoch, batch index and samples taken in the epoch, advanced one
    micro-batch at a time. ``batches`` replaces the epoch's batches for the current epoch only (a resume on
    another global batch size, see ``cursor_at``)."""

    def __init__(self, data, epoch: int = 0, batch_index: int = 0, batches: list[list[int]] | None = None,
                 samples_in_epoch: int | None = None) -> None:
        self.data = data
        self.epoch = epoch
        self.batch_index = batch_index
        self._batches = data.batches_for_epoch(epoch) if batches is None else batches
        self.samples_in_epoch = (sum(len(batch) for batch in self._batches[:batch_index])
                                 if samples_in_epoch is None else samples_in_epoch)

    def next(self) -> tuple[list[int], int]:
        if self.batch_index >= len(self._batches):
            self.epoch += 1
            self.batch_index = 0
            self.samples_in_epoch = 0
            self._batches = self.data.batches_for_epoch(self.epoch)
        indices = self._batches[self.batch_index]
        self.batch_index += 1
        self.samples_in_epoch += len(indices)
        return indices, self.epoch

    def upcoming(self, count: int) -> list[tuple[list[int], int]]:
        """The next ``count`` positions ``next()`` will return, without moving."""
        epoch, index, batches, positions = self.epoch, self.batch_index, self._batches, []
        while len(positions) < count:
            if index >= len(batches):
                epoch, index = epoch + 1, 0
                batches = self.data.batches_for_epoch(epoch)
                if not batches:
                    break
            positions.append((batches[index], epoch))
            index += 1
        return positions


def cursor_at(data, progress: dict, saved_batch: int) -> DataCursor:
    """The cursor at a checkpoint's place in the data, for this data's global batch size.

    A checkpoint records how many samples of its epoch were trained (``samples_in_epoch``) and its global batch
    (``global_batch``; older ones only the batch index, in batches of ``saved_batch``). With the same global
    batch the run goes on with the same batches. With another (another number of processes, or another
    ``train.batch_size``) the epoch's remaining samples, in the order the saved run would have taken them, are
    cut into batches of the new size, one bucket per batch; the next epochs are cut as usual. No sample of the
    epoch is skipped or taken twice."""
    epoch = int(progress.get("epoch", 0))
    saved_batch = int(progress.get("global_batch", saved_batch))
    saved_batches = data.batches_for_epoch(epoch, saved_batch)
    if "samples_in_epoch" in progress:
        samples = int(progress["samples_in_epoch"])
    else:
        samples = sum(len(batch) for batch in saved_batches[:int(progress.get("batch_in_epoch", 0))])
    if saved_batch == data.batch_size:
        taken, index = 0, 0
        while index < len(saved_batches) and taken < samples:
            taken += len(saved_batches[index])
            index += 1
        if taken == samples:
            return DataCursor(data, epoch, index, saved_batches, samples)
    remaining = [sample for batch in saved_batches for sample in batch][samples:]
    return DataCursor(data, epoch, 0, regrouped(remaining, data.bucket_of, data.batch_size), samples)


def regrouped(samples: list[int], bucket_of, batch_size: int) -> list[list[int]]:
    """``samples`` cut into batches of ``batch_size`` from one bucket each, in the order of their first sample."""
    open_batches: dict = {}
    batches: list[list[int]] = []
    for sample in samples:
        bucket = bucket_of(sample)
        if bucket not in open_batches or len(open_batches[bucket]) == batch_size:
            open_batches[bucket] = []
            batches.append(open_batches[bucket])
        open_batches[bucket].append(sample)
    return batches


class BatchPrefetcher:
    """The cursor's batches, loaded ``workers`` at a time on background threads while a step runs
    (``dataset.num_workers``; 0 loads each batch when it is needed). Loading a batch is a pure function of
    its position, so prefetching changes nothing but the time it takes."""

    def __init__(self, data, cursor: DataCursor, workers: int, dist: Distributed | None = None) -> None:
        self.data, self.cursor, self.workers, self.dist = data, cursor, workers, dist
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="lora-gui-batches") if workers else None
        self.pending: deque[tuple[tuple, Future]] = deque()
        self.share: Share | None = None  # this process's part of the last global batch (distributed runs)

    def _local(self, indices: list[int]) -> list[int]:
        return indices if self.dist is None else indices[self.dist.share(len(indices)).positions]

    def next(self):
        indices, epoch = self.cursor.next()
        if self.dist is not None:
            self.share = self.dist.share(len(indices))
            indices = indices[self.share.positions]
        if self.pool is None:
            return self.data.load_batch(indices, epoch)
        wanted = (tuple(indices), epoch)
        while self.pending and self.pending[0][0] != wanted:
            self.pending.popleft()[1].cancel()
        future = self.pending.popleft()[1] if self.pending else self.pool.submit(self.data.load_batch, indices, epoch)
        queued = {key for key, _ in self.pending}
        for ahead_indices, ahead_epoch in self.cursor.upcoming(self.workers * 2):
            ahead_indices = self._local(ahead_indices)
            key = (tuple(ahead_indices), ahead_epoch)
            if key not in queued:
                self.pending.append((key, self.pool.submit(self.data.load_batch, ahead_indices, ahead_epoch)))
                queued.add(key)
        return future.result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

"""Printing engine events on a terminal: a progress bar for steps, lines for everything else."""

from __future__ import annotations

import sys

from lora_gui.events import CheckpointSaved, Event, Failed, Finished, Progress, SamplesReady, Status, Stopped


class ProgressPrinter:
    def __init__(self, max_steps: int) -> None:
        self.max_steps = max_steps
        self._bar = None
        self._last_status = ""

    def _ensure_bar(self, initial: int):
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=self.max_steps, initial=initial, unit="step", dynamic_ncols=True,
                             file=sys.stderr)
        return self._bar

    def message(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    @property
    def training_started(self) -> bool:
        """Whether a step was taken (before that, nothing is lost by quitting at once)."""
        return self._bar is not None

    def handle(self, event: Event) -> None:
        if isinstance(event, Progress):
            bar = self._ensure_bar(event.step - 1)
            bar.update(event.step - bar.n)
            bar.set_postfix(loss=f"{event.loss:.4f}", lr=f"{event.lr:.2e}", epoch=event.epoch, refresh=False)
        elif isinstance(event, Status):
            self._status(event)
        elif isinstance(event, SamplesReady):
            self.message(f"Validation images for step {event.step}: {event.paths[0].rsplit('/', 1)[0]}")
        elif isinstance(event, CheckpointSaved):
            self.message(f"Checkpoint saved: {event.path}")
        elif isinstance(event, Stopped):
            self.message(f"Stopped at step {event.step}.")
        elif isinstance(event, Finished):
            self.message(f"LoRA written: {event.lora_path} (diffusers format: {event.diffusers_path})")
        elif isinstance(event, Failed):
            self.message(f"error: {event.message}")
            if event.hint:
                self.message(f"what to do: {event.hint}")

    def _status(self, event: Status) -> None:
        # Counters ("Caching latents 3/20") print at the first and last item only.
        if event.total is not None and event.current not in (1, event.total):
            return
        if event.text != self._last_status:
            self._last_status = event.text
            self.message(event.text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

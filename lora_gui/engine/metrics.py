"""metrics.csv (one row per optimizer step) and optional TensorBoard logs."""

from __future__ import annotations

import csv
from pathlib import Path

# samples: the step's effective batch (batch size x processes x accumulation; empty in files of older runs)
HEADER = ("step", "epoch", "loss", "lr", "sec_per_step", "samples")


class MetricsLog:
    def __init__(self, output_dir: Path, resume_step: int = 0, tensorboard: bool = False) -> None:
        self.path = output_dir / "metrics.csv"
        self._keep_rows_up_to(resume_step)
        self._file = self.path.open("a", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file)
        if self._file.tell() == 0:
            self._writer.writerow(HEADER)
            self._file.flush()
        self._tensorboard = _tensorboard_writer(output_dir) if tensorboard else None

    def _keep_rows_up_to(self, step: int) -> None:
        """A resumed run continues the file; rows past the checkpoint's step belong to the abandoned run."""
        if not self.path.exists():
            return
        if step == 0:
            self.path.unlink()
            return
        with self.path.open(newline="", encoding="utf-8") as handle:
            rows = [row for row in csv.reader(handle)][1:]
        kept = [(row + [""] * len(HEADER))[:len(HEADER)] for row in rows
                if row and row[0].isdigit() and int(row[0]) <= step]
        tmp = self.path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(HEADER)
            writer.writerows(kept)
        tmp.replace(self.path)

    def log(self, step: int, epoch: int, loss: float, lr: float, sec_per_step: float, samples: int = 0) -> None:
        self._writer.writerow([step, epoch, f"{loss:.6g}", f"{lr:.6g}", f"{sec_per_step:.4f}", samples or ""])
        self._file.flush()
        if self._tensorboard is not None:
            self._tensorboard.add_scalar("train/loss", loss, step)
            self._tensorboard.add_scalar("train/lr", lr, step)
            self._tensorboard.add_scalar("train/sec_per_step", sec_per_step, step)

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


def _tensorboard_writer(output_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ValueError(
            "output.tensorboard is on but the tensorboard package is missing. "
            "Install it with `pip install tensorboard`, or set output.tensorboard = false."
        ) from exc
    return SummaryWriter(log_dir=str(output_dir / "tensorboard"))


def read_metrics(output_dir: str | Path):
    """The metrics of a run as a pandas DataFrame (empty when none were written yet)."""
    import pandas as pd

    path = Path(output_dir) / "metrics.csv"
    if not path.exists():
        return pd.DataFrame(columns=list(HEADER))
    return pd.read_csv(path)

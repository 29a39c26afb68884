"""What the Train tab shows about a run, computed from a ``RunSnapshot`` (no gradio here).

Every function is pure so it can be tested without a browser: status line, smoothed loss, plot
tables, the validation-image gallery, button states per run state, and error messages that say
what to do (for out-of-memory: the next VRAM preset down).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from lora_gui.engine.runner import RunSnapshot

ACTIVE_STATES = ("running", "paused", "stopping")
LOG_LINES = 200
PLOT_POINTS = 800
SMOOTHING = 0.9
STATE_LABELS = {
    "idle": "Idle", "running": "Running", "paused": "Paused", "stopping": "Stopping (saving a checkpoint)",
    "finished": "Finished", "stopped": "Stopped", "failed": "Failed",
}


# ----------------------------------------------------------------------------- buttons


def button_states(state: str) -> dict[str, bool]:
    """Which Train-tab controls apply in a run state (True: clickable)."""
    idle = state not in ACTIVE_STATES
    return {
        "start": idle,
        "resume_checkpoint": idle,
        "pause": state == "running",
        "continue": state == "paused",
        "stop": state in ("running", "paused"),
        "sample": state in ("running", "paused"),
        "save": state in ("running", "paused"),
    }


# ----------------------------------------------------------------------------- status line


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def status_markdown(snap: RunSnapshot) -> str:
    parts = [f"**{STATE_LABELS.get(snap.state, snap.state)}**"]
    if snap.state != "idle":
        parts.append(f"step {snap.step} / {snap.max_steps}")
        parts.append(f"epoch {snap.epoch}")
    if snap.loss is not None:
        parts.append(f"loss {snap.loss:.4f}")
    if snap.lr is not None:
        parts.append(f"lr {snap.lr:.2e}")
    if snap.sec_per_step is not None:
        parts.append(f"{snap.sec_per_step:.2f} s/step")
    if snap.state == "running" and snap.eta_seconds is not None:
        parts.append(f"ETA {format_duration(snap.eta_seconds)}")
    line = " · ".join(parts)
    if snap.state == "idle":
        return line + "\n\nNo training run yet: set up the Config tab, then press Start."
    detail = snap.status or ""
    if snap.state == "finished" and snap.result_path:
        detail = f"LoRA saved: `{snap.result_path}`"
    return f"{line}\n\n{detail}" if detail else line


def memory_text(report: dict[str, float] | None) -> str:
    """``engine.devices.memory_report`` as one line; None or empty means no CUDA GPU in use."""
    if not report:
        return "GPU memory: - (training on the CPU or no run yet)"
    return (f"GPU memory: {report['allocated_gib']:.1f} GiB in use, peak {report['peak_gib']:.1f} GiB "
            f"of {report['total_gib']:.1f} GiB")


# ----------------------------------------------------------------------------- plots


def smoothed(values: Sequence[float], beta: float = SMOOTHING) -> list[float]:
    """Exponential moving average with bias correction (as TensorBoard draws it)."""
    average, out = 0.0, []
    for count, value in enumerate(values, start=1):
        average = beta * average + (1 - beta) * value
        out.append(average / (1 - beta**count))
    return out


def _thin(count: int, limit: int) -> list[int]:
    """At most about ``limit`` evenly spaced indices, always including the last one."""
    if count <= limit:
        return list(range(count))
    stride = math.ceil(count / limit)
    indices = list(range(0, count, stride))
    return indices if indices[-1] == count - 1 else [*indices, count - 1]


def loss_frame(losses: Sequence[tuple[int, float, float]], limit: int = PLOT_POINTS):
    """Long-format table (step, loss, series) with raw and smoothed loss, for ``gr.LinePlot``."""
    import pandas as pd

    finite = [(step, loss) for step, loss, _ in losses if math.isfinite(loss)]
    steps = [step for step, _ in finite]
    raw = [loss for _, loss in finite]
    smooth = smoothed(raw)
    keep = _thin(len(steps), limit)
    rows = [(steps[i], raw[i], "raw") for i in keep] + [(steps[i], smooth[i], "smoothed") for i in keep]
    # object, not pandas 3's string dtype, which the plot cannot colour by
    return pd.DataFrame(rows, columns=["step", "loss", "series"]).astype({"step": "int64", "loss": "float64",
                                                                          "series": "object"})


def lr_frame(losses: Sequence[tuple[int, float, float]], limit: int = PLOT_POINTS):
    import pandas as pd

    keep = _thin(len(losses), limit)
    rows = [(losses[i][0], losses[i][2]) for i in keep]
    return pd.DataFrame(rows, columns=["step", "lr"]).astype({"step": "int64", "lr": "float64"})


# ----------------------------------------------------------------------------- images and log


def gallery_items(samples: Sequence) -> list[tuple[str, str]]:
    """(path, caption) of every validation image, newest step first, prompts in order within a step."""
    items = []
    for event in sorted(samples, key=lambda e: e.step, reverse=True):
        for path, prompt in zip(event.paths, event.prompts, strict=False):
            items.append((path, f"step {event.step} · {prompt}"))
    return items


def gallery_columns(samples: Sequence) -> int:
    """One gallery row per step: as many columns as the latest step has prompts (1 to 6)."""
    if not samples:
        return 2
    return max(1, min(6, len(samples[-1].paths)))


def log_text(lines: Sequence[str], limit: int = LOG_LINES) -> str:
    return "\n".join(lines[-limit:])


# ----------------------------------------------------------------------------- errors


def is_out_of_memory(error) -> bool:
    return "out of memory" in f"{error.message} {error.details}".lower()


def preset_tiers(family: str, presets: Sequence[str]) -> list[int]:
    """The VRAM tiers (GB) with a ``<family>-<N>gb`` preset, smallest first."""
    pattern = re.compile(rf"^{re.escape(family)}-(\d+)gb$")
    return sorted(int(m.group(1)) for name in presets if (m := pattern.match(name)))


def next_preset_down(family: str, vram_gib: float | None, presets: Sequence[str] | None = None) -> str | None:
    """The preset one VRAM tier below the one that fits this GPU, or None if there is none smaller."""
    if vram_gib is None:
        return None
    if presets is None:
        from lora_gui.config import list_presets

        presets = list_presets()
    tiers = preset_tiers(family, presets)
    fitting = [tier for tier in tiers if tier <= vram_gib * 1.1]  # a "24 GB" card reports about 23.6 GiB
    if len(fitting) < 2:
        return None
    return f"{family}-{fitting[-2]}gb"


def error_markdown(error, family: str | None = None, vram_gib: float | None = None,
                   presets: Sequence[str] | None = None) -> str:
    """The failure as a warning: what happened, what to do; the traceback goes elsewhere (folded)."""
    lines = [f"### ⚠️ {error.message}"]
    if error.hint:
        lines.append(f"**What to do:** {error.hint}")
    if family and vram_gib is not None and is_out_of_memory(error):
        preset = next_preset_down(family, vram_gib, presets)
        if preset:
            lines.append(f"**Suggested:** load the preset `{preset}` on the Config tab (the next VRAM tier down), "
                         "then resume from the latest checkpoint.")
        else:
            lines.append("**Suggested:** there is no smaller preset for this GPU: lower dataset.resolution to 512, "
                         "set train.batch_size = 1 and model.quantize = 'nf4' or 'int8'.")
    return "\n\n".join(lines)


# ----------------------------------------------------------------------------- change detection


def view_keys(snap: RunSnapshot) -> dict[str, object]:
    """A small fingerprint per panel; a panel is re-sent to the browser only when its key changes."""
    return {
        "status": (snap.state, snap.step, snap.max_steps, snap.epoch, snap.loss, snap.lr, snap.sec_per_step,
                   snap.status, snap.result_path,
                   None if snap.eta_seconds is None else round(snap.eta_seconds)),
        "plots": (len(snap.losses), snap.losses[-1] if snap.losses else None),
        "samples": (len(snap.samples), snap.samples[-1].step if snap.samples else None),
        "log": (len(snap.log), snap.log[-1] if snap.log else None),
        "error": None if snap.error is None else (snap.error.message, snap.error.time),
        "buttons": snap.state,
    }

"""What the Train tab shows about a run, computed from a ``RunSnapshot`` (no gradio here).

Every function is pure so it can be tested without a browser: status line, smoothed loss, plot
tables, the validation-image gallery, button states per run state, and error messages that say
what to do (for out-of-memory: the next VRAM preset down).

``SharedView`` renders all of it once per change of the run and hands the same ``RunView`` to every
browser tab that polls, so twenty tabs cost one render, not twenty. Each panel group carries a
version; a browser fetches a group only when its version moved (see ``ui/tabs/train.py``).
"""

from __future__ import annotations

import inspect
import math
import re
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from lora_gui.engine.runner import RunSnapshot

ACTIVE_STATES = ("running", "paused", "stopping")
LOG_LINES = 200
# Points per plotted line: plenty for a plot a few hundred pixels wide. Every point is walked several
# times by Gradio for every browser it is sent to, so this bounds the cost of a plot refresh.
PLOT_POINTS = 200
# While a run trains, the plots are re-sent at most this often (the status line shows every step).
PLOT_REFRESH_S = 10.0
SMOOTHING = 0.9
# The panel groups a browser fetches separately, each when its version changes.
GROUPS = ("plots", "gallery", "log", "controls")
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


def loss_rows(losses: Sequence[tuple[int, float, float]], limit: int = PLOT_POINTS) -> list[list]:
    """Long-format rows [step, loss, series] with raw and smoothed loss (non-finite losses left out)."""
    finite = [(step, loss) for step, loss, _ in losses if math.isfinite(loss)]
    smooth = smoothed([loss for _, loss in finite])
    keep = _thin(len(finite), limit)
    return ([[finite[i][0], finite[i][1], "raw"] for i in keep]
            + [[finite[i][0], smooth[i], "smoothed"] for i in keep])


def lr_rows(losses: Sequence[tuple[int, float, float]], limit: int = PLOT_POINTS) -> list[list]:
    return [[losses[i][0], losses[i][2]] for i in _thin(len(losses), limit)]


def line_plot(columns: Sequence[str], rows: list[list], nominal: Sequence[str] = ()) -> dict | None:
    """A table as ``gr.LinePlot`` sends it to the browser (what it makes of a DataFrame), built once.

    None for no rows: an empty table would fix the plot's colour legend to nothing for good.
    """
    if not rows:
        return None
    datatypes = {name: "nominal" if name in nominal else "quantitative" for name in columns}
    return {"columns": list(columns), "data": rows, "datatypes": datatypes, "mark": "line"}


def loss_plot(losses: Sequence[tuple[int, float, float]], limit: int = PLOT_POINTS) -> dict | None:
    return line_plot(("step", "loss", "series"), loss_rows(losses, limit), nominal=("series",))


def lr_plot(losses: Sequence[tuple[int, float, float]], limit: int = PLOT_POINTS) -> dict | None:
    return line_plot(("step", "lr"), lr_rows(losses, limit))


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
    lines = [f"### ⚠ {error.message}"]
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


# ----------------------------------------------------------------------------- the shared view


@dataclass(frozen=True)
class RunView:
    """Everything the Train tab shows, rendered once per change and shared by every browser tab."""

    status: str
    memory: str
    loss: dict | None
    lr: dict | None
    gallery: list[tuple[str, str]]
    columns: int
    log: str
    error: tuple[str, str] | None
    buttons: dict[str, bool]
    checkpoints: list[tuple[str, str]] | None  # None: no run yet, leave the dropdown alone
    active: bool
    keys: dict[str, object]  # per group: what its content was rendered from
    versions: dict[str, int]
    plots_at: float  # when the plots were rendered (time.monotonic)
    plots_behind: bool  # steps arrived since, held back until PLOT_REFRESH_S has passed
    nonce: str = ""
    runs: list[tuple[str, str]] | None = None  # the run picker's choices, made with the controls

    def triggers(self) -> list[str]:
        """One short string per group; a browser refetches a group when its string changes."""
        return [f"{name}-{self.nonce}-{self.versions[name]}" for name in GROUPS]

    def plots_due(self, now: float) -> bool:
        return self.plots_behind and now - self.plots_at >= PLOT_REFRESH_S


def render_view(snap: RunSnapshot, previous: RunView | None, now: float, *, active: bool, memory: str,
                error_panel: Callable[[object], tuple[str, str] | None],
                checkpoints: Callable[[], list[tuple[str, str]]] | None, checkpoints_key: object = None,
                runs: Callable[[], list[tuple[str, str]]] | None = None) -> RunView:
    """The view of ``snap``, reusing from ``previous`` every group whose content did not change."""
    keys = view_keys(snap)
    wanted = {"plots": keys["plots"], "gallery": keys["samples"], "log": keys["log"],
              "controls": (keys["error"], keys["buttons"], active, checkpoints_key)}

    def same(name: str) -> bool:
        return previous is not None and previous.keys[name] == wanted[name]

    hold_plots = (previous is not None and previous.loss is not None and snap.state == "running"
                  and len(snap.losses) > previous.keys["plots"][0] and now - previous.plots_at < PLOT_REFRESH_S)
    if same("plots") or hold_plots:
        loss, lr, plots_at, plots_key = previous.loss, previous.lr, previous.plots_at, previous.keys["plots"]
    else:
        loss, lr, plots_at, plots_key = loss_plot(snap.losses), lr_plot(snap.losses), now, wanted["plots"]
    gallery = ((previous.gallery, previous.columns) if same("gallery")
               else (gallery_items(snap.samples), gallery_columns(snap.samples)))
    log = previous.log if same("log") else log_text(snap.log)
    if same("controls"):
        error, buttons, choices, run_choices = previous.error, previous.buttons, previous.checkpoints, previous.runs
    else:
        error, buttons = error_panel(snap.error), button_states(snap.state)
        choices = checkpoints() if checkpoints is not None else None
        run_choices = runs() if runs is not None else None
    rendered = {**wanted, "plots": plots_key}
    versions = dict.fromkeys(GROUPS, 0) if previous is None else {
        name: previous.versions[name] + (previous.keys[name] != rendered[name]) for name in GROUPS}
    # as gr.Markdown would postprocess them: the poll event sends them as they are (postprocess=False)
    status, memory = inspect.cleandoc(status_markdown(snap)), inspect.cleandoc(memory)
    return RunView(status=status, memory=memory, loss=loss, lr=lr, gallery=gallery[0],
                   columns=gallery[1], log=log, error=error, buttons=buttons, checkpoints=choices, active=active,
                   keys=rendered, versions=versions, plots_at=plots_at, plots_behind=plots_key != wanted["plots"],
                   runs=run_choices)


@dataclass
class SharedView:
    """The latest ``RunView``, re-rendered only when the run changed (or held-back plots fell due).

    ``get(token, render)``: ``token`` is the runner's ``version()``; ``render(previous, now)`` makes
    the new view. One lock: concurrent pollers wait for one render instead of each rendering.
    """

    clock: Callable[[], float] = time.monotonic
    nonce: str = field(default_factory=lambda: secrets.token_hex(3))  # versions from another process differ
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _token: object = None
    _view: RunView | None = None

    def get(self, token: object, render: Callable[[RunView | None, float], RunView]) -> RunView:
        with self._lock:
            now = self.clock()
            view = self._view
            if view is None or token != self._token or view.plots_due(now):
                view = self._view = replace(render(view, now), nonce=self.nonce)
                self._token = token
            return view

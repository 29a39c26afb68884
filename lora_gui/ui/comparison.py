"""The Test tab's logic (no gradio): runs and LoRA files to compare, checking the form, rendering.

A comparison renders every chosen LoRA (rows) at every scale (columns) with one prompt and seed.
It uses the paused run's model when the run folder is the active run's (on the training thread,
via ``runner.submit``), otherwise a base model loaded once and cached on the session as
``session.comparison_cache`` (a ``PipelineCache``); starting a training run frees that cache.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lora_gui.config import ConfigError, TrainingConfig, build_config
from lora_gui.engine.checkpoint import checkpoint_step, list_checkpoints
from lora_gui.engine.compare import NO_LORA, grid_image
from lora_gui.engine.runner import IN_OTHER_PROCESSES
from lora_gui.engine.sampling import SampleSettings
from lora_gui.ui.workspace import OutsideWorkspace

DEFAULT_SCALES = "0, 0.5, 0.75, 1, 1.25"
MAX_SCALES = 8
MAX_ROWS = 12
SCALE_LIMIT = 4.0
PAUSE_FIRST = "Pause training first (the comparison reuses the model in memory), then press Render again."

Progress = Callable[[int, int], None]


class ComparisonError(ValueError):
    """A problem with the Test tab's form or state; the message says what to do."""


@dataclass(frozen=True)
class LoraChoice:
    value: str  # what the form sends: NO_LORA or the file's path inside the run folder
    label: str  # the grid's row label
    path: Path | None


@dataclass(frozen=True)
class ComparisonRequest:
    run_dir: Path
    config: TrainingConfig
    loras: tuple[LoraChoice, ...]
    scales: tuple[float, ...]
    settings: SampleSettings


@dataclass(frozen=True)
class ComparisonResult:
    image: object  # PIL.Image
    path: Path
    used: str  # "the paused run's model" or "the base model"


# ----------------------------------------------------------------------------- what can be compared


def parse_scales(text: str | None) -> list[float]:
    """'0, 0.5, 1' -> [0.0, 0.5, 1.0]: numbers in [-4, 4], at most 8, duplicates dropped."""
    parts = [part for part in re.split(r"[,;\s]+", str(text or "")) if part]
    if not parts:
        raise ComparisonError("Enter at least one LoRA scale, for example: 0, 0.5, 1")
    scales: list[float] = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            raise ComparisonError(f"{part!r} is not a number; write scales separated by commas, e.g. 0, 0.5, 1") from None
        if not math.isfinite(value) or abs(value) > SCALE_LIMIT:
            raise ComparisonError(f"Scale {part} is out of range; use numbers from -{SCALE_LIMIT:g} to {SCALE_LIMIT:g}.")
        if value not in scales:
            scales.append(value)
    if len(scales) > MAX_SCALES:
        raise ComparisonError(f"{len(scales)} scales is too many; use at most {MAX_SCALES} (each is a column).")
    return scales


def resolve_run(session, text: str | None) -> Path:
    """A run folder under the workspace's outputs/, refused anywhere else."""
    if not text or not str(text).strip():
        raise ComparisonError("Choose a run folder (press Refresh to list the runs under outputs/).")
    try:
        path = session.workspace.resolve(text)
    except OutsideWorkspace as exc:
        raise ComparisonError(str(exc)) from None
    if not path.is_relative_to(session.workspace.outputs) or not path.is_dir():
        raise ComparisonError(f"{text} is not a run folder under outputs/; press Refresh and pick one from the list.")
    return path


def run_config(run_dir: Path) -> TrainingConfig:
    try:
        return build_config(file=run_dir / "config.toml")
    except ConfigError as exc:
        raise ComparisonError(
            f"{run_dir.name} has no readable config.toml ({exc}). A run writes it when training starts; "
            "pick a folder that a training run wrote."
        ) from None


CURRENT = "current"  # the form's value for a paused run's weights in memory


def paused_step(session, run_dir: Path) -> int | None:
    """The step of the app's run when it is this run and paused (its weights can be tested as they are)."""
    runner = session.runner
    if not runner.is_active or runner.output_dir is None or Path(runner.output_dir).resolve() != run_dir.resolve():
        return None
    snapshot = runner.snapshot()
    return snapshot.step if snapshot.state == "paused" and snapshot.processes == 1 else None


def lora_choices(run_dir: Path, current_step: int | None = None) -> list[LoraChoice]:
    """'no LoRA', a paused run's current weights (``current_step``), every complete checkpoint's LoRA (oldest
    first) and the final LoRA, as they are on disk."""
    name = lora_name(run_dir)
    choices = [LoraChoice(NO_LORA, NO_LORA, None)]
    if current_step is not None:
        choices.append(LoraChoice(CURRENT, f"current weights (step {current_step})", None))
    for folder in list_checkpoints(run_dir):
        file = _lora_file_in(folder, name)
        if file is not None:
            choices.append(LoraChoice(file.relative_to(run_dir).as_posix(), f"step {checkpoint_step(folder)}", file))
    final = _lora_file_in(run_dir, name)
    if final is not None:
        choices.append(LoraChoice(final.name, "final LoRA", final))
    return choices


def lora_name(run_dir: Path) -> str | None:
    try:
        return build_config(file=run_dir / "config.toml").output.name
    except ConfigError:
        return None


def _lora_file_in(folder: Path, name: str | None) -> Path | None:
    if name:
        file = folder / f"{name}.safetensors"
        return file if file.is_file() else None
    found = sorted(p for p in folder.glob("*.safetensors") if not p.name.endswith(".diffusers.safetensors"))
    return found[0] if found else None


def form_defaults(config: TrainingConfig) -> dict:
    """The Test form's starting values, from the run's validation-image settings."""
    sample, resolution = config.sample, config.dataset.resolution
    prompts = [p for p in sample.prompts if p.strip()]
    return {
        "prompt": prompts[0] if prompts else "", "negative_prompt": sample.negative_prompt, "seed": sample.seed,
        "steps": sample.steps, "guidance": sample.guidance_scale,
        "width": sample.width or resolution, "height": sample.height or resolution,
    }


# ----------------------------------------------------------------------------- checking the form


def _number(value, label: str, low: float, high: float, whole: bool = True) -> float:
    kind = "a whole number" if whole else "a number"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ComparisonError(f"{label} must be {kind} from {low:g} to {high:g}.") from None
    if not math.isfinite(number) or not low <= number <= high or (whole and number != int(number)):
        raise ComparisonError(f"{label} must be {kind} from {low:g} to {high:g}; got {value}.")
    return number


def sample_settings(config: TrainingConfig, prompt, negative_prompt, seed, steps, guidance, width, height):
    prompt = str(prompt or "").strip()
    if not prompt:
        raise ComparisonError("Enter a prompt (use the run's trigger word to see the LoRA's effect).")
    from lora_gui.engine.families.registry import family_class

    multiple = family_class(config.model.family).size_multiple

    def side(value, label: str) -> int:
        number = int(_number(value, label, 64, 2048))
        return max(multiple, number // multiple * multiple)

    return SampleSettings(
        prompts=(prompt,), negative_prompt=str(negative_prompt or "").strip(),
        seed=int(_number(seed, "Seed", 0, 2**32 - 1)), steps=int(_number(steps, "Steps", 1, 200)),
        guidance_scale=_number(guidance, "Guidance", 0, 50, whole=False),
        width=side(width, "Width"), height=side(height, "Height"),
    )


def build_request(session, run, chosen, scales, prompt, negative_prompt, seed, steps, guidance, width, height):
    """Everything the browser sent, checked again on the server."""
    run_dir = resolve_run(session, run)
    config = run_config(run_dir)
    chosen = [chosen] if isinstance(chosen, str) else list(chosen or [])
    available = lora_choices(run_dir, paused_step(session, run_dir))
    unknown = set(chosen) - {choice.value for choice in available}
    if unknown:
        raise ComparisonError(f"{', '.join(sorted(map(str, unknown)))} is not a LoRA of {run_dir.name}; "
                              "press Refresh and pick from the list.")
    picked = tuple(choice for choice in available if choice.value in chosen)
    if not picked:
        raise ComparisonError("Pick at least one LoRA (or 'no LoRA') to compare.")
    if len(picked) > MAX_ROWS:
        raise ComparisonError(f"{len(picked)} LoRAs is too many for one grid; pick at most {MAX_ROWS}.")
    settings = sample_settings(config, prompt, negative_prompt, seed, steps, guidance, width, height)
    return ComparisonRequest(run_dir, config, picked, tuple(parse_scales(scales)), settings)


# ----------------------------------------------------------------------------- the cached base model


class PipelineCache:
    """One base model kept in memory for comparisons of runs that are not training, keyed by model."""

    def __init__(self, loader: Callable | None = None) -> None:
        self._loader = loader
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._entry: tuple | None = None
        self.loads = 0

    @staticmethod
    def key(config: TrainingConfig) -> tuple:
        model = config.model
        return (model.family, model.base, model.revision, model.components, model.weight_dtype, model.device)

    def get(self, config: TrainingConfig) -> tuple:
        """(family, components, pipeline) for the config's base model, loaded on first use."""
        with self._lock:
            key = self.key(config)
            if self._key != key:
                self._drop()
                from lora_gui.engine.compare import load_pipeline

                self._entry = (self._loader or load_pipeline)(config)
                self._key = key
                self.loads += 1
            return self._entry

    def release(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._entry is None:
            return
        self._entry, self._key = None, None
        from lora_gui.engine.devices import free_accelerator_memory

        free_accelerator_memory()


def pipeline_cache(session) -> PipelineCache:
    if session.comparison_cache is None:
        session.comparison_cache = PipelineCache()
    return session.comparison_cache


def release_cached_pipeline(session) -> None:
    """Free the comparison model (called when a training run starts and needs the memory)."""
    if session.comparison_cache is not None:
        session.comparison_cache.release()


# ----------------------------------------------------------------------------- rendering


class ProgressRelay:
    """Carries (done, total) from the training thread to the request's thread, which reports it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latest: tuple[int, int] | None = None

    def __call__(self, done: int, total: int) -> None:
        with self._lock:
            self._latest = (done, total)

    def report(self, progress: Progress | None) -> None:
        with self._lock:
            latest, self._latest = self._latest, None
        if latest and progress:
            progress(*latest)


def run_comparison(session, request: ComparisonRequest, progress: Progress | None = None) -> ComparisonResult:
    """Render the grid and save it as <run>/comparisons/compare-<time>.png; one comparison at a time."""
    if not session.busy_lock.acquire(blocking=False):
        raise ComparisonError("Another comparison (or captioning job) is running; wait for it, then press Render.")
    try:
        cells, used = _render(session, request, progress)
    finally:
        session.busy_lock.release()
    image = grid_image(cells, request.scales)
    return ComparisonResult(image=image, path=save_grid(image, request), used=used)


def _render(session, request: ComparisonRequest, progress: Progress | None):
    from lora_gui.engine.compare import CURRENT_WEIGHTS, render_comparison

    paths = [CURRENT_WEIGHTS if choice.value == CURRENT else None if choice.path is None else str(choice.path)
             for choice in request.loras]
    # the grid's row labels are narrow beside small images: "now (step N)" for the weights in memory
    labels = [choice.label.replace("current weights", "now") if choice.value == CURRENT else choice.label
              for choice in request.loras]
    if session.runner.is_active:
        return _render_on_active_run(session.runner, request, paths, labels, progress), "the paused run's model"
    if progress:
        progress(0, len(paths) * len(request.scales))
    family, components, pipeline = pipeline_cache(session).get(request.config)
    cells = render_comparison(family, components, pipeline, paths, request.scales, request.settings, progress, labels)
    return cells, "the base model"


def _render_on_active_run(runner, request: ComparisonRequest, paths, labels, progress: Progress | None):
    active_dir = Path(runner.output_dir).resolve() if runner.output_dir else None
    if active_dir != request.run_dir.resolve():
        raise ComparisonError(
            f"A training run is using the GPU ({active_dir.name if active_dir else 'another run'}). Test that run "
            "while it is paused, or wait until it ends (or stop it) to test other runs."
        )
    snapshot = runner.snapshot()
    state = snapshot.state
    if snapshot.processes > 1:
        raise ComparisonError(IN_OTHER_PROCESSES)
    if state == "stopping":
        raise ComparisonError("The run is stopping and saving a checkpoint; test it once it has stopped.")
    if state != "paused":
        raise ComparisonError(PAUSE_FIRST)
    relay = ProgressRelay()

    def job(family, components):
        from lora_gui.engine.compare import render_on_training_model

        return render_on_training_model(family, components, paths, request.scales, request.settings, relay, labels)

    try:
        future = runner.submit(job)
    except RuntimeError:
        raise ComparisonError("The training run just ended; press Render again to use the base model.") from None
    while True:
        relay.report(progress)
        try:
            cells = future.result(timeout=0.25)
        except TimeoutError:
            continue
        relay.report(progress)  # the last count, when the job finished between two polls
        return cells


def save_grid(image, request: ComparisonRequest) -> Path:
    from PIL.PngImagePlugin import PngInfo

    folder = request.run_dir / "comparisons"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, count = folder / f"compare-{stamp}.png", 1
    while path.exists():
        count += 1
        path = folder / f"compare-{stamp}-{count}.png"
    info = PngInfo()
    info.add_text("lora_gui.comparison", json.dumps(_description(request)))
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG", pnginfo=info)
    tmp.replace(path)
    return path


def _description(request: ComparisonRequest) -> dict:
    settings = request.settings
    return {
        "rows": [choice.label for choice in request.loras], "files": [choice.value for choice in request.loras],
        "scales": list(request.scales), "prompt": settings.prompts[0], "negative_prompt": settings.negative_prompt,
        "seed": settings.seed, "steps": settings.steps, "guidance": settings.guidance_scale,
        "width": settings.width, "height": settings.height,
    }


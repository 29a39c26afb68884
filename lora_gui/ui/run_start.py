"""What every way of starting a run checks first (Start, Resume, the queue): the config's folders are the
workspace's, the output folder is under outputs/, the dataset folder exists. No gradio here."""

from __future__ import annotations

from pathlib import Path

from lora_gui.config import TrainingConfig
from lora_gui.ui.workspace import OutsideWorkspace, clip


class StartRefused(ValueError):
    """Start, Resume or a queued run cannot go ahead; the message says what to do."""


def chosen_processes(session, value) -> int:
    """The Train tab's GPUs choice as a number of processes (1: the run trains on the app's own thread); any
    other value than a GPU count this machine has is refused."""
    available = max(1, session.gpu_count)
    if value is None or value == "":
        return 1
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise StartRefused(f"GPUs: pick a number from 1 to {available}.")
    try:
        count = float(value)
    except ValueError:
        raise StartRefused(f"GPUs: {clip(str(value))} is not a number; pick one from 1 to {available}.") from None
    if not count.is_integer() or not 1 <= count <= available:
        raise StartRefused(f"GPUs: {clip(str(value))} is not a choice on this machine, which has "
                           f"{session.gpu_count} CUDA GPU(s); pick one from 1 to {available}.")
    return int(count)


def confine_paths(workspace, config: TrainingConfig) -> TrainingConfig:
    """A copy of ``config`` with its folders resolved in the workspace; refused with a message otherwise."""
    try:
        output = workspace.resolve(config.output.dir)
        dataset = workspace.resolve_dataset(config.dataset.dir) if config.dataset.dir.strip() else None
        cache = workspace.resolve(config.dataset.cache_dir) if config.dataset.cache_dir else None
    except OutsideWorkspace as exc:
        raise StartRefused(str(exc)) from None
    if output == workspace.outputs or not output.is_relative_to(workspace.outputs):
        raise StartRefused(f"output.dir must be a folder under {workspace.outputs} (for example outputs/my-lora), "
                           "so the app can show its images; change it on the Config tab.")
    if dataset is None or not dataset.is_dir():
        raise StartRefused(f"dataset.dir {config.dataset.dir!r} is not a folder; pick a dataset on the Config tab.")
    config = config.model_copy(deep=True)
    config.output.dir, config.dataset.dir = str(output), str(dataset)
    config.dataset.cache_dir = None if cache is None else str(cache)
    return config


def prepare_new_run(session, config: TrainingConfig) -> TrainingConfig:
    """A new run (not a resume) ready to start: folders confined, no earlier run in its output folder, the Test
    tab's cached model freed for the memory."""
    from lora_gui.engine.outputs import previous_run_problem
    from lora_gui.ui.comparison import release_cached_pipeline

    config = confine_paths(session.workspace, config)
    problem = previous_run_problem(Path(config.output.dir), config.output.name)
    if problem:
        raise StartRefused(f"{problem}. Queued runs never delete earlier ones: set another output.dir.")
    release_cached_pipeline(session)
    return config

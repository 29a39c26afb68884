"""The Train tab: start, pause, continue, stop, sample now, save now, resume from a checkpoint.

The run belongs to the app process (``session.runner``), not to a browser tab, so a reload or a
second tab re-attaches to the live run; the training thread never touches a component. Polling is
built to cost little however many tabs watch (with Gradio, every output of an event costs work per
browser on every call, even a ``gr.skip()``):

- the view is rendered once per change of the run and shared by every tab (``session.train_view``);
- a ``gr.Timer`` (every second while a run is active, every few seconds otherwise) fetches only the
  status line, the memory line and one short version string per panel group (hidden textboxes), from
  a bare HTTP route in the browser's JavaScript (``light_routes``: a Gradio event would cost the server
  several times more CPU per poll, taken from training);
- a group's version changing fires that textbox's ``change`` in the browser, which fetches the group
  (plots, validation images, log, or errors/buttons/checkpoints): heavy panels travel once per
  change, and the plots at most every ``run_view.PLOT_REFRESH_S`` seconds while training.

The handlers below are plain functions (session, config tab, values) -> message, so tests call them
directly. Start and Resume set ``session.train_started_config`` (the run's TrainingConfig), which
the error panel reads to name the next VRAM preset down after an out-of-memory error.
"""

from __future__ import annotations

import sys
from pathlib import Path

import gradio as gr
from gradio.context import Context

from lora_gui.config import ConfigError, TrainingConfig
from lora_gui.engine.checkpoint import checkpoint_step, list_checkpoints
from lora_gui.engine.outputs import previous_run_problem
from lora_gui.engine.runner import RunAlreadyActive
from lora_gui.ui import run_view, runs
from lora_gui.ui.checked import CheckedDropdown
from lora_gui.ui.comparison import release_cached_pipeline
from lora_gui.ui.light_routes import JsonRoute
from lora_gui.ui.run_start import StartRefused, chosen_processes, confine_paths
from lora_gui.ui.tabs import queue_panel
from lora_gui.ui.workspace import OutsideWorkspace, clip

BUTTONS = ("start", "resume_checkpoint", "pause", "continue", "stop", "sample", "save")


# ----------------------------------------------------------------------------- starting


def read_config(session, config_tab, values: dict) -> TrainingConfig:
    """The Config tab's values as a config whose folders are confined to the workspace."""
    inputs = config_tab.inputs()
    try:
        config = config_tab.to_config({c: v for c, v in values.items() if c in inputs})
    except ConfigError as exc:
        raise StartRefused(f"{exc}\n\nFix it on the Config tab, then press Start again.") from None
    return confine_paths(session.workspace, config)


def start_run(session, config_tab, values: dict, overwrite: bool = False, gpus=1) -> str:
    try:
        processes = chosen_processes(session, gpus)
        config = read_config(session, config_tab, values)
        output = Path(config.output.dir)
        problem = previous_run_problem(output, config.output.name)
        if problem and not overwrite:
            raise StartRefused(f"{problem}. Choose another output.dir on the Config tab, resume from one of its "
                               "checkpoints below, or tick Overwrite to train again from step 0 (deletes them).")
        return _launch(session, config, None, overwrite=bool(problem and overwrite), processes=processes)
    except StartRefused as exc:
        return f"⚠ {exc}"


def resume_run(session, config_tab, values: dict, run: str | None, checkpoint: str | None, gpus=1) -> str:
    """Resume ``run`` from one of its checkpoints with the Config tab's settings, which must name that run's
    folder as output.dir (picking the run loads its config.toml into the form), on ``gpus`` GPUs (any number:
    the run goes on at the sample it had reached)."""
    try:
        processes = chosen_processes(session, gpus)
        run_dir = run_folder(session, run)
        config = read_config(session, config_tab, values)
        if Path(config.output.dir).resolve() != run_dir.resolve():
            raise StartRefused(f"The Config tab's output.dir is `{session.workspace.relative(Path(config.output.dir))}`, "
                               f"not the run `{session.workspace.relative(run_dir)}`: pick the run again to load its "
                               "config, or set output.dir to its folder.")
        found = {str(path.resolve()): path for path in list_checkpoints(run_dir)}
        if not checkpoint:
            raise StartRefused("Pick a checkpoint to resume from (press Refresh to list them).")
        try:
            chosen = found.get(str(session.workspace.resolve(checkpoint)))
        except OutsideWorkspace:
            chosen = None
        if chosen is None:
            raise StartRefused(f"{clip(checkpoint)} is not a complete checkpoint of {session.workspace.relative(run_dir)}; "
                               "press Refresh and pick one from the list.")
        return _launch(session, config, chosen, processes=processes)
    except StartRefused as exc:
        return f"⚠ {exc}"


def run_folder(session, run) -> Path:
    """A run folder under outputs/, refused anywhere else."""
    if not isinstance(run, str) or not run.strip():
        raise StartRefused("Pick a run folder (press Refresh to list the runs under outputs/).")
    try:
        path = session.workspace.resolve(run)
    except OutsideWorkspace as exc:
        raise StartRefused(str(exc)) from None
    if not path.is_relative_to(session.workspace.outputs) or path == session.workspace.outputs or not path.is_dir():
        raise StartRefused(f"{clip(run)} is not a run folder under outputs/; press Refresh and pick one from the list.")
    return path


def _launch(session, config: TrainingConfig, resume_from: Path | None, overwrite: bool = False,
            processes: int = 1) -> str:
    if session.runner.is_active:
        raise StartRefused("A training run is already in progress; stop it (or wait for it) before starting another.")
    release_cached_pipeline(session)
    try:
        session.runner.start(config, resume_from=resume_from, overwrite=overwrite, processes=processes)
    except RunAlreadyActive as exc:
        raise StartRefused(str(exc)) from None
    session.train_started_config = config
    where = session.workspace.relative(Path(config.output.dir))
    on = f" on {processes} GPUs (batch {config.train.batch_size} each)" if processes > 1 else ""
    if resume_from is not None:
        return f"Resuming from step {checkpoint_step(resume_from)} in `{where}`{on}."
    return f"Started: {config.train.max_steps} steps into `{where}`{on}."


# ----------------------------------------------------------------------------- controls


def control(session, action: str) -> str:
    """Pause, continue, stop, sample or save; refused with a reason when the run's state rules it out."""
    runner = session.runner
    snapshot = runner.snapshot()
    state = snapshot.state
    if not runner.is_active or not run_view.button_states(state).get(action, False):
        return f"⚠ {_NOT_NOW.get(action, 'That')} is not possible while the run is {state}."
    test_it = ("Test it on the Test tab, then press Continue." if snapshot.processes == 1 else
               f"It trains on {snapshot.processes} GPUs, so its weights in memory cannot be tested (that works on "
               "one GPU): press Save now to keep a checkpoint to test once the run has ended.")
    messages = {
        "pause": (runner.pause, f"Pausing after the current step. {test_it}"),
        "continue": (runner.resume, "Continuing."),
        "stop": (runner.stop, "Stopping: a resumable checkpoint is saved at the current step."),
        "sample": (runner.sample_now, "Validation images will be rendered after the current step."),
        "save": (runner.save_now, "A checkpoint will be saved after the current step."),
    }
    command, message = messages[action]
    command()
    return message


_NOT_NOW = {"pause": "Pause", "continue": "Continue", "stop": "Stop", "sample": "Sample now", "save": "Save now"}


def checkpoint_choices(session, output_dir) -> list[tuple[str, str]]:
    """(label, workspace-relative path) of complete checkpoints, newest first."""
    if not output_dir:
        return []
    return [(f"step {checkpoint_step(path)}", session.workspace.relative(path))
            for path in reversed(list_checkpoints(output_dir))]


def run_choices(session, chosen: str | None = None, live: bool = True) -> tuple[list[tuple[str, str]], str | None]:
    """The run picker's (label, folder) choices and the one to select: ``chosen`` if it is still there, else
    the live run, else the newest. ``live`` False: without the live run's state (see ``runs.list_runs``)."""
    choices = runs.choices(runs.list_runs(session.workspace, session.runner if live else None))
    folders = [folder for _, folder in choices]
    return choices, chosen if chosen in folders else (folders[0] if folders else None)


def pick_run(session, config_tab, run) -> tuple[dict, list[tuple[str, str]], str]:
    """A run picked for resuming: (updates that load its config.toml into the Config tab, its checkpoints,
    what to tell the user)."""
    try:
        run_dir = run_folder(session, run)
    except StartRefused as exc:
        return {}, [], f"⚠ {exc}"
    choices = checkpoint_choices(session, run_dir)
    where = session.workspace.relative(run_dir)
    found = "" if choices else " It has no complete checkpoints to resume from."
    try:
        updates, _ = config_tab.load_file(run_dir / "config.toml", f"{where}/config.toml")
    except ConfigError as exc:
        return {}, choices, f"⚠ Could not load `{where}/config.toml` ({exc}); the Config tab is unchanged.{found}"
    return updates, choices, f"Loaded `{where}/config.toml` into the Config tab.{found}"


# ----------------------------------------------------------------------------- polling

POLL_S = 1.0  # timer interval while a run is active (status, ETA; plots at most every PLOT_REFRESH_S)
IDLE_POLL_S = 5.0  # otherwise: still notices a run started from another tab or browser


def current_view(session) -> run_view.RunView:
    """The shared view of the run, rendered only if the run changed since the last render."""
    runner = session.runner
    return session.train_view.get(runner.version(), lambda previous, now: _render(session, previous, now))


def _render(session, previous: run_view.RunView | None, now: float) -> run_view.RunView:
    runner = session.runner
    snap, output_dir = runner.snapshot(), runner.output_dir
    return run_view.render_view(
        snap, previous, now, active=runner.is_active, memory=run_view.memory_text(_memory_report()),
        error_panel=lambda error: _error_panel(session, error),
        checkpoints=None if output_dir is None else lambda: checkpoint_choices(session, output_dir),
        checkpoints_key=(len(snap.checkpoints), str(output_dir)),
        runs=None if output_dir is None else lambda: runs.choices(runs.list_runs(session.workspace, runner, snap)),
    )


def poll(session) -> list:
    """The timer's outputs: status line, memory line, the version string of each panel group and the queue's."""
    view = current_view(session)
    return [view.status, view.memory, *view.triggers(), queue_panel.version(session, view.nonce)]


def plots_panel(session) -> list:
    view = current_view(session)
    return [view.loss, view.lr]


def gallery_panel(session):
    view = current_view(session)
    return gr.update(value=view.gallery, columns=view.columns)


def log_panel(session) -> str:
    return current_view(session).log


def controls_panel(session) -> list:
    """Error box, error details, checkpoint list, button states and the timer's interval."""
    view = current_view(session)
    error_text, error_details = view.error or ("", "")
    choices = view.checkpoints
    run = None if session.runner.output_dir is None else session.workspace.relative(session.runner.output_dir)
    return [
        gr.update(value=error_text, visible=bool(error_text)), gr.update(visible=bool(error_details)), error_details,
        gr.skip() if view.runs is None else gr.update(choices=view.runs, value=run),
        gr.skip() if choices is None else gr.update(choices=choices, value=choices[0][1] if choices else None),
        *[gr.update(interactive=view.buttons[name]) for name in BUTTONS],
        gr.Timer(POLL_S if view.active else IDLE_POLL_S),
    ]


def _memory_report() -> dict | None:
    torch = sys.modules.get("torch")  # no run yet means no torch import and nothing on a GPU
    if torch is None or not torch.cuda.is_available():
        return None
    from lora_gui.engine.devices import memory_report

    return memory_report(torch.device("cuda"))


def _error_panel(session, error) -> tuple[str, str] | None:
    if error is None:
        return None
    config = session.train_started_config
    gpu = session.gpu if run_view.is_out_of_memory(error) else None
    text = run_view.error_markdown(error, config.model.family if config else None, gpu.total_gib if gpu else None)
    return text, error.details


# ----------------------------------------------------------------------------- layout


def gpu_picker(session) -> CheckedDropdown:
    """GPUs: 1 ... N, shown when this machine has more than one CUDA GPU."""
    count = session.gpu_count
    return CheckedDropdown(
        [(str(n), n) for n in range(1, max(count, 1) + 1)], value=1, label="GPUs", visible=count > 1,
        elem_id="lg-train-gpus",
        info="More than 1: the run trains in processes of their own, one per GPU, each on train.batch_size samples "
             "(the Config tab's validation shows the effective batch). Pause → test the current weights on the "
             "Test tab works on 1 GPU only; checkpoints can be tested after the run.")


def build(session, config_tab) -> list[JsonRoute]:
    """The tab; returns the route its timer polls, which the app must serve (``AppBlocks.light_routes``)."""
    with gr.Row():
        buttons = {
            "start": gr.Button("Start", variant="primary"),
            "queue": gr.Button("Add to queue"),
            "pause": gr.Button("Pause", interactive=False),
            "continue": gr.Button("Continue", interactive=False),
            "stop": gr.Button("Stop", variant="stop", interactive=False),
            "sample": gr.Button("Sample now", interactive=False),
            "save": gr.Button("Save now", interactive=False),
        }
    overwrite = gr.Checkbox(False, label="Overwrite: train from step 0 even if output.dir holds a finished LoRA "
                                         "or checkpoints (deletes them)")
    gpus = gpu_picker(session)
    initial_runs, _ = run_choices(session, live=False)
    with gr.Accordion("Resume from a checkpoint", open=False):
        with gr.Row():
            run_picker = CheckedDropdown(initial_runs, value=None, label="Run folder", scale=3, elem_id="lg-resume-run",
                                     info="Live first, then newest. Picking one loads its config.toml into the "
                                          "Config tab.")
            checkpoint = CheckedDropdown([], label="Checkpoint", scale=2, elem_id="lg-resume-checkpoint")
            refresh = gr.Button("Refresh", scale=1)
            buttons["resume_checkpoint"] = gr.Button("Resume", variant="primary", scale=1)
    queue_trigger = queue_panel.build(session, config_tab, buttons.pop("queue"), gpus)
    message = gr.Markdown(elem_id="lg-train-message")
    error = gr.Markdown(visible=False, elem_classes=["lg-error"])
    with gr.Accordion("Error details", open=False, visible=False) as details_box:
        details = gr.Textbox(show_label=False, lines=12, max_lines=30, interactive=False)
    status = gr.Markdown("**Idle**", elem_classes=["lg-status"])
    memory = gr.Markdown(elem_classes=["lg-small"])
    with gr.Row():
        loss_plot = gr.LinePlot(x="step", y="loss", color="series", title="Loss (raw and smoothed)", height=260,
                                color_map={"raw": "#a5b4fc", "smoothed": "#3730a3"}, elem_id="lg-loss-plot")
        lr_plot = gr.LinePlot(x="step", y="lr", title="Learning rate", height=260)
    gallery = gr.Gallery(label="Validation images: one row per step, newest first", columns=2, height=520,
                         object_fit="contain", elem_id="lg-validation-gallery")
    log = gr.Textbox(label="Log", lines=12, max_lines=12, interactive=False, autoscroll=True)
    # One version string per panel group; the browser fetches a group when its string changes.
    triggers = {name: gr.Textbox(visible="hidden", interactive=False, container=False, show_label=False)
                for name in run_view.GROUPS}
    timer = gr.Timer(POLL_S)

    button_list = [buttons[name] for name in BUTTONS]
    poll_outputs = [status, memory, *triggers.values(), queue_trigger]
    quiet = {"show_progress": "hidden", "queue": False}
    poll_route = JsonRoute("train-poll", lambda: poll(session))
    # The timer runs only in the browser: it fetches poll_route and sets the outputs (its inputs are the
    # outputs' current values, kept when the fetch fails). The plots' values are sent as they are:
    # rendered once in the shared view exactly as the components would postprocess them, which saves
    # Gradio a thread hop per output per browser; the handler runs on the event loop (async).

    async def plots_now() -> list:
        return plots_panel(session)

    timer.tick(None, poll_outputs, poll_outputs, js=poll_route.fetch_js(), **quiet)
    triggers["plots"].change(plots_now, None, [loss_plot, lr_plot], api_name="train_plots", postprocess=False,
                             **quiet)
    triggers["gallery"].change(lambda: gallery_panel(session), None, gallery, api_name="train_gallery", **quiet)
    triggers["log"].change(lambda: log_panel(session), None, log, api_name="train_log", **quiet)
    triggers["controls"].change(lambda: controls_panel(session), None,
                                [error, details_box, details, run_picker, checkpoint, *button_list, timer],
                                api_name="train_controls", **quiet)
    config_inputs = config_tab.inputs()

    def on_start(data):
        return start_run(session, config_tab, data, overwrite=bool(data.get(overwrite)), gpus=data.get(gpus))

    def on_resume(data):
        return resume_run(session, config_tab, data, data.get(run_picker), data.get(checkpoint), data.get(gpus))

    def on_pick(run):
        updates, choices, text = pick_run(session, config_tab, run)
        return {**updates, checkpoint: gr.update(choices=choices, value=choices[0][1] if choices else None),
                message: text}

    def on_refresh(run):
        choices, chosen = run_choices(session, run)
        listed = checkpoint_choices(session, session.workspace.root / chosen) if chosen else []
        return (gr.update(choices=choices, value=chosen),
                gr.update(choices=listed, value=listed[0][1] if listed else None))

    def then_poll(event):  # show the new state at once instead of at the next tick
        event.then(lambda: poll(session), None, poll_outputs, show_progress="hidden", api_visibility="undocumented")

    then_poll(buttons["start"].click(on_start, config_inputs | {overwrite, gpus}, message, api_name="train_start"))
    then_poll(buttons["resume_checkpoint"].click(on_resume, config_inputs | {run_picker, checkpoint, gpus}, message,
                                                 api_name="train_resume"))
    run_picker.input(on_pick, run_picker, [*config_tab.outputs(), checkpoint, message], api_name="train_pick_run")
    for action in ("pause", "continue", "stop", "sample", "save"):
        then_poll(buttons[action].click(lambda action=action: control(session, action), None, message,
                                        api_name=f"train_{action}"))
    refresh.click(on_refresh, run_picker, [run_picker, checkpoint], api_name="train_checkpoints")
    if Context.root_block is not None:  # a page load lists the runs there are now, the live one chosen,
        Context.root_block.load(lambda: on_refresh(None), None, [run_picker, checkpoint],
                                api_visibility="undocumented")
        # and shows the run's state at once, not at the first tick
        Context.root_block.load(lambda: poll(session), None, poll_outputs, api_visibility="undocumented", **quiet)
    return [poll_route]

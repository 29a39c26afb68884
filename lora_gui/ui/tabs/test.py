"""The Test tab: render chosen LoRAs (rows) at several scales (columns) with one prompt and seed.

Works on finished runs (the base model is loaded once and cached) and on the paused active run
(its model in memory is reused: pause, test, continue). The handlers are plain functions of named
values, re-checked on the server (``lora_gui.ui.comparison``), so tests call them directly.
"""

from __future__ import annotations

import gradio as gr
from gradio.context import Context

from lora_gui.config import ConfigError
from lora_gui.engine.compare import NO_LORA
from lora_gui.ui import comparison, runs
from lora_gui.ui.checked import CheckedCheckboxGroup, CheckedDropdown, CheckedNumber, CheckedSlider
from lora_gui.ui.comparison import ComparisonError
from lora_gui.ui.workspace import OutsideWorkspace

FIELDS = ("run", "loras", "scales", "prompt", "negative_prompt", "seed", "steps", "guidance", "width", "height")
DEFAULT_FIELDS = ("prompt", "negative_prompt", "seed", "steps", "guidance", "width", "height")


def run_options(session, config_tab=None, values: dict | None = None,
                live: bool = True) -> tuple[list[tuple[str, str]], str | None]:
    """Run folders under outputs/ as (label with status, folder), and the one to show: the live or paused run,
    else the Config tab's output.dir, else the newest (``live`` False: without the live run's state)."""
    entries = runs.list_runs(session.workspace, session.runner if live else None)
    folders = [entry.folder for entry in entries]
    preferred = [entry.folder for entry in entries if entry.live]
    if config_tab is not None and values is not None:
        try:
            inputs = config_tab.inputs()
            config = config_tab.to_config({c: v for c, v in values.items() if c in inputs})
            preferred.append(session.workspace.relative(session.workspace.resolve(config.output.dir)))
        except (ConfigError, OutsideWorkspace):
            pass
    chosen = next((run for run in preferred if run in folders), folders[0] if folders else None)
    return runs.choices(entries), chosen


def load_run(session, run: str | None) -> dict:
    """The form for a run: its LoRA choices (no LoRA and the newest file preselected) and sample settings."""
    try:
        run_dir = comparison.resolve_run(session, run)
        config = comparison.run_config(run_dir)
    except ComparisonError as exc:
        return {"choices": [(NO_LORA, NO_LORA)], "selected": [NO_LORA], "message": f"⚠ {exc}", "defaults": {}}
    current = comparison.paused_step(session, run_dir)
    choices = comparison.lora_choices(run_dir, current)
    newest = comparison.CURRENT if current is not None else choices[-1].value
    selected = [NO_LORA] + ([newest] if len(choices) > 1 else [])
    note = "" if len(choices) > 1 else "This run has no checkpoints or final LoRA yet; only 'no LoRA' can be shown."
    return {"choices": [(choice.label, choice.value) for choice in choices], "selected": selected, "message": note,
            "defaults": comparison.form_defaults(config)}


def render(session, form: dict, progress=None) -> tuple[object, str | None, str]:
    """(grid image, saved PNG path, message); on a problem (None, None, what to do)."""
    try:
        request = comparison.build_request(session, *(form.get(name) for name in FIELDS))
        result = comparison.run_comparison(session, request, _reporter(progress))
    except (ComparisonError, ValueError) as exc:
        return None, None, f"⚠ {exc}"
    except Exception as exc:  # the engine's own failures: say what happened, keep the app alive
        return None, None, (f"⚠ Rendering failed: {type(exc).__name__}: {exc}. Check the run's files and the "
                            "settings above; if it keeps failing, restart the app.")
    where = session.workspace.relative(result.path)
    rows, columns = len(request.loras), len(request.scales)
    return result.image, str(result.path), f"Rendered {rows} × {columns} with {result.used}; saved `{where}`."


def _reporter(progress):
    if progress is None:
        return None

    def report(done: int, total: int) -> None:
        text = "Loading the model" if done == 0 else f"Rendered {done} of {total} images"
        progress(done / total if total else 0.0, desc=text)

    return report


def build(session, config_tab) -> None:
    tab = Context.block
    runs, chosen = run_options(session, live=False)  # entering the tab lists them with the live run's state
    with gr.Row():
        run = CheckedDropdown(runs, value=chosen, label="Run folder", scale=4)
        refresh = gr.Button("Refresh", scale=1)
    initial = load_run(session, chosen) if chosen else {"choices": [], "selected": [], "message": "", "defaults": {}}
    loras = CheckedCheckboxGroup(initial["choices"], value=initial["selected"], label="LoRAs (rows)",
                             info="'no LoRA', a paused run's current weights, the run's checkpoints and its final LoRA")
    scales = gr.Textbox(comparison.DEFAULT_SCALES, label="LoRA scales (columns)",
                        info="Numbers from -4 to 4, at most 8, separated by commas")
    start = {"seed": 1234, "steps": 20, "guidance": 5.0, "width": 512, "height": 512, **initial["defaults"]}
    prompt = gr.Textbox(start.get("prompt", ""), label="Prompt", lines=2)
    negative = gr.Textbox(start.get("negative_prompt", ""), label="Negative prompt (used by models sampled with classifier-free guidance)")
    with gr.Row():
        seed = CheckedNumber(start["seed"], label="Seed", precision=0, minimum=0, maximum=2**32 - 1)
        steps = CheckedSlider(1, 200, value=start["steps"], step=1, label="Steps")
        guidance = CheckedSlider(0, 50, value=start["guidance"], step=0.5, label="Guidance")
        width = CheckedNumber(start["width"], label="Width", precision=0, minimum=64, maximum=2048)
        height = CheckedNumber(start["height"], label="Height", precision=0, minimum=64, maximum=2048)
    render_button = gr.Button("Render", variant="primary")
    message = gr.Markdown()
    image = gr.Image(label="Comparison (rows: LoRAs, columns: scales)", type="pil", format="png",
                     interactive=False)
    file = gr.File(label="Comparison PNG", interactive=False)

    named = dict(zip(FIELDS, (run, loras, scales, prompt, negative, seed, steps, guidance, width, height),
                     strict=True))
    run_outputs = [loras, message, *(named[name] for name in DEFAULT_FIELDS)]

    def on_run(value):
        form = load_run(session, value)
        defaults = [form["defaults"].get(name, gr.skip()) for name in DEFAULT_FIELDS]
        return [gr.update(choices=form["choices"], value=form["selected"]), form["message"], *defaults]

    def on_refresh(data=None):
        runs, chosen = run_options(session, config_tab, data)
        return [gr.update(choices=runs, value=chosen), *on_run(chosen)]

    def on_render(data, progress=gr.Progress()):  # noqa: B008 (gradio finds the tracker by its default)
        form = {name: data.get(component) for name, component in named.items()}
        grid, path, text = render(session, form, progress)
        return (gr.skip(), gr.skip(), text) if grid is None else (grid, path, text)

    run.input(on_run, run, run_outputs, api_name="test_run")
    refresh_inputs = config_tab.inputs()
    refresh.click(on_refresh, refresh_inputs, [run, *run_outputs], api_name="test_refresh")
    if isinstance(tab, gr.Tab):  # entering the tab lists runs written since the page loaded
        tab.select(on_refresh, refresh_inputs, [run, *run_outputs], api_visibility="undocumented")
    render_button.click(on_render, set(named.values()), [image, file, message], concurrency_limit=1,
                        api_name="test_render")

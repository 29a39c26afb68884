"""The Train tab's queue panel: the queued runs with their states, and moving, removing, holding and starting.

The panel is fetched when the queue's version (one of the Train tab's polled strings) changes, so a run that
the queue starts or ends shows in every open browser tab without a poll of its own."""

from __future__ import annotations

import gradio as gr
from gradio.context import Context

from lora_gui.config import ConfigError
from lora_gui.ui import queue_view
from lora_gui.ui.checked import CheckedDropdown
from lora_gui.ui.guard import message_guard
from lora_gui.ui.run_start import StartRefused, chosen_processes


def add_run(session, config_tab, values: dict, gpus=1) -> str:
    """The Config tab's run added to the queue (to train on the Train tab's GPUs), or why not."""
    inputs = config_tab.inputs()
    try:
        processes = chosen_processes(session, gpus)
        config = config_tab.to_config({c: v for c, v in values.items() if c in inputs})
        return queue_view.add_to_queue(session, config, processes)
    except ConfigError as exc:
        return f"⚠ {exc}\n\nFix it on the Config tab, then press Add to queue again."
    except StartRefused as exc:
        return f"⚠ {exc}"


def title(panel: queue_view.QueuePanel | None) -> str:
    counts = {} if panel is None else panel.counts
    shown = [f"{counts[state]} {state}" for state in ("running", "waiting") if counts.get(state)]
    ended = sum(count for state, count in counts.items() if state not in ("running", "waiting"))
    if ended:
        shown.append(f"{ended} ended")
    return f"Queue: {', '.join(shown)}" if shown else "Queue: line runs up to start one after another"


def version(session, nonce: str) -> str:
    return f"queue-{nonce}-{session.run_queue.version()}"


def build(session, config_tab, add_button: gr.Button, gpus: gr.components.Component) -> gr.Textbox:
    """The panel (an accordion, opened when something is queued); returns the hidden textbox the Train tab's
    poll sets to the queue's version."""
    with gr.Accordion(title(None), open=False, elem_id="lg-queue") as accordion:
        message = gr.Markdown(elem_id="lg-queue-message")
        status = gr.Markdown(elem_id="lg-queue-status")
        table = gr.Dataframe(headers=queue_view.TABLE_HEADERS, interactive=False, wrap=True,
                             elem_id="lg-queue-table", column_widths=["6%", "14%", "45%", "35%"])
        with gr.Row():
            picker = CheckedDropdown([], value=None, label="Queued run", scale=4, elem_id="lg-queue-pick",
                                 allow_custom_value=True)  # a stale or foreign id gets the handler's message
            up = gr.Button("Move up", scale=1)
            down = gr.Button("Move down", scale=1)
            remove = gr.Button("Remove", scale=1)
        with gr.Row():
            start = gr.Button("Start queue", interactive=False)
            hold = gr.Button("Hold queue", interactive=False)  # held, added runs wait to be ordered
            clear = gr.Button("Clear ended runs", interactive=False)
    trigger = gr.Textbox(visible="hidden", interactive=False, container=False, show_label=False)
    outputs = [accordion, status, table, picker, start, hold, clear]

    def shown(chosen=None, opened: bool | None = None) -> list:
        panel = queue_view.panel(session.run_queue)
        ids = [entry_id for _, entry_id in panel.choices]
        accordion_update = gr.update(label=title(panel)) if opened is None else gr.update(label=title(panel),
                                                                                           open=opened)
        return [accordion_update, panel.status, panel.rows,
                gr.update(choices=panel.choices, value=chosen if chosen in ids else None),
                gr.update(interactive=panel.held), gr.update(interactive=not panel.held),
                gr.update(interactive=panel.has_done)]

    quiet = {"show_progress": "hidden"}
    add_button.click(lambda data: add_run(session, config_tab, data, data.get(gpus)), config_tab.inputs() | {gpus},
                     message,
                     api_name="queue_add").then(lambda chosen: shown(chosen, opened=True), picker,
                                                outputs, api_visibility="undocumented", **quiet)
    actions = {up: ("queue_up", lambda chosen: queue_view.move(session, chosen, -1)),
               down: ("queue_down", lambda chosen: queue_view.move(session, chosen, 1)),
               remove: ("queue_remove", lambda chosen: queue_view.remove(session, chosen)),
               start: ("queue_start", lambda chosen: queue_view.start_queue(session)),
               hold: ("queue_hold", lambda chosen: queue_view.hold_queue(session)),
               clear: ("queue_clear", lambda chosen: queue_view.clear_done(session))}
    guard = message_guard(message, (StartRefused,), "Press the button again; if it persists, restart the app.")
    for button, (name, action) in actions.items():
        button.click(guard(action), picker, message, api_name=name).then(
            shown, picker, outputs, api_visibility="undocumented", **quiet)
    trigger.change(shown, picker, outputs, api_name="queue_panel", queue=False, **quiet)
    if Context.root_block is not None:
        # a page load opens the panel when something is queued or has run from the queue
        Context.root_block.load(lambda: shown(opened=bool(session.run_queue.rows()) or None), None, outputs,
                                api_visibility="undocumented")
    return trigger

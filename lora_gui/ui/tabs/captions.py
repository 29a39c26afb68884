"""The Captions tab: auto-caption the dataset, edit any caption, bulk edits with a preview and undo.

Works on the folder chosen on the Dataset tab. Handlers are thin wrappers around
``lora_gui.ui.captions_view``, which re-checks every value on the server. Captioning holds the
session's busy lock; model captioners are refused while a training run uses the GPU (the template
captioner needs no GPU and always works).
"""

from __future__ import annotations

import functools

import gradio as gr
from gradio.context import Context

from lora_gui.ui import captions_view as V
from lora_gui.ui.captions_view import CaptionsError
from lora_gui.ui.checked import CheckedDropdown, CheckedNumber, CheckedRadio, CheckedSlider
from lora_gui.ui.guard import message_guard
from lora_gui.ui.session import AppSession

INTRO = ("Caption the dataset chosen on the **Dataset** tab with a captioning model, then fix any caption by hand "
         "or change many at once. Captions are the `.txt` files beside the images.")
MODEL_INFO = ("A Hugging Face id (owner/name, downloaded once into the workspace cache) or a folder inside the "
              "workspace; empty means the captioner's default")


def build(session: AppSession, dataset_tab) -> None:
    tab, workspace, job = Context.block, session.workspace, V.CaptionJob(session)
    gr.Markdown(INTRO)
    folder_note = gr.Markdown()
    fields = V.captioner_fields(V.DEFAULT_CAPTIONER)
    with gr.Accordion("Auto-caption", open=True):
        with gr.Row():
            captioner = CheckedDropdown(V.captioner_choices(), value=V.DEFAULT_CAPTIONER, label="Captioner", scale=2)
            model = gr.Textbox(fields["model"], label="Model", info=MODEL_INFO, scale=3,
                               visible=fields["uses_model"])
        template = gr.Textbox(V.DEFAULT_TEMPLATE, label="Template", visible=fields["template"],
                              info="Placeholders: {trigger}, {filename} (words from the file name), {folder}")
        threshold = CheckedSlider(0.05, 1.0, value=0.35, step=0.01, label="Tag threshold", visible=fields["threshold"],
                              info="Confidence a tag needs to be written; lower gives more tags")
        with gr.Row():
            trigger = gr.Textbox(label="Trigger word", placeholder="sks", info="Put first in every caption, once")
            prefix = gr.Textbox(label="Prefix", info="Text before each caption")
            suffix = gr.Textbox(label="Suffix", info="Text after each caption")
        with gr.Row():
            mode = CheckedRadio(V.MODE_CHOICES, value="skip_existing", label="Existing captions", scale=3)
            max_length = CheckedNumber(0, label="Max length", precision=0, minimum=0, maximum=V.MAX_LENGTH, scale=1,
                                   info="Characters; 0 = no limit")
            batch_size = CheckedNumber(0, label="Batch size", precision=0, minimum=0, maximum=V.MAX_BATCH, scale=1,
                                   info="0 = the captioner's default")
        with gr.Row():
            run = gr.Button("Caption dataset", variant="primary", scale=3)
            stop = gr.Button("Stop", variant="stop", scale=1)
        run_message = gr.Markdown()
    with gr.Accordion("Edit captions", open=True):
        with gr.Row():
            reload = gr.Button("Reload", scale=1)
            save_table = gr.Button("Save table edits", variant="primary", scale=2)
        editor_message = gr.Markdown()
        with gr.Row():
            table = gr.Dataframe(headers=V.EDITOR_HEADERS, datatype="str", type="array", interactive=True,
                                 static_columns=[0], wrap=True, max_height=640,
                                 column_widths=["30%", "70%"], show_search="search", scale=3,
                                 label="Click a caption to edit it; click a row to see its image")
            with gr.Column(scale=2):
                preview = gr.Image(label="Selected image", type="pil", interactive=False, height=320)
                selected_caption = gr.Textbox(label="Caption of the selected image", lines=4)
                save_one = gr.Button("Save this caption")
    with gr.Accordion("Bulk edit", open=True):
        operation = CheckedRadio([(label, key) for key, label in V.OPERATIONS.items()], value="replace",
                             label="Change every caption")
        with gr.Row() as replace_row:
            find = gr.Textbox(label="Find", scale=3)
            replace = gr.Textbox(label="Replace with", scale=3, info="With regex, \\1 is the first group")
            regex = gr.Checkbox(label="Regular expression", scale=1)
            case_sensitive = gr.Checkbox(True, label="Match case", scale=1)
        with gr.Row(visible=False) as tag_row:
            tag = gr.Textbox(label="Tag", info="Several tags can be separated by commas", scale=3)
            position = CheckedRadio(["start", "end"], value="end", label="Add at", scale=1)
        with gr.Row():
            preview_bulk = gr.Button("Preview", scale=2)
            apply_bulk = gr.Button("Apply", variant="primary", scale=2)
            undo = gr.Button("Undo last bulk edit", scale=1)
        bulk_message = gr.Markdown()
        changes = gr.Dataframe(headers=V.PREVIEW_HEADERS, type="array", interactive=False, wrap=True,
                               max_height=480, label="Preview: nothing is written until Apply")
    loaded, selected, pending, shown = gr.State({}), gr.State(None), gr.State(None), gr.State(None)

    form = {"captioner": captioner, "model": model, "template": template, "threshold": threshold,
            "trigger": trigger, "prefix": prefix, "suffix": suffix, "mode": mode, "max_length": max_length,
            "batch_size": batch_size}
    bulk_form = {"operation": operation, "find": find, "replace": replace, "regex": regex,
                 "case_sensitive": case_sensitive, "tag": tag, "position": position, "trigger": trigger}
    folder = dataset_tab.folder

    def editor(root) -> dict:
        rows, snapshot, note = V.editor_rows(root)
        return {table: rows, loaded: snapshot, editor_message: note, folder_note: _folder_text(workspace, root),
                bulk_message: V.last_edit_note(root), shown: str(root)}

    def on_load(folder_text):
        return editor(V.resolve_folder(workspace, folder_text))

    def on_enter(folder_text, shown_folder):  # keeps unsaved table edits unless the folder changed
        root = V.resolve_folder(workspace, folder_text)
        return {shown: shown_folder} if str(root) == shown_folder else editor(root)

    def on_captioner(name):
        own = V.captioner_fields(name)
        return {model: gr.update(value=own["model"], visible=own["uses_model"]),
                template: gr.update(visible=own["template"]), threshold: gr.update(visible=own["threshold"])}

    def on_run(data, progress=gr.Progress()):  # noqa: B008 (gradio finds the tracker by its default)
        values = {name: data.get(component) for name, component in form.items()}
        message = job.run(data.get(folder), values, functools.partial(_show_progress, progress))
        return {**editor(V.resolve_folder(workspace, data.get(folder))), run_message: message}

    def on_select(folder_text, evt: gr.SelectData):
        name, caption = (list(evt.row_value or []) + [None, None])[:2]
        image = V.preview_image(V.resolve_folder(workspace, folder_text), name)
        return {preview: image, selected_caption: caption or "", selected: name}

    def save(folder_text, rows, snapshot, edits: dict) -> dict:
        root = V.writable_folder(workspace, folder_text)
        job.check_idle(root)
        result = V.save_edits(root, edits, snapshot or {})
        rows, snapshot = V.merge_saved(rows, snapshot or {}, result)
        return {table: rows, loaded: snapshot, editor_message: result.message()}

    def on_save_table(folder_text, rows, snapshot):
        return save(folder_text, rows, snapshot, V.table_edits(rows, snapshot or {}))

    def on_save_one(folder_text, name, text, rows, snapshot):
        if name is None:
            raise CaptionsError("Click a row of the table first, then edit its caption here.")
        return save(folder_text, rows, snapshot, {name: text})

    def on_operation(choice):
        return {replace_row: gr.update(visible=choice == "replace"),
                tag_row: gr.update(visible=choice in ("add_tag", "remove_tag")),
                position: gr.update(visible=choice == "add_tag")}

    def on_preview(data):
        root = V.resolve_folder(workspace, data.get(folder))
        edit = V.preview_bulk(root, {name: data.get(component) for name, component in bulk_form.items()})
        rows, message = V.preview_rows(edit)
        return {changes: rows, pending: edit if edit.changes else None, bulk_message: message}

    def on_apply(folder_text, edit):
        root = V.writable_folder(workspace, folder_text)
        job.check_idle(root)
        message = V.apply_bulk(edit, root)
        return {**editor(root), changes: [], pending: None, bulk_message: message}

    def on_undo(folder_text):
        root = V.writable_folder(workspace, folder_text)
        job.check_idle(root)
        message = V.undo_bulk(root)
        return {**editor(root), changes: [], pending: None, bulk_message: message}

    editor_outputs = [table, loaded, editor_message, folder_note, bulk_message, shown]
    advice = "Check the dataset folder and its files, then try again."
    run_guard, editor_guard, bulk_guard = (message_guard(m, (CaptionsError,), advice)
                                           for m in (run_message, editor_message, bulk_message))
    captioner.input(on_captioner, captioner, [model, template, threshold], api_visibility="private")
    dataset_tab.trigger.change(lambda word: word, dataset_tab.trigger, trigger, api_visibility="private")
    run.click(run_guard(on_run), {folder, *form.values()}, [*editor_outputs, run_message], api_name="captions_run",
              concurrency_limit=None)  # a second run is refused by the busy lock at once, not queued
    stop.click(lambda: job.request_stop(), None, run_message, api_name="captions_stop", queue=False)
    reload.click(editor_guard(on_load), folder, editor_outputs, api_name="captions_load")
    if isinstance(tab, gr.Tab):  # entering the tab shows the folder chosen on the Dataset tab
        tab.select(editor_guard(on_enter), [folder, shown], editor_outputs, api_visibility="private")
    table.select(editor_guard(on_select), folder, [preview, selected_caption, selected, editor_message],
                 api_visibility="private")
    writes = dict(concurrency_id="captions_write", concurrency_limit=1)
    save_table.click(editor_guard(on_save_table), [folder, table, loaded], [table, loaded, editor_message],
                     api_name="captions_save", **writes)
    save_one.click(editor_guard(on_save_one), [folder, selected, selected_caption, table, loaded],
                   [table, loaded, editor_message], api_name="captions_save_one", **writes)
    operation.change(on_operation, operation, [replace_row, tag_row, position], api_visibility="private")
    preview_bulk.click(bulk_guard(on_preview), {folder, *bulk_form.values()}, [changes, pending, bulk_message],
                       api_name="captions_bulk_preview")
    apply_bulk.click(bulk_guard(on_apply), [folder, pending], [*editor_outputs, changes, pending],
                     api_name="captions_bulk_apply", **writes)
    undo.click(bulk_guard(on_undo), folder, [*editor_outputs, changes, pending], api_name="captions_bulk_undo",
               **writes)


def _show_progress(progress, event) -> None:
    shown = V.describe_event(event)
    if shown is not None:
        value, desc, unit = shown
        progress(value, desc=desc, unit=unit)


def _folder_text(workspace, root) -> str:
    text = f"Dataset folder: {V.md_code(workspace.relative(root))} (choose another on the Dataset tab)."
    if workspace.read_only(root):
        text += (" It is an extra dataset folder (--datasets): the app only reads it, so captioning and edits are "
                 "refused; copy it into datasets/ to change its captions.")
    return text

"""The Config tab: VRAM preset picker, memory and time plan, the schema-generated form, load/save, CLI command.

Handlers take one dict {component: value} (the form's components passed as a set) and re-validate
everything on the server; problems come back as messages naming the key, never as tracebacks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.context import Context

from lora_gui.config import FAMILIES, ConfigError, ModelSection, TrainingConfig, validate_config
from lora_gui.engine.families.detect import AUTO, detect_family
from lora_gui.engine.planner import HEADROOM, PlanError, plan_memory
from lora_gui.engine.planner.advice import fitting_advice
from lora_gui.ui import forms
from lora_gui.ui import presets as P
from lora_gui.ui.checked import CheckedDropdown, CheckedRadio
from lora_gui.ui.draft import load_draft, save_draft
from lora_gui.ui.guard import log, message_guard
from lora_gui.ui.session import AppSession, GpuInfo
from lora_gui.ui.workspace import OutsideWorkspace, Workspace, safe_folder_name

INTRO = ("Pick the VRAM preset for your GPU and click **Apply preset**, then adjust the form. "
         "Hover a field's label for what it does; rarely changed fields are under *Advanced*.")


@dataclass
class ConfigTab:
    components: dict[str, gr.components.Component]  # "section.key" -> component, every schema field
    workspace: Workspace
    # Whether output.dir follows output.name (outputs/<name>), until the user types a folder of their own
    follows: gr.Checkbox | None = None

    def outputs(self) -> list:
        """What ``fill`` updates: every field, and whether output.dir follows the name."""
        return [*self.components.values(), *([self.follows] if self.follows is not None else [])]

    def inputs(self) -> set:
        return set(self.components.values())

    def form_values(self, values: dict) -> dict[str, Any]:
        return {key: values[comp] for key, comp in self.components.items() if comp in values}

    def to_config(self, values: dict) -> TrainingConfig:
        """{component: value} as Gradio passes it -> a validated config with absolute paths."""
        return form_to_config(self.form_values(values), self.workspace)

    def fill(self, form: dict[str, Any]) -> dict:
        """Updates that put ``form`` into the components, with the family's model and target choices."""
        family = form.get("model.family") if form.get("model.family") in FAMILIES else DEFAULT_FAMILY
        updates = {self.components[key]: value for key, value in form.items() if key in self.components}
        base_options = forms.base_choices(family, self.workspace)
        target_options = list(forms.target_choices(family))
        for key, options in (("model.base", base_options), ("lora.targets", target_options)):
            updates[self.components[key]] = gr.update(value=form[key], choices=forms.with_value(options, form[key]))
        if self.follows is not None:
            name, folder = form.get("output.name"), form.get("output.dir")
            updates[self.follows] = isinstance(name, str) and folder == name_folder(name)
        return updates

    def load_file(self, path: Path, label: str) -> tuple[dict, str]:
        """The updates that show a config file in the form, and what to tell the user; raises ConfigError."""
        config = P.load_config(path)
        shown = forms.relative_paths(forms.config_to_values(config.model_dump(mode="json")), self.workspace)
        if shown.get("model.family") == AUTO:
            detect_into(shown, self.workspace)
        outside = [k for k in forms.PATH_KEYS if isinstance(shown.get(k), str) and Path(shown[k]).is_absolute()]
        note = f" ⚠ Outside the workspace, fix before training: {', '.join(outside)}." if outside else ""
        return self.fill(shown), f"✓ Loaded {label}.{note}"


def form_to_config(form: dict[str, Any], workspace: Workspace) -> TrainingConfig:
    data = forms.absolute_paths(forms.values_to_data(form), workspace)
    config = validate_config(data)
    check_consistency(config)
    return config


def check_consistency(config: TrainingConfig) -> None:
    """Cross-field checks the schema cannot make: builtin model vs family, target preset names."""
    from lora_gui.engine.families.builtin import builtin_family, is_builtin

    model = config.model
    if is_builtin(model.base):
        try:
            family = builtin_family(model.base)
        except ValueError as exc:
            raise ConfigError(f"model.base: {exc}") from None
        if family != model.family:
            raise ConfigError(f"model.base: {model.base} is a {family} model but model.family is "
                              f"{model.family}; pick a base model of the same family.")
    targets = forms.target_choices(model.family)
    if config.lora.targets not in targets:
        raise ConfigError(f"lora.targets: {config.lora.targets!r} is not a target preset for {model.family}; "
                          f"choose one of: {', '.join(targets)}.")


DEFAULT_FAMILY = ModelSection.model_fields["family"].default


def initial_values(tier: str) -> dict[str, Any]:
    """The form a new session starts with: the default family at the detected tier's preset, prompts included."""
    return P.apply_preset({}, P.preset_name(DEFAULT_FAMILY, tier))


def panel_texts(form: dict[str, Any], tier: Any, saved: Any, workspace: Workspace,
                gpu: GpuInfo | None) -> dict[str, str]:
    """Everything shown around the form: preset preview, validation, CLI command."""
    texts = {}
    try:
        name = P.preset_name(form.get("model.family"), tier)
        texts["preset"] = P.preset_summary(name)
        texts["changes"] = P.changes_table(P.preset_changes(form, name), name)
    except ConfigError as exc:
        texts["preset"], texts["changes"] = f"⚠ {exc}", ""
    try:
        config = form_to_config(form, workspace)
    except ConfigError as exc:
        texts["validate"] = P.problems_text(str(exc))
        texts["cli"] = "# Fix the problems in the form first."
        return texts
    texts["validate"] = P.valid_text(config, gpu.count if gpu is not None else 1)
    saved_path = Path(saved) if isinstance(saved, str) and P.same_config_file(Path(saved), config) else None
    texts["cli"] = P.cli_command(config, saved_path)
    return texts


@dataclass
class Widgets:
    """The tab's components besides the form fields."""
    tier: gr.Radio
    apply: gr.Button
    preset: gr.Markdown
    changes: gr.Markdown
    applied: gr.Markdown
    validate: gr.Markdown
    upload: gr.File
    saved: gr.Dropdown
    load: gr.Button
    refresh_list: gr.Button
    save_name: gr.Textbox
    overwrite: gr.Checkbox
    save: gr.Button
    file_status: gr.Markdown
    cli: gr.Code
    saved_path: gr.State  # the last saved file, for the CLI command
    follows: gr.Checkbox  # hidden: whether output.dir still follows output.name
    plan_button: gr.Button
    plan: gr.Markdown  # the traced memory plan, made on request (it takes seconds to a minute)

    def panels(self) -> dict[str, gr.components.Component]:
        return {"preset": self.preset, "changes": self.changes, "validate": self.validate,
                "cli": self.cli}


def build(session: AppSession, dataset_folder: gr.Textbox | None = None) -> ConfigTab:
    workspace, gpu = session.workspace, session.gpu
    tier = P.detect_tier(gpu.total_gib if gpu else None)
    initial = initial_values(tier)
    if dataset_folder is not None and isinstance(dataset_folder.value, str):
        initial["dataset.dir"] = show_folder(dataset_folder.value, workspace)
    tab, widgets = layout(workspace, gpu, tier, initial)
    Handlers(tab, widgets, gpu).wire(dataset_folder)
    return tab


def layout(workspace: Workspace, gpu: GpuInfo | None, tier: str, initial: dict[str, Any]):
    first = panel_texts(initial, tier, None, workspace, gpu)
    family = initial["model.family"]
    gr.Markdown(INTRO)
    with gr.Row(equal_height=True):
        gr.Markdown(f"**Detected GPU:** {gpu.label if gpu else 'none (CPU only)'}")
        tier_radio = CheckedRadio(list(P.TIER_LABELS), value=tier, label="VRAM preset",
                              info="For the model family chosen under Model. Preselected from the detected GPU.")
        apply_btn = gr.Button("Apply preset", variant="primary", scale=0)
    preset_md = gr.Markdown(first["preset"])
    with gr.Row():
        changes_md = gr.Markdown(first["changes"])
        applied_md = gr.Markdown("")
    plan_btn = gr.Button("Plan memory and time: trace the training step at full size (seconds to a minute)",
                         scale=0, visible=gpu is not None)
    plan_md = gr.Markdown(P.plan_hint(gpu), elem_id="lg-memory-plan")
    components = forms.build_form(initial, forms.base_choices(family, workspace),
                                  list(forms.target_choices(family)))
    validate_md = gr.Markdown(first["validate"])
    with gr.Accordion("Load and save config files", open=True):
        with gr.Row():
            upload = gr.File(label=f"Load a config file (.toml, .yaml, .json; up to {P.MAX_CONFIG_BYTES // 10**6} MB)",
                             type="filepath",
                             file_types=list(P.CONFIG_SUFFIXES), file_count="single")
            with gr.Column():
                # Custom values allowed so a list older than this session's files still works;
                # the handler accepts only names that are in configs/ now.
                saved_dd = CheckedDropdown(P.list_saved_configs(workspace), value=None, label="Saved configs",
                                       info=f"Files in {workspace.configs}", allow_custom_value=True)
                with gr.Row():
                    load_btn = gr.Button("Load selected")
                    refresh_btn = gr.Button("Refresh list")
        with gr.Row():
            save_name = gr.Textbox(label="Save as", placeholder="my-lora", info="Saved to configs/<name>.toml")
            overwrite = gr.Checkbox(label="Overwrite", value=False, info="Replace a config of the same name")
            save_btn = gr.Button("Save config", variant="primary", scale=0)
        file_md = gr.Markdown("")
    cli_code = gr.Code(first["cli"], language="shell", label="Equivalent CLI command", interactive=False,
                       buttons=["copy"])
    widgets = Widgets(tier_radio, apply_btn, preset_md, changes_md, applied_md, validate_md, upload,
                      saved_dd, load_btn, refresh_btn, save_name, overwrite, save_btn, file_md, cli_code,
                      gr.State(None),
                      gr.Checkbox(initial["output.dir"] == name_folder(initial["output.name"]), visible="hidden",
                                  elem_id="lg-output-follows-name"), plan_btn, plan_md)
    return ConfigTab(components, workspace, widgets.follows), widgets


class Handlers:
    """Event handlers: each takes {component: value}, re-validates, and answers with messages."""

    def __init__(self, tab: ConfigTab, widgets: Widgets, gpu: GpuInfo | None) -> None:
        self.tab, self.w, self.gpu = tab, widgets, gpu
        self.dataset_folder: gr.Textbox | None = None  # the Dataset tab's folder, restored with the draft
        self.matmul_tflops: float | None = None  # the GPU's measured speed, on the first plan
        self.workspace = tab.workspace
        self.c = tab.components
        w = widgets
        def guarded(status):
            return message_guard(status, (ConfigError, OutsideWorkspace), "The details are in the terminal that "
                                 "runs the app; please report them.", symbol="✗")

        self.refresh = guarded(w.validate)(self.refresh)
        self.apply = guarded(w.applied)(self.apply)
        self.change_family = guarded(w.validate)(self.change_family)
        self.load_upload = guarded(w.file_status)(self.load_upload)
        self.load_saved = guarded(w.file_status)(self.load_saved)
        self.save = guarded(w.file_status)(self.save)
        self.plan = message_guard(w.plan, (ConfigError, OutsideWorkspace, PlanError), "The details are in the "
                                  "terminal that runs the app; please report them.", symbol="✗")(self.plan)

    def refresh(self, values: dict):
        """The panels around the form; the form is kept as the draft a page load shows again."""
        form = self.tab.form_values(values)
        save_draft(self.workspace, form, values.get(self.w.tier))
        texts = panel_texts(form, values.get(self.w.tier), values.get(self.w.saved_path), self.workspace, self.gpu)
        panels = self.w.panels()
        return {panels[name]: text for name, text in texts.items()}

    def restore(self):
        """On a page load: the form as it was last edited (``ui/draft.py``), and the saved configs there are now."""
        updates = {component: gr.skip() for component in self.tab.outputs()}
        updates |= {self.w.tier: gr.skip(), self.w.saved: gr.update(choices=P.list_saved_configs(self.workspace))}
        if self.dataset_folder is not None:
            updates[self.dataset_folder] = gr.skip()
        draft = load_draft(self.workspace, set(self.c))
        if draft is None:
            return updates
        form, tier = draft
        try:
            updates |= self.fill({**self.tab.form_values({c: c.value for c in self.c.values()}), **form})
        except Exception:  # a draft this version cannot show: start from the defaults, keep the file
            log.exception("The Config tab's draft could not be shown")
            return updates
        if tier in P.TIER_LABELS:
            updates[self.w.tier] = tier
        if self.dataset_folder is not None and isinstance(form.get("dataset.dir"), str):
            updates[self.dataset_folder] = form["dataset.dir"]
        return updates

    def fill(self, form: dict[str, Any]) -> dict:
        return self.tab.fill(form)

    def apply(self, values: dict):
        form = self.tab.form_values(values)
        name = P.preset_name(form.get("model.family"), values.get(self.w.tier))
        rows = P.preset_changes(form, name)
        return {**self.fill(P.apply_preset(form, name)), self.w.applied: P.changes_table(rows, name, applied=True)}

    def change_family(self, values: dict):
        form = self.tab.form_values(values)
        note = detect_into(form, self.workspace)
        family = form.get("model.family")
        if family not in FAMILIES:
            raise ConfigError(f"model.family: choose one of auto, {', '.join(FAMILIES)}.")
        if not note and base_belongs_elsewhere(form.get("model.base"), family):
            form["model.base"] = forms.default_base(family, self.gpu is not None)
        if form.get("lora.targets") not in forms.target_choices(family):
            form["lora.targets"] = "auto"
        return {**self.fill(form), self.w.applied: note}

    def load_path(self, path: Path, label: str) -> dict:
        updates, message = self.tab.load_file(path, label)
        return {**updates, self.w.file_status: message}

    def load_upload(self, path: Any):
        if not isinstance(path, str) or not path:  # the upload box was cleared
            return {self.w.file_status: gr.skip()}  # an empty dict reads as a missing value to Gradio
        if not uploaded_through_this_page(Path(path)):
            raise ConfigError("That file was not uploaded through this page; choose it with the upload box.")
        return self.load_path(Path(path), Path(path).name)

    def load_saved(self, name: Any):
        return self.load_path(P.saved_config_path(self.workspace, name), f"configs/{name}")

    def save(self, values: dict):
        try:
            config = self.tab.to_config(values)
        except ConfigError as exc:
            return {self.w.file_status: f"✗ Not saved. {exc}"}
        path = P.save_named_config(config, self.workspace, values.get(self.w.save_name), values.get(self.w.overwrite))
        return {self.w.file_status: f"✓ Saved configs/{path.name}. Train it from a terminal with the command below.",
                self.w.saved_path: str(path),
                self.w.saved: gr.update(choices=P.list_saved_configs(self.workspace), value=path.name)}

    def plan(self, values: dict):
        if self.gpu is None:  # the button is hidden, but a share link can still call the handler
            return {self.w.plan: P.plan_hint(None)}
        config = form_to_config(self.tab.form_values(values), self.workspace)
        plan = plan_memory(config)
        if self.matmul_tflops is None:
            import torch

            from lora_gui.engine.devices import measured_matmul_tflops

            self.matmul_tflops = measured_matmul_tflops(torch.device("cuda"))
        advice = fitting_advice(config, plan, self.gpu.total_gib) if plan.headroom(self.gpu.total_gib) < HEADROOM else None
        return {self.w.plan: P.plan_text(plan, self.gpu, self.matmul_tflops, advice)}

    def wire(self, dataset_folder: gr.Textbox | None) -> None:
        self.dataset_folder = dataset_folder
        w, c, form = self.w, self.c, self.tab.inputs()
        panel_inputs, panels = form | {w.tier, w.saved_path}, list(w.panels().values())
        then = dict(fn=self.refresh, inputs=panel_inputs, outputs=panels, show_progress="hidden",
                    api_visibility="undocumented")
        chained = {c["model.family"], c["output.name"]}
        gr.on([x.input for x in form if x not in chained] + [w.tier.change], self.refresh, panel_inputs, panels,
              trigger_mode="always_last", show_progress="hidden", api_name="config_refresh")
        filled = self.tab.outputs()
        w.apply.click(self.apply, form | {w.tier}, filled + [w.applied], api_name="config_apply_preset").then(**then)
        c["model.family"].input(self.change_family, form, filled + [w.validate, w.applied],
                                api_name="config_change_family").then(**then)
        # In the page itself: a round trip per keystroke would answer with the folder of an earlier keystroke.
        c["output.name"].input(None, [c["output.name"], c["output.dir"], w.follows], [c["output.dir"], w.follows],
                               js=FOLLOW_NAME_JS, trigger_mode="multiple").then(**then)
        c["output.dir"].input(None, c["output.dir"], w.follows, js="(folder) => folder === ''", trigger_mode="multiple")
        w.upload.upload(self.load_upload, w.upload, filled + [w.file_status]).then(**then)
        w.load.click(self.load_saved, w.saved, filled + [w.file_status], api_name="config_load_saved").then(**then)
        w.plan_button.click(self.plan, form, w.plan, api_name="config_plan")
        w.refresh_list.click(lambda: gr.update(choices=P.list_saved_configs(self.workspace)), None, w.saved)
        w.save.click(self.save, form | {w.save_name, w.overwrite}, [w.file_status, w.saved_path, w.saved],
                     api_name="config_save").then(**then)
        if dataset_folder is not None:
            dataset_folder.change(lambda folder: show_folder(folder, self.workspace), dataset_folder,
                                  c["dataset.dir"]).then(**then)
        if Context.root_block is not None:
            restored = [*filled, w.tier, w.saved, *([dataset_folder] if dataset_folder is not None else [])]
            Context.root_block.load(self.restore, None, restored, api_visibility="undocumented").then(**then)


def name_folder(name: str) -> str:
    """The output folder that follows a LoRA name (FOLLOW_NAME_JS does the same in the page)."""
    return f"outputs/{safe_folder_name(name, 'my-lora')}"


FOLLOW_NAME_JS = """(name, folder, follows) => {
  if (!follows) return [folder, follows];
  const safe = String(name ?? "").trim().replace(/[^A-Za-z0-9._-]+/g, "-").replace(/^[.-]+|[.-]+$/g, "").slice(0, 80);
  return ["outputs/" + (safe || "my-lora"), follows];
}"""


def base_belongs_elsewhere(base: Any, family: str) -> bool:
    """A builtin or well-known hub model of another family (custom ids and local files are kept)."""
    if not isinstance(base, str) or not base:
        return True
    if base.startswith("builtin:"):
        return base not in forms.builtin_models(family)
    return any(base in forms.hub_models(other) for other in FAMILIES if other != family)


def show_folder(folder: Any, workspace: Workspace) -> Any:
    """The Dataset tab's folder as the form shows it (workspace-relative when inside)."""
    if not isinstance(folder, str):
        return gr.update()
    path = Path(folder.strip())
    return workspace.relative(path) if path.is_absolute() else folder.strip()


def uploaded_through_this_page(path: Path) -> bool:
    """Whether ``path`` is in Gradio's upload folder, where only bytes a browser sent end up."""
    from gradio.utils import get_upload_folder

    return path.resolve().is_relative_to(Path(get_upload_folder()).resolve())


def detect_into(form: dict[str, Any], workspace: Workspace) -> str:
    """With model.family "auto", put the family of model.base into ``form``; returns what was found ("" otherwise)."""
    if form.get("model.family") != AUTO:
        return ""
    from lora_gui.engine.families.registry import family_class

    base = str(form.get("model.base") or "")
    if forms.is_local_model(base, workspace):
        base = str(forms.confined_path("model.base", base, workspace))
    try:
        detection = detect_family(base)
    except ValueError as exc:
        raise ConfigError(f"model.family auto: {exc}") from None
    form["model.family"] = detection.family
    return f"model.family auto: **{family_class(detection.family).label}** ({detection.reason})."

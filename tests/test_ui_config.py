"""The Config tab: schema form <-> config, path confinement, presets, CLI command, config files, a live server."""

from __future__ import annotations

import shlex
import socket

import pytest

from lora_gui.config import ConfigError, TrainingConfig, build_config, parse_override
from lora_gui.ui import forms
from lora_gui.ui import presets as P
from lora_gui.ui.guard import message_guard
from lora_gui.ui.session import AppSession, GpuInfo
from lora_gui.ui.tabs import config as config_tab
from lora_gui.ui.workspace import Workspace


@pytest.fixture
def workspace(tmp_path) -> Workspace:
    return Workspace.create(tmp_path / "ws")


def non_default(spec: forms.FieldSpec):
    """A valid value different from the default, for every kind of field."""
    special = {"model.family": "sdxl", "model.base": "someone/my-sdxl", "lora.targets": "attn",
               "model.cache_dir": "cache/models", "dataset.dir": "datasets/cats", "dataset.cache_dir": "cache/x",
               "output.dir": "outputs/run1", "output.name": "run1", "dataset.caption_extension": ".caption",
               "model.merge_loras": ["models/style.safetensors:0.5", "models/adapter.safetensors"],
               "model.text_encoder_files": ["models/clip_l.safetensors", "models/t5xxl.safetensors"],
               "model.vae_file": "models/ae.safetensors",
               "train.offload_activations": False}  # with gradient checkpointing on, it must stay off
    if spec.key in special:
        return special[spec.key]
    if spec.kind == "dropdown":
        return next(c for c in spec.choices if c != spec.default)
    if spec.kind == "checkbox":
        return not spec.default
    if spec.kind in ("number", "slider"):
        middle = (spec.minimum + spec.maximum) / 2
        value = int(middle) if spec.integer else middle
        return value if value != spec.default else spec.maximum
    if spec.kind == "lines":
        return ["sks, a cat", "sks on a sofa"]
    return f"custom {spec.key}"


def every_field_changed(workspace: Workspace) -> dict:
    """Form values (workspace-relative paths) with every field away from its default."""
    return {spec.key: forms.to_form_value(spec, non_default(spec)) for spec in forms.field_specs()}


def test_specs_cover_every_schema_field_with_help_text():
    keys = {spec.key for spec in forms.field_specs()}
    schema = {f"{s}.{k}" for s, f in TrainingConfig.model_fields.items() for k in f.annotation.model_fields}
    assert keys == schema
    assert all(spec.info and spec.label for spec in forms.field_specs())
    specs = forms.specs_by_key()
    assert specs["train.optimizer"].kind == "dropdown" and "adamw8bit" in specs["train.optimizer"].choices
    assert specs["lora.rank"].kind == "number" and specs["lora.rank"].integer and specs["lora.rank"].maximum == 1024
    assert specs["sample.prompts"].kind == "lines" and specs["model.revision"].optional
    assert specs["model.cache_dir"].advanced and not specs["lora.rank"].advanced
    assert forms.ADVANCED <= keys


def test_round_trip_of_every_field(workspace):
    form = every_field_changed(workspace)
    config = config_tab.form_to_config(form, workspace)
    defaults = TrainingConfig().model_dump(mode="json")
    dumped = config.model_dump(mode="json")
    for spec in forms.field_specs():
        section, name = spec.key.split(".")
        if spec.key != "train.offload_activations":  # not with gradient checkpointing: checked below
            assert dumped[section][name] != defaults[section][name], spec.key
    shown = forms.relative_paths(forms.config_to_values(dumped), workspace)
    assert shown == form
    assert config_tab.form_to_config(shown, workspace) == config
    assert config.dataset.dir == str(workspace.root / "datasets" / "cats")
    offloading = {**form, "train.gradient_checkpointing": False, "train.offload_activations": True}
    assert config_tab.form_to_config(offloading, workspace).train.offload_activations


def test_optional_fields_empty_means_none_and_defaults(workspace):
    form = forms.config_to_values(TrainingConfig().model_dump(mode="json"))
    form.update({"model.revision": "  ", "lora.text_encoder_lr": None, "output.dir": "", "model.cache_dir": ""})
    config = config_tab.form_to_config(form, workspace)
    assert config.model.revision is None and config.lora.text_encoder_lr is None
    assert config.output.dir == str(workspace.outputs / "my-lora")
    assert config.model.cache_dir == str(workspace.cache)


@pytest.mark.parametrize("key, value, message", [
    ("dataset.dir", "../elsewhere", "outside the workspace"),
    ("dataset.dir", "/etc", "outside the workspace"),
    ("output.dir", "datasets/oops", "not inside"),
    ("model.base", "/etc/model.safetensors", "outside the workspace"),
    ("model.cache_dir", "../../cache", "outside the workspace"),
    ("model.vae_file", "/etc/ae.safetensors", "outside the workspace"),
    ("model.text_encoder_files", "models/te.safetensors\n../../te.safetensors", "outside the workspace"),
    ("model.vae_file", "models/ae.ckpt", "not a .safetensors file"),
    ("lora.rank", None, "enter a number"),
    ("lora.rank", 0, "lora.rank"),
    ("train.optimizer", "sgd", "train.optimizer"),
    ("lora.targets", "everything", "lora.targets"),
    ("model.base", "builtin:tiny-flux", "model.base"),
])
def test_bad_values_are_refused_naming_the_key(workspace, key, value, message):
    form = forms.config_to_values(TrainingConfig().model_dump(mode="json"))
    form[key] = value
    with pytest.raises(ConfigError) as error:
        config_tab.form_to_config(form, workspace)
    assert message in str(error.value) and key.split(".")[0] in str(error.value)


def test_local_models_are_listed_and_made_absolute(workspace):
    models = workspace.root / "models"
    (models / "my-pipe").mkdir(parents=True)
    (models / "my-pipe" / "model_index.json").write_text("{}")
    (models / "style.safetensors").write_bytes(b"x")
    choices = forms.base_choices("flux", workspace)
    assert choices[:2] == ["builtin:tiny-flux", "builtin:tiny-flux-schnell"]
    assert "black-forest-labs/FLUX.1-schnell" in choices
    assert {"models/my-pipe", "models/style.safetensors"} <= set(choices)
    form = forms.config_to_values(TrainingConfig().model_dump(mode="json"))
    form["model.base"] = "models/style.safetensors"
    assert config_tab.form_to_config(form, workspace).model.base == str(models / "style.safetensors")


@pytest.mark.parametrize("gib, tier", [(None, "CPU demo"), (5.8, "CPU demo"), (7.8, "8 GB"), (10.75, "8 GB"),
                                       (11.76, "12 GB"), (14.76, "16 GB"), (23.6, "24 GB"), (40.0, "24 GB"), (44.99, "48+ GB"),
                                       (47.99, "48+ GB"), (139.8, "48+ GB")])
def test_tier_detection_from_gpu_memory(gib, tier):
    assert P.detect_tier(gib) == tier


def test_preset_names_are_checked():
    assert P.preset_name("sdxl", "12 GB") == "sdxl-12gb"
    assert P.preset_name("flux", "CPU demo") == "flux-cpu-demo"
    for family, tier in (("sdxl", "13 GB"), ("../x", "8 GB"), (None, "8 GB")):
        with pytest.raises(ConfigError):
            P.preset_name(family, tier)
    assert P.preset_name("qwen-image", "24 GB") == "qwen-image-24gb"
    with pytest.raises(ConfigError, match=r"Qwen-Image \(20 B parameters\).*block swap.*lora-gui plan"):
        P.preset_name("qwen-image", "8 GB")  # a tier the planner says it cannot fit
    with pytest.raises(ConfigError, match="pick one of those families"):
        P.preset_name("auto", "CPU demo")


def test_apply_preset_keeps_the_users_fields(workspace):
    form = every_field_changed(workspace)
    form.update({"model.family": "sdxl", "train.optimizer": "lion", "lora.alpha": 16})
    applied = P.apply_preset(form, "sdxl-12gb")
    for key in ("dataset.dir", "output.dir", "output.name", "dataset.trigger_word", "sample.prompts"):
        assert applied[key] == form[key]
    assert applied["dataset.resolution"] == 1024 and applied["train.optimizer"] == "adamw8bit"
    assert applied["model.base"] == "stabilityai/stable-diffusion-xl-base-1.0"
    rows = P.preset_changes(form, "sdxl-12gb")
    changed = {row[0] for row in rows}
    assert "train.optimizer" in changed and "dataset.dir" not in changed
    assert "lora.alpha" not in changed  # 16 in the form equals the preset's 16.0
    assert P.preset_changes(applied, "sdxl-12gb") == []
    assert "would change" in P.changes_table(rows, "sdxl-12gb")


def test_cli_command_rebuilds_the_same_config(workspace, tmp_path):
    form = P.apply_preset(forms.config_to_values(TrainingConfig().model_dump(mode="json")), "sdxl-16gb")
    form.update({"dataset.dir": "datasets/my cats", "train.max_steps": 777, "sample.prompts": "sks, a cat\nsks"})
    config = config_tab.form_to_config(form, workspace)
    command = P.cli_command(config)
    assert command.startswith("lora-gui train \\\n  --preset sdxl-16gb")
    words = shlex.split(command.replace("\\\n", " "))
    overrides = [words[i + 1] for i, word in enumerate(words) if word == "--set"]
    assert all(parse_override(o) for o in overrides)
    assert build_config(preset=words[words.index("--preset") + 1], overrides=overrides) == config
    saved = tmp_path / "my config.toml"
    assert P.cli_command(config, saved) == f"lora-gui train '{saved}'"


def test_save_and_load_configs(workspace):
    config = build_config(preset="sd15-8gb")
    path = P.save_named_config(config, workspace, "My LoRA", overwrite=False)
    assert path == workspace.configs / "My-LoRA.toml"
    assert P.list_saved_configs(workspace) == ["My-LoRA.toml"]
    assert P.load_config(P.saved_config_path(workspace, "My-LoRA.toml")) == config
    assert P.same_config_file(path, config)
    with pytest.raises(ConfigError, match="already exists"):
        P.save_named_config(build_config(preset="sd15-12gb"), workspace, "My LoRA", overwrite=False)
    assert P.load_config(path) == config  # not overwritten
    P.save_named_config(build_config(preset="sd15-12gb"), workspace, "My LoRA.toml", overwrite=True)
    assert P.load_config(path) == build_config(preset="sd15-12gb")
    for bad in ("../escape", "sub/name", "a\\b", ".hidden", "", None, "~root"):
        with pytest.raises(ConfigError):
            P.save_named_config(config, workspace, bad, overwrite=True)
    with pytest.raises(ConfigError):
        P.saved_config_path(workspace, "../../etc/passwd")
    (workspace.root / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="not a config file"):
        P.load_config(workspace.root / "notes.txt")


def test_panel_texts_report_problems_instead_of_raising(workspace):
    form = forms.config_to_values(TrainingConfig().model_dump(mode="json"))
    form["lora.rank"] = 99999
    texts = config_tab.panel_texts(form, "12 GB", None, workspace, GpuInfo("NVIDIA GeForce RTX 3060", 11.76))
    assert "`lora.rank`" in texts["validate"] and "fix" in texts["cli"].lower()
    form["lora.rank"] = 16
    texts = config_tab.panel_texts(form, "12 GB", None, workspace, GpuInfo("NVIDIA GeForce RTX 3060", 11.76))
    assert "Config is valid" in texts["validate"] and "dataset.dir" in texts["validate"]
    assert "estimate" not in texts  # hand-made estimates are gone: the traced plan replaces them
    assert texts["cli"].startswith("lora-gui train")
    assert "sd15-12gb" in texts["preset"]


def test_guarded_handlers_turn_exceptions_into_messages():
    status = object()

    @message_guard(status, (ValueError,), "Please report it.")
    def broken(values):
        raise RuntimeError("boom")

    assert "Unexpected error" in broken({})[status]
    assert "boom" in broken({})[status]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_tab_on_a_live_server(workspace):
    import gradio as gr
    from gradio_client import Client

    session = AppSession(workspace=workspace)
    session.__dict__["gpu"] = GpuInfo("NVIDIA GeForce RTX 4090", 23.6)  # no torch.cuda probing
    with gr.Blocks() as demo:
        folder = gr.Textbox(value="datasets/cats")
        tab = config_tab.build(session, dataset_folder=folder)
    assert set(tab.components) == {spec.key for spec in forms.field_specs()}
    values = {component: component.value for component in tab.inputs()}
    assert tab.to_config(values).model.base == "stable-diffusion-v1-5/stable-diffusion-v1-5"  # 24 GB tier
    P.save_named_config(build_config(preset="sdxl-12gb"), workspace, "saved", overwrite=False)
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True)
    try:
        client = Client(demo.local_url, verbose=False)
        result = client.predict("saved.toml", api_name="/config_load_saved")
        texts = [item for item in result if isinstance(item, str)]
        assert any("Loaded configs/saved.toml" in text for text in texts)
        assert "stabilityai/stable-diffusion-xl-base-1.0" in str(result)
        refused = client.predict("../../etc/passwd", api_name="/config_load_saved")
        assert any("No saved config" in str(item) for item in refused)
    finally:
        demo.close()


@pytest.mark.slow
def test_auto_family_is_detected_from_the_base(workspace):
    import shutil

    from lora_gui.engine.families.builtin import ensure_builtin

    shutil.copytree(ensure_builtin("builtin:tiny-sdxl"), workspace.root / "models" / "my-sdxl")
    form = {"model.family": "auto", "model.base": "models/my-sdxl"}
    note = config_tab.detect_into(form, workspace)
    assert form == {"model.family": "sdxl", "model.base": "models/my-sdxl"}  # the base the user picked stays
    assert note.startswith("model.family auto: **Stable Diffusion XL** (model_index.json names")
    assert config_tab.detect_into({"model.family": "flux", "model.base": "x"}, workspace) == ""
    with pytest.raises(ConfigError, match="model.base"):
        config_tab.detect_into({"model.family": "auto", "model.base": "../outside"}, workspace)
    with pytest.raises(ConfigError, match="model.family auto: .*not a built-in model, an existing file"):
        config_tab.detect_into({"model.family": "auto", "model.base": "no such thing"}, workspace)


def test_the_form_draft_survives_as_written_and_hostile_files_are_ignored(workspace):
    from lora_gui.ui.draft import draft_path, load_draft, save_draft

    keys = {spec.key for spec in forms.field_specs()}
    assert load_draft(workspace, keys) is None  # nothing edited yet: the defaults
    form = {"train.max_steps": 400, "output.name": "portrait-style", "train.learning_rate": -0.001,
            "sample.prompts": "a\nb", "model.family": "sdxl"}
    save_draft(workspace, {**form, "not.a.field": 1, "dataset.dir": {"nested": "dict"}}, "24 GB")
    assert load_draft(workspace, keys) == (form, "24 GB")  # invalid values too: it is a draft
    path = draft_path(workspace)
    assert path.parent == workspace.state and workspace.list_runs() == [] and workspace.list_datasets() == []
    for hostile in ("{not json", "[1, 2]", '{"form": "x"}', '{"form": {"train.max_steps": [1, {"a": 2}]}}'):
        path.write_text(hostile)
        assert load_draft(workspace, keys) is None, hostile
    path.write_bytes(b"{" + b" " * 2_000_000 + b"}")
    assert load_draft(workspace, keys) is None

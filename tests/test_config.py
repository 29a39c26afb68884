import json

import pytest

from lora_gui.config import (
    PUBLIC_KEYS,
    ConfigError,
    TrainingConfig,
    build_config,
    dump_config,
    field_info,
    list_presets,
    load_preset,
    preset_description,
    read_config_file,
    save_config,
    unavailable_presets,
)
from lora_gui.engine.families.registry import family_names


def test_public_keys_exist_with_descriptions():
    for key in PUBLIC_KEYS:
        info = field_info(key)
        assert info is not None, key
        assert info.description and len(info.description) > 10, key


def test_every_field_has_a_one_line_description():
    for section_name, section in TrainingConfig.model_fields.items():
        for name, info in section.annotation.model_fields.items():
            assert info.description, f"{section_name}.{name}"
            assert "\n" not in info.description


def test_layering_order_defaults_preset_file_overrides(tmp_path):
    user = tmp_path / "user.toml"
    user.write_text('[lora]\nrank = 12\n[train]\nmax_steps = 77\n')
    config = build_config(file=user, preset="sd15-cpu-demo", overrides=["train.max_steps=5"])
    assert config.model.base == "builtin:tiny-sd15"  # from the preset
    assert config.lora.rank == 12  # the file beats the preset
    assert config.train.max_steps == 5  # --set beats the file
    assert config.train.seed == TrainingConfig().train.seed  # defaults fill the rest


@pytest.mark.parametrize("suffix", [".toml", ".yaml", ".json"])
def test_round_trip_all_formats(tmp_path, suffix):
    config = build_config(overrides=["lora.rank=24", 'sample.prompts=["a", "b c"]', "train.learning_rate=3e-4"])
    path = save_config(config, tmp_path / f"c{suffix}")
    assert build_config(file=path) == config


def test_sparse_dump_only_holds_changes():
    config = build_config(overrides=["lora.rank=24"])
    assert dump_config(config, "json", sparse=True).replace(" ", "").replace("\n", "") == '{"lora":{"rank":24}}'


def test_unknown_key_names_path_and_suggests(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[lora]\nrnak = 4\n")
    with pytest.raises(ConfigError) as err:
        build_config(file=path)
    assert "lora.rnak" in str(err.value) and "lora.rank" in str(err.value)


def test_unknown_section_is_rejected():
    with pytest.raises(ConfigError, match="trian"):
        build_config(data={"trian": {"max_steps": 3}})


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("lora.rank=0", "lora.rank"),
        ("lora.rank=5000", "1 to 1024"),
        ("train.learning_rate=-1", "train.learning_rate"),
        ("dataset.resolution=10", "64 to 4096"),
        ("train.optimizer=sgd", "adamw, adamw8bit"),
        ("model.family=sd3", "sd15, sdxl, flux"),
        ("output.name=../evil", "output.name"),
    ],
)
def test_out_of_range_values_name_key_and_range(override, fragment):
    with pytest.raises(ConfigError) as err:
        build_config(overrides=[override])
    assert fragment in str(err.value)


def test_override_syntax_errors_are_explained():
    with pytest.raises(ConfigError, match="section.key=value"):
        build_config(overrides=["rank"])
    with pytest.raises(ConfigError, match="needs a section"):
        build_config(overrides=["rank=3"])


def test_invalid_file_syntax_is_explained(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[lora\nrank = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_config_file(path)
    with pytest.raises(ConfigError, match="does not exist"):
        read_config_file(tmp_path / "missing.toml")


def test_every_preset_is_valid_and_sparse():
    names = list_presets()
    unavailable = unavailable_presets()
    for family in family_names():  # every family has every tier: a preset, or the reason it cannot fit
        for tier in ("cpu-demo", "8gb", "12gb", "16gb", "24gb", "48gb"):
            assert (f"{family}-{tier}" in names) != (f"{family}-{tier}" in unavailable), f"{family}-{tier}"
    for name, reason in unavailable.items():
        with pytest.raises(ConfigError, match="does not fit its card"):
            build_config(preset=name)
        assert "block swap" in reason.lower()
    for name in names:
        data = load_preset(name)
        config = build_config(preset=name)
        family = preset_description(name)["family"]
        assert name.startswith(f"{family}-") and config.model.family == family
        assert len(json.dumps(data)) < len(json.dumps(config.model_dump(mode="json")))


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError, match="sd15-cpu-demo"):
        build_config(preset="nope")


def test_hostile_config_files_get_messages(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefghij", "bcdefghijk", strict=True)))
    with pytest.raises(ConfigError, match="aliases"):  # expanded, it would be 9**10 items
        read_config_file(bomb)
    garbage = tmp_path / "garbage.toml"
    garbage.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match="not a text file"):
        read_config_file(garbage)


@pytest.mark.parametrize("override", ["lora.rank=true", "train.learning_rate=false", "sample.width=true"])
def test_booleans_are_not_numbers(override):
    with pytest.raises(ConfigError, match="expected a number"):
        build_config(overrides=[override])


def test_error_messages_do_not_echo_huge_values():
    with pytest.raises(ConfigError) as err:
        build_config(overrides=["model.family=" + "x" * 100_000])
    assert len(str(err.value)) < 1000 and "100002 characters" in str(err.value)

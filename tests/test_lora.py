"""LoRA inject / save / load on the built-in tiny SD1.5, SDXL and Flux pipelines (CPU, offline)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

torch = pytest.importorskip("torch")

from lora_gui.config import LoraSection  # noqa: E402
from lora_gui.engine import lora as L  # noqa: E402
from lora_gui.engine import lora_files as LF  # noqa: E402
from lora_gui.engine import lora_verify as LV  # noqa: E402
from lora_gui.engine.families.builtin import ensure_builtin  # noqa: E402

pytestmark = pytest.mark.slow

CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
SD_ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
SD_ALL_LINEAR = SD_ATTN + ["ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "time_emb_proj"]
FLUX_ATTN = SD_ATTN + ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
METADATA = {"family": "test", "base": "builtin:tiny", "rank": "4", "alpha": "2", "trigger_word": "zxq"}


@dataclass
class Case:
    name: str
    base: str
    pipeline: str
    targets: dict[str, list[str]]
    call: dict


CASES = {
    # SD1.5 proj_in/proj_out are 1x1 Conv2d layers: covers conv LoRA.
    "sd15": Case("sd15", "builtin:tiny-sd15", "StableDiffusionPipeline",
                 {"unet": SD_ALL_LINEAR, "text_encoder": CLIP_TARGETS}, {}),
    "sdxl": Case("sdxl", "builtin:tiny-sdxl", "StableDiffusionXLPipeline",
                 {"unet": SD_ALL_LINEAR, "text_encoder": CLIP_TARGETS,
                  "text_encoder_2": CLIP_TARGETS}, {}),
    "flux": Case("flux", "builtin:tiny-flux", "FluxPipeline",
                 {"transformer": FLUX_ATTN + ["ff.net.0.proj", "ff.net.2", "proj_mlp", "proj_out"],
                  "text_encoder": CLIP_TARGETS},
                 {"max_sequence_length": 16, "guidance_scale": 3.5}),
}


def load(case: Case, **kwargs):
    import diffusers

    cls = getattr(diffusers, case.pipeline)
    pipe = cls.from_pretrained(ensure_builtin(case.base), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return cls, pipe


def modules_of(pipe, targets: dict) -> dict:
    return {key: getattr(pipe, key) for key in targets}


def perturb(modules: dict, seed: int = 0) -> None:
    """Give every LoRA factor random values so the adapter changes the model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for params in L.lora_parameters(modules).values():
            for param in params:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def layer_outputs(module, adapter_name: str) -> dict[str, torch.Tensor]:
    """Each adapted layer's output for a fixed input, with only ``adapter_name`` active."""
    from peft.tuners.lora import LoraLayer

    outputs = {}
    generator = torch.Generator().manual_seed(1)
    was_training = module.training
    module.eval()
    with torch.no_grad():
        for name, layer in module.named_modules():
            if isinstance(layer, LoraLayer) and adapter_name in layer.lora_A:
                layer.set_adapter(adapter_name)
                base = layer.get_base_layer()
                shape = (3, base.in_features) if hasattr(base, "in_features") else (1, base.in_channels, 4, 4)
                outputs[name] = layer(torch.randn(shape, generator=generator)).float()
    module.train(was_training)
    return outputs


def assert_same_outputs(expected: dict, actual: dict, atol: float = 1e-5) -> None:
    assert set(actual) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, atol=atol, rtol=1e-4, msg=name)


def image(pipe, case: Case):
    generator = torch.Generator().manual_seed(7)
    return pipe("a red cube", num_inference_steps=2, height=64, width=64, generator=generator,
                output_type="np", **case.call).images[0]


def trained(case: Case, tmp_path, lora: LoraSection, targets: dict | None = None):
    """Inject, perturb and save; returns (pipeline class, modules, kohya path, diffusers path)."""
    targets = targets or case.targets
    cls, pipe = load(case)
    modules = modules_of(pipe, targets)
    L.inject_lora(modules, targets, lora)
    perturb(modules)
    kohya, diffusers_file = LF.save_lora_files(cls, modules, lora, tmp_path / "kohya.safetensors",
                                               tmp_path / "diffusers", METADATA)
    return cls, modules, kohya, diffusers_file


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux"])
def test_both_files_reload_exactly_with_real_alpha(family, tmp_path):
    case = CASES[family]
    lora = LoraSection(rank=4, alpha=2.0)
    _, modules, kohya, diffusers_file = trained(case, tmp_path, lora)
    expected = {key: layer_outputs(module, "default") for key, module in modules.items()}

    for path in (kohya, diffusers_file):
        _, pipe = load(case)
        report = LV.verify_lora_file(pipe, path, adapter_name="loaded", keep=True)
        assert report.ok, report
        for key in modules:
            assert_same_outputs(expected[key], layer_outputs(getattr(pipe, key), "loaded"))
        pipe.set_adapters(["loaded"], [1.0])
        with_lora = image(pipe, case)
        pipe.set_adapters(["loaded"], [0.0])
        without_lora = image(pipe, case)
        assert abs(with_lora - without_lora).max() > 1e-4, f"{path.name}: the LoRA did not change the image"


def test_kohya_key_names(tmp_path):
    from safetensors.torch import load_file

    lora = LoraSection(rank=4, alpha=2.0)
    _, _, kohya, _ = trained(CASES["sd15"], tmp_path / "sd15", lora)
    names = load_file(kohya)
    unet = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert names[f"{unet}.lora_down.weight"].shape == (4, 32)
    assert names[f"{unet}.lora_up.weight"].shape == (32, 4)
    assert names[f"{unet}.alpha"].item() == 2.0
    assert "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight" in names
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in names

    flux_targets = {"transformer": ["ff.net.0.proj", "proj_mlp", "norm.linear", "x_embedder", "to_out.0"]}
    _, modules, kohya, _ = trained(CASES["flux"], tmp_path / "flux", lora, flux_targets)
    names = load_file(kohya)
    for layer in LV.lora_deltas(modules["transformer"], "default"):  # ComfyUI, Forge, diffusers: transformer.<path>
        assert f"transformer.{layer}.lora_A.weight" in names
        assert f"transformer.{layer}.lora_B.weight" in names
    assert names["transformer.single_transformer_blocks.0.proj_mlp.alpha"].item() == 2.0


def test_sdxl_text_encoder_prefixes(tmp_path):
    from safetensors.torch import load_file

    _, _, kohya, diffusers_file = trained(CASES["sdxl"], tmp_path, LoraSection(rank=4, alpha=2.0))
    names = set(load_file(kohya))
    assert any(n.startswith("lora_te1_text_model_encoder_layers_1_self_attn_") for n in names)
    assert any(n.startswith("lora_te2_text_model_encoder_layers_1_self_attn_") for n in names)
    assert any(n.startswith("text_encoder_2.text_model.encoder.") for n in load_file(diffusers_file))


def test_metadata_in_both_files(tmp_path):
    _, _, kohya, diffusers_file = trained(CASES["sd15"], tmp_path, LoraSection(rank=4, alpha=2.0))
    for path in (kohya, diffusers_file):
        metadata = LF.read_lora_metadata(path)
        assert {k: metadata[k] for k in METADATA} == METADATA
    assert LF.read_lora_metadata(kohya)["ss_network_alpha"] == "2"
    adapter = json.loads(LF.read_lora_metadata(diffusers_file)["lora_adapter_metadata"])
    assert adapter["unet.r"] == 4 and adapter["unet.lora_alpha"] == 2.0
    assert adapter["text_encoder.lora_alpha"] == 2.0
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.glob(".lora-save-*"))


def test_resume_round_trip_is_exact():
    case = CASES["sd15"]
    lora = LoraSection(rank=4, alpha=2.0, dropout=0.1)
    _, first = load(case)
    first_modules = modules_of(first, case.targets)
    L.inject_lora(first_modules, case.targets, lora)
    perturb(first_modules)
    saved = L.lora_state_dicts(first_modules)

    _, second = load(case)
    second_modules = modules_of(second, case.targets)
    L.inject_lora(second_modules, case.targets, lora)
    L.load_lora_state(second_modules, saved)
    restored = L.lora_state_dicts(second_modules)
    for key, state in saved.items():
        assert state.keys() == restored[key].keys()
        assert all(torch.equal(state[name], restored[key][name]) for name in state)

    _, other = load(case)
    other_modules = modules_of(other, case.targets)
    L.inject_lora(other_modules, case.targets, LoraSection(rank=8, alpha=2.0))
    with pytest.raises(L.LoraError, match="different shape"):
        L.load_lora_state(other_modules, saved)
    with pytest.raises(L.LoraError, match="train_text_encoder"):
        L.load_lora_state({"unet": other_modules["unet"]}, saved)


def test_only_lora_trains_and_stays_fp32_on_half_base():
    case = CASES["sd15"]
    _, pipe = load(case)
    pipe.unet.to(torch.float16)
    pipe.text_encoder.to(torch.float16)
    modules = modules_of(pipe, case.targets)
    L.inject_lora(modules, case.targets, LoraSection(rank=4, alpha=4.0))
    params = L.lora_parameters(modules)
    assert params["unet"] and params["text_encoder"]
    for key, module in modules.items():
        trainable = {id(p) for p in params[key]}
        for name, param in module.named_parameters():
            assert (id(param) in trainable) == (".lora_" in name), name
            assert param.dtype == (torch.float32 if id(param) in trainable else torch.float16), name


def test_dora_with_dropout(tmp_path):
    from safetensors.torch import load_file

    case = CASES["sd15"]
    lora = LoraSection(rank=4, alpha=2.0, use_dora=True, dropout=0.1)
    _, modules, kohya, diffusers_file = trained(case, tmp_path, lora)
    unet = modules["unet"]
    latents = torch.randn(1, 4, 8, 8)
    text = torch.randn(1, 77, 32)
    unet(latents, 10, encoder_hidden_states=text).sample.mean().backward()  # trains with dropout on

    expected = {key: layer_outputs(module, "default") for key, module in modules.items()}
    _, pipe = load(case)
    assert LV.verify_lora_file(pipe, diffusers_file, adapter_name="loaded", keep=True).ok
    for key in modules:
        assert_same_outputs(expected[key], layer_outputs(getattr(pipe, key), "loaded"))

    # kohya file: output-axis DoRA, W' = dora_scale * (W + s*up@down) / ||W + s*up@down||_row
    tensors = load_file(kohya)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    stem = "lora_unet_" + name.replace(".", "_")
    layer = unet.get_submodule(name)
    base = layer.get_base_layer().weight.detach()
    adapted = base + 0.5 * tensors[f"{stem}.lora_up.weight"] @ tensors[f"{stem}.lora_down.weight"]
    scale = tensors[f"{stem}.dora_scale"]
    assert scale.shape == (base.shape[0], 1)
    effective = adapted * scale / adapted.norm(dim=1, keepdim=True)
    probe = torch.randn(3, base.shape[1])
    unet.eval()
    with torch.no_grad():
        torch.testing.assert_close(probe @ effective.T, layer(probe), atol=1e-5, rtol=1e-4)
    assert tensors["lora_unet_down_blocks_0_attentions_0_proj_in.dora_scale"].shape == (32, 1, 1, 1)


@pytest.mark.parametrize(("init", "use_dora"), [("pissa", False), ("olora", False), ("pissa", True)])
def test_base_mutating_inits_save_a_lora_for_the_original_base(init, use_dora, tmp_path):
    case = CASES["sd15"]
    targets = {"unet": SD_ATTN, "text_encoder": CLIP_TARGETS}
    lora = LoraSection(rank=4, alpha=2.0, init=init, use_dora=use_dora)
    _, modules, kohya, diffusers_file = trained(case, tmp_path, lora, targets)
    expected = {key: layer_outputs(module, "default") for key, module in modules.items()}
    assert LF.read_lora_metadata(kohya)["ss_network_dim"] == "8"
    # diffusers ignores dora_scale in kohya files, so DoRA is checked through the diffusers file only.
    for path in (diffusers_file,) if use_dora else (kohya, diffusers_file):
        _, pipe = load(case)  # untouched base weights
        assert LV.verify_lora_file(pipe, path, adapter_name="loaded", keep=True).ok
        for key in modules:
            assert_same_outputs(expected[key], layer_outputs(getattr(pipe, key), "loaded"), atol=1e-4)

    # Resuming re-injects: the residual base must come out the same again.
    _, again = load(case)
    again_modules = modules_of(again, targets)
    L.inject_lora(again_modules, targets, lora)
    for key, module in modules.items():
        residual = {n: p for n, p in module.named_parameters() if "base_layer" in n}
        assert residual
        for name, param in again_modules[key].named_parameters():
            if name in residual:
                assert torch.equal(param, residual[name]), name


def test_clear_errors():
    case = CASES["sd15"]
    _, pipe = load(case)
    with pytest.raises(L.LoraError, match="PiSSA and OLoRA work only"):
        L.inject_lora({"unet": pipe.unet}, {"unet": ["proj_in"]}, LoraSection(rank=4, init="pissa"))
    _, pipe = load(case)
    with pytest.raises(L.LoraError, match="choose another target preset"):
        L.inject_lora({"unet": pipe.unet}, {"unet": ["no_such_layer"]}, LoraSection(rank=4))


def test_refuses_bad_metadata_and_nan(tmp_path):
    case = CASES["sd15"]
    lora = LoraSection(rank=4, alpha=2.0)
    cls, pipe = load(case)
    modules = {"unet": pipe.unet}
    L.inject_lora(modules, case.targets, lora)
    save = lambda metadata: LF.save_lora_files(  # noqa: E731
        cls, modules, lora, tmp_path / "k.safetensors", tmp_path / "d.safetensors", metadata)
    with pytest.raises(TypeError, match="str"):
        save({"steps": 10})
    with pytest.raises(L.LoraError, match="reserved"):
        save({"format": "pt"})
    with pytest.raises(L.LoraError, match="config now says"):
        LF.save_lora_files(cls, modules, LoraSection(rank=8), tmp_path / "k.safetensors", tmp_path / "d", {})
    with torch.no_grad():
        L.lora_parameters(modules)["unet"][0].fill_(float("nan"))
    with pytest.raises(L.LoraError, match="NaN"):
        save({})
    assert not list(tmp_path.iterdir())


def test_save_dtype_and_loader_message_classification(tmp_path):
    from safetensors.torch import load_file

    case = CASES["sd15"]
    lora = LoraSection(rank=4, alpha=2.0)
    cls, pipe = load(case)
    modules = {"unet": pipe.unet}
    L.inject_lora(modules, case.targets, lora)
    perturb(modules)
    kohya, diffusers_file = LF.save_lora_files(cls, modules, lora, tmp_path / "k.safetensors",
                                               tmp_path / "d.safetensors", {}, dtype=torch.float16)
    assert {t.dtype for n, t in load_file(kohya).items() if not n.endswith(".alpha")} == {torch.float16}
    assert {t.dtype for t in load_file(diffusers_file).values()} == {torch.float16}

    assert not LV._is_key_problem("No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'. "
                                  "Open an issue if you think it's unexpected")
    assert LV._is_key_problem("CLIPTextModel LOAD REPORT\nq_proj.lora_magnitude_vector.x | UNEXPECTED")
    assert LV._is_key_problem("filter out the keys associated to 'dora_scale` from the state dict")


def test_adapters_do_not_depend_on_the_libraries_peft_integrations(monkeypatch, tmp_path):
    """transformers 5.24 refuses its own add_adapter unless peft >= 0.22, which no index has.

    Raising transformers' and diffusers' minimum peft versions out of reach simulates any such
    mismatch: injecting, resuming, saving and loading a text-encoder LoRA must not go through them.
    """
    import diffusers.loaders.peft as diffusers_peft
    import transformers.integrations.peft as transformers_peft

    monkeypatch.setattr(transformers_peft, "MIN_PEFT_VERSION", "999.0")
    monkeypatch.setattr(diffusers_peft, "MIN_PEFT_VERSION", "999.0")
    case = CASES["sd15"]
    lora = LoraSection(rank=4, alpha=2.0)
    _, modules, kohya, diffusers_file = trained(case, tmp_path, lora)
    assert {"unet", "text_encoder"} <= set(modules)
    assert modules["text_encoder"].peft_config["default"].r == 4
    saved = L.lora_state_dicts(modules)
    assert saved["text_encoder"], "no text-encoder LoRA weights"
    L.load_lora_state(modules, saved)
    expected = layer_outputs(modules["text_encoder"], "default")
    for path in (kohya, diffusers_file):
        _, pipe = load(case)
        report = LV.verify_lora_file(pipe, path, adapter_name="loaded", keep=True)
        assert report.ok, report
        assert_same_outputs(expected, layer_outputs(pipe.text_encoder, "loaded"))
        pipe.set_adapters(["loaded"], [0.5])  # what the Test tab does per scale
        pipe.delete_adapters(["loaded"])
        assert not LV.lora_deltas(pipe.text_encoder, "loaded")

"""End-to-end training on the built-in tiny models (CPU): outputs, resume, stop, failures."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from helpers import make_dataset, tiny_config
from safetensors import safe_open

from lora_gui.config import ConfigError
from lora_gui.engine.errors import TrainingError
from lora_gui.engine.train import train
from lora_gui.events import CheckpointSaved, Controls, Failed, Finished, Progress, SamplesReady, Status

PIPELINES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "flux": "FluxPipeline",
             "zimage": "ZImagePipeline", "flux2-klein": "Flux2KleinPipeline", "flux2-dev": "Flux2Pipeline",
             "qwen-image": "QwenImagePipeline"}
# The tiny models' caption length (the tiny Flux.2 dev's system prompt alone takes about 160 tokens).
CAPTION_TOKENS = {"flux": 32, "zimage": 32, "flux2-klein": 32, "flux2-dev": 256, "qwen-image": 64}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "images")


def render(pipe, family: str, seed: int = 7) -> np.ndarray:
    kwargs = {"max_sequence_length": CAPTION_TOKENS[family]} if family in CAPTION_TOKENS else {}
    generator = torch.Generator("cpu").manual_seed(seed)
    image = pipe(prompt="sks, a red square", num_inference_steps=2, height=64, width=64, generator=generator,
                 output_type="np", **kwargs).images[0]
    return image


def load_pipeline(family: str, base_folder):
    """The base as diffusers loads it; Flux.2 dev's processor (it needs torchvision) replaced by its tokenizer."""
    import diffusers

    from lora_gui.engine.families.loading import text_only_tokenizer

    if family == "flux2-dev":
        pipe = diffusers.Flux2Pipeline.from_pretrained(base_folder, tokenizer=None)
        pipe.tokenizer = text_only_tokenizer(base_folder / "tokenizer")
    else:
        pipe = getattr(diffusers, PIPELINES[family]).from_pretrained(base_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.slow
@pytest.mark.parametrize(
    "family, base, extra",
    [
        ("sd15", "builtin:tiny-sd15", ["lora.train_text_encoder=true", "train.min_snr_gamma=5"]),
        ("sdxl", "builtin:tiny-sdxl", ["lora.train_text_encoder=true", "train.prediction_type=v_prediction",
                                        "train.gradient_checkpointing=true", "train.optimizer=adamw8bit"]),
        ("flux", "builtin:tiny-flux", ["lora.targets=all+ffs", "train.timestep_sampling=resolution_shift"]),
        ("flux", "builtin:tiny-flux-schnell", ["train.timestep_sampling=logit_normal"]),
        ("zimage", "builtin:tiny-zimage", ["lora.targets=all"]),
        ("flux2-klein", "builtin:tiny-flux2-klein", ["lora.targets=all"]),
        ("flux2-dev", "builtin:tiny-flux2-dev", ["lora.targets=all", "train.timestep_sampling=resolution_shift"]),
        ("qwen-image", "builtin:tiny-qwen-image", ["lora.targets=all", "train.timestep_sampling=resolution_shift"]),
    ],
)
def test_family_trains_and_both_files_reload(family, base, extra, dataset, tmp_path):
    from lora_gui.engine.families.builtin import ensure_builtin

    events = []
    config = tiny_config(family, dataset, tmp_path / "out", f"model.base={base}", "sample.every=5",
                         "output.save_every=5", "lora.alpha=4", *extra)
    result = train(config, events.append)

    assert result.status == "finished" and result.step == 10
    losses = [e.loss for e in events if isinstance(e, Progress)]
    assert len(losses) == 10 and all(np.isfinite(losses))
    assert any(isinstance(e, SamplesReady) and e.step == 5 for e in events)
    assert any(isinstance(e, CheckpointSaved) for e in events)
    finished = [e for e in events if isinstance(e, Finished)][0]

    rows = (tmp_path / "out" / "metrics.csv").read_text().splitlines()
    assert rows[0] == "step,epoch,loss,lr,sec_per_step,samples" and len(rows) == 11
    assert (tmp_path / "out" / "samples" / "step-000005" / "00.png").is_file()

    for path in (finished.lora_path, finished.diffusers_path):
        with safe_open(path, "pt") as handle:
            metadata = handle.metadata()
        assert metadata["lora_gui.family"] == family and metadata["lora_gui.steps"] == "10"
        assert metadata["lora_gui.rank"] == "8" and metadata["lora_gui.alpha"] == "4.0"

    pipe = load_pipeline(family, ensure_builtin(base))
    without = render(pipe, family)
    for index, path in enumerate((finished.lora_path, finished.diffusers_path)):
        pipe.load_lora_weights(path, adapter_name=f"a{index}")
        pipe.set_adapters([f"a{index}"], adapter_weights=[1.0])
        with_lora = render(pipe, family)
        pipe.set_adapters([f"a{index}"], adapter_weights=[0.0])
        at_zero = render(pipe, family)
        assert np.abs(with_lora - without).max() > 1e-4, path
        assert np.allclose(at_zero, without, atol=1e-5), path
        pipe.delete_adapters([f"a{index}"])


def lora_tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(path, "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


@pytest.mark.slow
def test_stop_then_resume_matches_straight_run(dataset, tmp_path):
    overrides = ["train.max_steps=6", "train.lr_scheduler=cosine", "train.gradient_accumulation=2",
                 "dataset.caption_dropout=0.3", "dataset.shuffle_tags=true", "lora.dropout=0.1"]
    straight = train(tiny_config("sd15", dataset, tmp_path / "straight", *overrides))

    controls = Controls()

    def stop_at_three(event):
        if isinstance(event, Progress) and event.step == 3:
            controls.stop()

    stopped = train(tiny_config("sd15", dataset, tmp_path / "split", *overrides), stop_at_three, controls)
    assert stopped.status == "stopped" and stopped.step == 3  # stop takes effect at the next step boundary
    assert stopped.checkpoint and stopped.checkpoint.endswith("step-000003")

    metrics = tmp_path / "split" / "metrics.csv"  # as a run from before the samples column wrote it
    metrics.write_text("\n".join(",".join(row.split(",")[:5]) for row in metrics.read_text().splitlines()) + "\n")
    resumed = train(tiny_config("sd15", dataset, tmp_path / "split", *overrides), resume_from=stopped.checkpoint)
    assert resumed.step == 6
    with metrics.open() as handle:  # the effective batch: 2 per step x 2 accumulated
        assert [row["samples"] for row in csv.DictReader(handle)] == ["", "", "", "4", "4", "4"]

    expected, actual = lora_tensors(straight.lora_path), lora_tensors(resumed.lora_path)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6)
    rows = (tmp_path / "split" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4", "5", "6"]


@pytest.mark.slow
def test_resume_with_another_rank_is_refused(dataset, tmp_path):
    controls = Controls()
    first = train(tiny_config("sd15", dataset, tmp_path / "out", "train.max_steps=2"), controls=controls)
    with pytest.raises(TrainingError, match="lora.rank"):
        train(tiny_config("sd15", dataset, tmp_path / "out", "lora.rank=4"), resume_from=first.checkpoint)
    with pytest.raises(TrainingError, match="model.family"):
        train(tiny_config("sdxl", dataset, tmp_path / "out"), resume_from=first.checkpoint)


@pytest.mark.slow
def test_stop_before_first_step_writes_no_checkpoint(dataset, tmp_path):
    controls = Controls()
    controls.stop()
    result = train(tiny_config("sd15", dataset, tmp_path / "out"), controls=controls)
    assert result.status == "stopped" and result.step == 0 and result.checkpoint is None


@pytest.mark.slow
def test_no_validation_prompts_means_no_validation_images(dataset, tmp_path):
    """An empty prompt list renders nothing (not unconditioned images), says so, and still trains."""
    events = []
    result = train(tiny_config("sd15", dataset, tmp_path / "out", "train.max_steps=2", "sample.every=1",
                               "sample.prompts=[]"), events.append)
    assert result.status == "finished"
    assert not (tmp_path / "out" / "samples").exists()
    assert any("sample.prompts is empty" in str(getattr(event, "text", "")) for event in events)


def test_dataset_without_usable_images_stops_before_loading_a_model(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")
    (folder / "b.jpg").write_text("not an image")
    events = []
    with pytest.raises(TrainingError):
        train(tiny_config("sd15", folder, tmp_path / "out"), events.append)
    failed = [e for e in events if isinstance(e, Failed)]
    assert failed and "image" in failed[0].message.lower()
    assert not any(isinstance(e, Status) and e.text.startswith("Loading") for e in events)


def test_missing_dataset_dir_is_explained(tmp_path):
    with pytest.raises(TrainingError) as err:
        train(tiny_config("sd15", tmp_path / "nope", tmp_path / "out"))
    assert "nope" in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_quantized_base_trains_and_lora_loads_unquantized(dataset, tmp_path, mode):
    from diffusers import UNet2DConditionModel

    from lora_gui.engine.families.builtin import ensure_builtin
    from lora_gui.engine.quantize import quantize_denoiser

    unet = UNet2DConditionModel.from_pretrained(ensure_builtin("builtin:tiny-sd15") / "unet")
    assert quantize_denoiser(unet, mode, torch.device("cpu")) > 0
    stored = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
    assert stored._data.dtype == {"int8": torch.int8, "fp8": torch.float8_e4m3fn}[mode]  # upcast per layer in use

    result = train(tiny_config("sd15", dataset, tmp_path / "out", f"model.quantize={mode}", "train.max_steps=3"))
    pipe = load_pipeline("sd15", ensure_builtin("builtin:tiny-sd15"))
    pipe.load_lora_weights(result.lora_path)
    assert render(pipe, "sd15").shape == (64, 64, 3)


@pytest.mark.slow
def test_offloaded_activations_train_the_same_lora(dataset, tmp_path, monkeypatch):
    """The saved tensors take the trip to system memory and back (every one, the size floor lowered for the
    tiny model) and the LoRA comes out bit for bit the same."""
    from safetensors.torch import load_file

    from lora_gui.engine import activation_offload

    offloaded = []
    monkeypatch.setattr(activation_offload, "SMALLEST_OFFLOADED_BYTES", 0)
    worth = activation_offload.worth_offloading
    monkeypatch.setattr(activation_offload, "worth_offloading", lambda t: worth(t) and not offloaded.append(t.shape))
    plain = train(tiny_config("sd15", dataset, tmp_path / "plain", "train.max_steps=3"))
    assert not offloaded
    moved = train(tiny_config("sd15", dataset, tmp_path / "moved", "train.max_steps=3",
                              "train.offload_activations=true"))
    assert len(offloaded) > 20
    first, second = load_file(plain.lora_path), load_file(moved.lora_path)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    with pytest.raises(ConfigError, match="offload_activations and gradient_checkpointing"):
        tiny_config("sd15", dataset, tmp_path / "both", "train.offload_activations=true",
                    "train.gradient_checkpointing=true")


@pytest.mark.slow
def test_compiled_blocks_train_the_same_lora(dataset, tmp_path, monkeypatch):
    """torch.compile of the repeated blocks, with the aot_eager backend: the same graph capture and autograd
    tracing as inductor, without generating C++ (a compiler is not part of the test install)."""
    from safetensors.torch import load_file

    from lora_gui.engine import train_setup

    monkeypatch.setattr(train_setup, "COMPILE_OPTIONS", {"backend": "aot_eager"})
    torch._dynamo.utils.counters.clear()
    events = []
    plain = train(tiny_config("zimage", dataset, tmp_path / "plain", "train.max_steps=3"))
    compiled = train(tiny_config("zimage", dataset, tmp_path / "compiled", "train.max_steps=3",
                                 "train.compile_blocks=true"), events.append)
    assert any(isinstance(e, Status) and "Compiling the repeated blocks" in e.text for e in events)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the blocks went through torch.compile
    first, second = load_file(plain.lora_path), load_file(compiled.lora_path)
    assert first.keys() == second.keys()
    assert all(torch.allclose(first[k], second[k], rtol=1e-5, atol=1e-7) for k in first)


@pytest.mark.slow
def test_corrupt_cache_gives_nan_loss_that_names_files_and_saves_nothing(dataset, tmp_path):
    from safetensors.torch import load_file, save_file

    output = tmp_path / "out"
    first = train(tiny_config("sd15", dataset, output, "train.max_steps=1"))
    for entry in (output / "cache" / "latents").rglob("*.safetensors"):
        tensors = load_file(entry)
        save_file({k: torch.full_like(v, float("nan")) for k, v in tensors.items()}, entry)
    events = []
    with pytest.raises(TrainingError) as err:
        train(tiny_config("sd15", dataset, output, "output.name=second"), events.append, resume_from=first.checkpoint)
    assert "NaN" in str(err.value) and "img" in str(err.value)  # names the batch's files
    assert "learning_rate" in err.value.hint
    assert not (output / "second.safetensors").exists()
    assert [p.name for p in (output / "checkpoints").iterdir()] == ["step-000001"]


@pytest.mark.slow
def test_tensorboard_logs_are_written_when_asked(dataset, tmp_path):
    train(tiny_config("flux", dataset, tmp_path / "out", "train.max_steps=2", "output.tensorboard=true"))
    assert list((tmp_path / "out" / "tensorboard").glob("events.out.tfevents.*"))


def test_out_of_memory_is_explained_with_what_to_lower():
    from lora_gui.engine.errors import explain

    explanation = explain(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert "out of memory" in explanation.message
    assert "preset" in explanation.hint and "gradient_checkpointing" in explanation.hint


@pytest.mark.slow
def test_training_uses_exactly_the_files_the_doctor_passes(tmp_path):
    from lora_gui.data.doctor import check_dataset

    folder = make_dataset(tmp_path / "mixed")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    (folder / "empty.jpg").write_bytes(b"")
    report = check_dataset(folder, resolution=64)
    usable = sorted(str(p) for p in report.usable_paths())
    events = []
    train(tiny_config("sd15", folder, tmp_path / "out", "train.max_steps=2"), events.append)
    lines = [e.text for e in events if isinstance(e, Status)]
    skipped = [line for line in lines if line.startswith("Skipped")]
    assert len(skipped) == 2 and any("broken.png" in s for s in skipped) and any("empty.jpg" in s for s in skipped)
    assert any(line.startswith(f"{len(usable)} images") for line in lines)


@pytest.mark.slow
def test_batches_loaded_ahead_train_the_same_lora(dataset, tmp_path):
    """dataset.num_workers threads load the next batches while a step runs: same LoRA as loading each batch when
    needed, with accumulation, uncached latents, tag shuffling and caption dropout in play."""
    overrides = ["train.max_steps=4", "train.gradient_accumulation=2", "dataset.cache_latents=false",
                 "dataset.shuffle_tags=true", "dataset.caption_dropout=0.3"]
    inline = train(tiny_config("sd15", dataset, tmp_path / "inline", "dataset.num_workers=0", *overrides))
    ahead = train(tiny_config("sd15", dataset, tmp_path / "ahead", "dataset.num_workers=2", *overrides))
    expected, actual = lora_tensors(inline.lora_path), lora_tensors(ahead.lora_path)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)


@pytest.mark.slow
def test_shuffled_tags_are_encoded_once_before_training(dataset, tmp_path):
    """With tag shuffling the captions of the whole run are cached up front: the text encoder never runs in a step,
    and the LoRA is the one per-step encoding gives (the cache is only a cache)."""
    overrides = ["train.max_steps=6", "dataset.shuffle_tags=true", "dataset.caption_dropout=0.2"]
    events = []
    cached = train(tiny_config("sd15", dataset, tmp_path / "cached", *overrides), events.append)
    texts = [event.text for event in events if isinstance(event, Status)]
    assert not any("computed at each step" in text for text in texts)
    assert any(text.startswith("Caching text embeddings") for text in texts)
    per_step = train(tiny_config("sd15", dataset, tmp_path / "per-step", "dataset.cache_text=false", *overrides))
    expected, actual = lora_tensors(per_step.lora_path), lora_tensors(cached.lora_path)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6)

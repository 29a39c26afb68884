"""Data-parallel training on the CPU: two processes (torchrun, gloo) train one run together, the same as one
process with twice the batch, into one set of files."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import torch
from helpers import make_dataset, tiny_config

from lora_gui.engine.distributed import Distributed, Share

STEPS = 3
OVERRIDES = (f"train.max_steps={STEPS}", "sample.every=0", "output.save_every=0", 'sample.prompts=[]')


def test_shares_split_a_global_batch_in_order():
    shares = [Distributed(3, rank, None).share(7) for rank in range(3)]
    assert [(s.positions.start, s.positions.stop) for s in shares] == [(0, 3), (3, 5), (5, 7)]
    assert [s.weight for s in shares] == [3 / 7, 2 / 7, 2 / 7]
    idle = Distributed(2, 1, None).share(1)  # no sample left: the first one, weighing nothing
    assert idle == Share(slice(0, 1), 0.0, 1)


def largest_difference(expected: dict, got: dict) -> float:
    """The largest difference of two LoRAs' tensors, relative to each tensor's largest value."""
    assert expected.keys() == got.keys()
    return max((tensor - got[key]).abs().max().item() / tensor.abs().max().item() for key, tensor in expected.items())


def losses(output) -> list[float]:
    with (output / "metrics.csv").open() as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def torchrun(tmp_path, processes: int, *arguments: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "lora_gui", "train", "--no-plan", *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)


def test_two_processes_train_the_run_of_one_process_with_twice_the_batch(tmp_path):
    from safetensors.torch import load_file

    from lora_gui.engine.train import train

    dataset = make_dataset(tmp_path / "images")
    single = train(tiny_config("sd15", dataset, tmp_path / "single", "train.batch_size=2", *OVERRIDES))
    output = tmp_path / "pair"
    sets = [f"--set={item}" for item in (f"dataset.dir={dataset}", f"output.dir={output}", "output.name=test-lora",
                                          "train.batch_size=1", *OVERRIDES, "output.save_every=2")]
    done = torchrun(tmp_path, 2, "--preset", "sd15-cpu-demo", *sets)
    said = done.stdout + done.stderr
    assert done.returncode == 0, said[-4000:]
    assert said.count("Done: ") == 1, said[-3000:]  # one process reports
    expected, got = load_file(single.lora_path), load_file(output / "test-lora.safetensors")
    assert expected.keys() == got.keys()
    # The same samples and noise (the losses below agree to 6 digits); the gradients are summed in another
    # order, and AdamW divides by their running size, so near-zero gradients move their weights by rounding:
    # measured 0.46 % of a tensor's largest value at worst. The tolerance: 1 %.
    assert largest_difference(expected, got) < 0.01
    with (output / "metrics.csv").open() as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle)]
    assert steps == list(range(1, STEPS + 1))  # one line per step, written once
    assert sorted(path.name for path in output.glob("*.safetensors")) == ["test-lora.diffusers.safetensors",
                                                                            "test-lora.safetensors"]
    with (output / "metrics.csv").open() as handle:  # the effective batch: 1 per process x 2 processes
        assert [row["samples"] for row in csv.DictReader(handle)] == ["2"] * STEPS
    single_losses, pair_losses = losses(tmp_path / "single"), losses(output)
    assert torch.allclose(torch.tensor(single_losses), torch.tensor(pair_losses), rtol=1e-5)

    # train.shard_model: the same run with the model sharded over the two processes (FSDP2) writes the same
    # files: the LoRA, the checkpoint's LoRA and its optimizer state, in the format of an unsharded run.
    sharded = tmp_path / "sharded"
    shard_sets = [*sets, f"--set=output.dir={sharded}", "--set=train.shard_model=true",
                  '--set=sample.prompts=["sks, a red square"]', "--set=sample.steps=2"]
    done = torchrun(tmp_path, 2, "--preset", "sd15-cpu-demo", *shard_sets)
    said = done.stdout + done.stderr
    assert done.returncode == 0 and "sharded over 2 processes" in said, said[-4000:]
    assert torch.allclose(torch.tensor(losses(sharded)), torch.tensor(pair_losses), rtol=1e-5)
    for name in ("test-lora.safetensors", "test-lora.diffusers.safetensors",
                 "checkpoints/step-000002/test-lora.safetensors"):
        assert largest_difference(load_file(output / name), load_file(sharded / name)) < 1e-3, name  # 5e-5 measured
    pair_state, sharded_state = (torch.load(folder / "checkpoints" / "step-000002" / "training_state.pt",
                                            weights_only=True)["optimizer"]["state"] for folder in (output, sharded))
    assert pair_state.keys() == sharded_state.keys()
    for index, state in pair_state.items():
        assert type(sharded_state[index]["exp_avg"]) is torch.Tensor  # gathered whole, not a shard
        assert torch.allclose(state["exp_avg"], sharded_state[index]["exp_avg"], atol=1e-8)
    assert [path.name for path in (sharded / "samples").iterdir()] == ["step-000003"]  # rendered by both together
    # ...and resumes sharded from its own checkpoint to the same LoRA.
    finished = load_file(sharded / "test-lora.safetensors")
    done = torchrun(tmp_path, 2, "--preset", "sd15-cpu-demo", *shard_sets, "--set=sample.prompts=[]",
                    "--resume", str(sharded / "checkpoints" / "step-000002"))
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert largest_difference(finished, load_file(sharded / "test-lora.safetensors")) < 1e-4
    assert losses(sharded)[:2] == losses(output)[:2] and len(losses(sharded)) == STEPS

    # The 2-process checkpoint (sharded) resumes in 1 process (global batch 2 -> 1) at the sample it had reached.
    checkpoint = sharded / "checkpoints" / "step-000002"
    saved = json.loads((checkpoint / "progress.json").read_text())
    assert (saved["processes"], saved["global_batch"]) == (2, 2) and saved["samples_in_epoch"] >= 2
    alone = subprocess.run([sys.executable, "-m", "lora_gui", "train", "--no-plan", "--preset", "sd15-cpu-demo",
                            *shard_sets, "--set", "sample.prompts=[]", "--set", "train.max_steps=4",
                            "--resume", str(checkpoint)],
                           capture_output=True, text=True, timeout=300)
    said = alone.stdout + alone.stderr
    assert alone.returncode == 0 and "this run has one process, so the model is not sharded" in said, said[-3000:]
    assert f"Epoch {saved['epoch']} goes on at sample {saved['samples_in_epoch']}" in said, said[-3000:]
    resumed = json.loads((sharded / "checkpoints" / "step-000004" / "progress.json").read_text())
    assert (resumed["processes"], resumed["global_batch"], resumed["epoch"]) == (1, 1, saved["epoch"])
    assert resumed["samples_in_epoch"] == saved["samples_in_epoch"] + 2  # two more steps of one sample each


def test_a_resume_on_another_global_batch_goes_on_at_the_same_sample(tmp_path):
    """The cursor a resume starts from (``cursor_at``): the epoch's samples in the saved run's order, none
    skipped or taken twice, cut into batches of the new size from one bucket each."""
    from lora_gui.data.dataset import TrainingData
    from lora_gui.engine.data_cursor import DataCursor, cursor_at

    section = tiny_config("sd15", make_dataset(tmp_path / "images"), tmp_path / "out", "dataset.resolution=96").dataset
    data = {size: TrainingData(section, size_multiple=8, batch_size=size, seed=5) for size in (1, 2, 3)}
    assert len({data[1].bucket_of(sample) for sample in range(6)}) > 1  # batches must keep to one bucket
    for saved_size, new_size in ((2, 1), (1, 2), (2, 3), (3, 2), (2, 2)):
        saved = DataCursor(data[saved_size])
        for _ in range(2):
            saved.next()
        order = [sample for batch in data[saved_size].batches_for_epoch(0) for sample in batch]
        progress = {"epoch": 0, "samples_in_epoch": saved.samples_in_epoch, "global_batch": saved_size}
        cursor = cursor_at(data[new_size], progress, saved_size)
        if new_size == saved_size:  # the same batches as the saved run, from its batch index
            assert cursor.batch_index == saved.batch_index and cursor.upcoming(9) == saved.upcoming(9)
        taken = []
        while cursor.epoch == 0 and cursor.upcoming(1)[0][1] == 0:
            batch, _ = cursor.next()
            assert len(batch) <= new_size and len({data[new_size].bucket_of(sample) for sample in batch}) == 1
            taken += batch
        assert sorted(taken) == sorted(order[saved.samples_in_epoch:]), (saved_size, new_size)
        if new_size == 1:
            assert taken == order[saved.samples_in_epoch:]  # exactly the order the saved run would have taken
        assert cursor.next()[1] == 1 and cursor._batches == data[new_size].batches_for_epoch(1)
    old_format = {"epoch": 0, "batch_in_epoch": 2}  # a checkpoint from before samples_in_epoch was recorded
    assert cursor_at(data[2], old_format, 2).samples_in_epoch == sum(map(len, data[2].batches_for_epoch(0)[:2]))


def test_gpus_asks_for_cuda_gpus_and_starts_accelerate_launch_with_the_same_command():
    import argparse

    import pytest

    from lora_gui.cli import main
    from lora_gui.cli_gpus import GpusRefused, accelerate_command, wanted_processes

    assert wanted_processes(None, 0) == 1 and wanted_processes("all", 4) == 4 and wanted_processes("2", 8) == 2
    for text, message in (("two", "give a number"), ("0", "at least 1"), ("3", r"3 GPU\(s\) asked, 2 CUDA GPU\(s\)")):
        with pytest.raises(GpusRefused, match=message):
            wanted_processes(text, 2)
    args = argparse.Namespace(config="my.toml", preset=None, overrides=["train.max_steps=5"], resume="latest",
                              overwrite=False, no_plan=True)
    assert accelerate_command(args, 4)[1:] == [
        "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "4", "-m", "lora_gui", "train",
        "my.toml", "--set", "train.max_steps=5", "--resume", "latest", "--no-plan"]
    assert main(["train", "my.toml", "--gpus", "2"]) == 2  # this machine has no CUDA GPU: refused, said why


def test_sigterm_stops_every_process_at_one_step_and_one_checkpoint_is_saved(tmp_path):
    import signal
    import time

    dataset = make_dataset(tmp_path / "images")
    output = tmp_path / "run"
    # An empty model cache: the first process builds the built-in model while the other waits (transformers
    # saves on the first process only, so a model built by another would lack its weights).
    sets = [f"--set={item}" for item in (f"dataset.dir={dataset}", f"output.dir={output}", "train.max_steps=100000",
                                          "train.batch_size=1", "sample.every=0", "output.save_every=0",
                                          "sample.prompts=[]", f"model.cache_dir={tmp_path / 'empty-cache'}")]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "lora_gui", "train", "--no-plan", "--preset", "sd15-cpu-demo", *sets]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    deadline = time.monotonic() + 300
    while not (output / "metrics.csv").is_file() or len((output / "metrics.csv").read_text().splitlines()) < 3:
        assert time.monotonic() < deadline and process.poll() is None, process.stdout.read()[-3000:]
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)  # torchrun passes it to both processes
    said, _ = process.communicate(timeout=300)
    checkpoints = sorted((output / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1, said[-3000:]
    assert said.count("Stopped. To continue") == 1, said[-3000:]
    with (output / "metrics.csv").open() as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle)]
    assert checkpoints[0].name == f"step-{steps[-1]:06d}" and steps == list(range(1, steps[-1] + 1))


def test_shard_model_names_the_settings_it_cannot_go_with(tmp_path):
    from lora_gui.engine.sharding import config_problem

    plain = tiny_config("sd15", tmp_path, tmp_path / "out", "train.shard_model=true", "train.optimizer=adamw")
    assert config_problem(plain, uses_grad_scaler=False) == ""
    clashing = tiny_config("sd15", tmp_path, tmp_path / "out", "train.shard_model=true",
                           "lora.train_text_encoder=true", "model.quantize=int8", "model.block_swap=4",
                           "lora.init=pissa", "train.optimizer=adamw8bit", "train.compile_blocks=true")
    problem = config_problem(clashing, uses_grad_scaler=True)
    for named in ("lora.train_text_encoder", "model.quantize = int8", "model.block_swap", "lora.init = pissa",
                  "train.optimizer = adamw8bit", "train.compile_blocks", "fp16 mixed precision"):
        assert named in problem

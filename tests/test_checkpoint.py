import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_gui.config import TrainingConfig
from lora_gui.engine.checkpoint import (
    COMPLETE_MARKER,
    CheckpointError,
    ResumeError,
    capture_rng_state,
    check_resume_compatible,
    check_weights_only_loadable,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    make_training_state,
    restore_rng_state,
    restore_training_state,
    save_checkpoint,
)
from lora_gui.engine.optim import build_lr_scheduler, build_optimizer

LORA_FILE = "my-lora.safetensors"


def _config(tmp_path: Path, **sections) -> TrainingConfig:
    return TrainingConfig(output={"dir": str(tmp_path), "keep_last": 100}, **sections)


def _writer(tensor: torch.Tensor | None = None):
    def write_lora(folder: Path) -> None:
        save_file({"lora": tensor if tensor is not None else torch.ones(3)}, str(folder / LORA_FILE))

    return write_lora


def _save(tmp_path: Path, step: int, config: TrainingConfig | None = None, **kwargs) -> Path:
    kwargs.setdefault("write_lora", _writer())
    kwargs.setdefault("training_state", {"extra": {"step": step}})
    return save_checkpoint(
        tmp_path, step=step, epoch=0, batch_in_epoch=step, config=config or _config(tmp_path), **kwargs
    )


def _steps(paths: list[Path]) -> list[int]:
    return [int(path.name.split("-")[1]) for path in paths]


def _leftovers(tmp_path: Path) -> list[str]:
    return [path.name for path in (tmp_path / "checkpoints").iterdir() if "." in path.name]


# ----------------------------------------------------------------------------- layout and listing


def test_layout_and_progress(tmp_path):
    config = _config(tmp_path, lora={"rank": 8})
    path = _save(tmp_path, 123, config)
    assert path == tmp_path / "checkpoints" / "step-000123"
    assert {p.name for p in path.iterdir()} == {LORA_FILE, "training_state.pt", "progress.json", COMPLETE_MARKER}
    progress, state = load_checkpoint(path)
    assert progress["step"] == 123 and progress["batch_in_epoch"] == 123 and progress["epoch"] == 0
    assert progress["identity_hash"] == config.identity_hash()
    assert progress["config_hash"] == config.full_hash()
    assert (progress["family"], progress["base"], progress["rank"]) == ("sd15", config.model.base, 8)
    assert "time" in progress
    assert state == {"extra": {"step": 123}}
    assert _leftovers(tmp_path) == []


def test_list_and_latest_sort_by_step(tmp_path):
    assert list_checkpoints(tmp_path) == [] and latest_checkpoint(tmp_path) is None
    for step in (20, 5, 1000000, 7):
        _save(tmp_path, step)
    assert _steps(list_checkpoints(tmp_path)) == [5, 7, 20, 1000000]
    assert latest_checkpoint(tmp_path).name == "step-1000000"


def test_second_save_of_the_same_step_is_a_no_op(tmp_path):
    first = _save(tmp_path, 3, write_lora=_writer(torch.zeros(2)))

    def must_not_run(folder):
        raise AssertionError("the saved step was written again")

    assert _save(tmp_path, 3, write_lora=must_not_run) == first
    assert torch.equal(load_file(first / LORA_FILE)["lora"], torch.zeros(2))


# ----------------------------------------------------------------------------- atomicity


@pytest.mark.parametrize("crash", [RuntimeError("boom"), KeyboardInterrupt()])
def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, crash):
    previous = _save(tmp_path, 1)

    def write_then_crash(folder: Path) -> None:
        _writer()(folder)
        raise crash

    with pytest.raises(type(crash)):
        _save(tmp_path, 2, write_lora=write_then_crash)
    assert list_checkpoints(tmp_path) == [previous]
    assert not (tmp_path / "checkpoints" / "step-000002").exists()
    assert _leftovers(tmp_path) == []
    load_checkpoint(previous)


@pytest.mark.parametrize("error", [
    OSError(28, "No space left on device"),
    RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),  # safetensors
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 512 vs 446"),  # torch.save
])
def test_disk_full_says_so_and_keeps_older_checkpoints(tmp_path, error):
    previous = _save(tmp_path, 1)

    def disk_full(folder: Path) -> None:
        raise error

    with pytest.raises(CheckpointError, match=r"The disk is full.*Free space on the disk holding .*checkpoints"):
        _save(tmp_path, 2, write_lora=disk_full)
    assert _leftovers(tmp_path) == [] and list_checkpoints(tmp_path) == [previous]
    load_checkpoint(previous)


def test_free_space_is_checked_before_saving(tmp_path, monkeypatch):
    import shutil as shutil_module
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda _path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(CheckpointError, match=r"Not enough disk space .* MB are needed and 0 MB are free"):
        _save(tmp_path, 1)
    assert list_checkpoints(tmp_path) == []


def test_leftovers_of_a_killed_save_are_ignored_then_removed(tmp_path):
    _save(tmp_path, 1)
    leftover = tmp_path / "checkpoints" / "step-000002.tmp-deadbeef"
    leftover.mkdir()
    (leftover / LORA_FILE).write_bytes(b"half")
    assert _steps(list_checkpoints(tmp_path)) == [1]
    _save(tmp_path, 3)
    assert not leftover.exists()
    assert _steps(list_checkpoints(tmp_path)) == [1, 3]


def test_an_incomplete_folder_with_the_final_name_is_replaced(tmp_path):
    stale = tmp_path / "checkpoints" / "step-000004"
    stale.mkdir(parents=True)
    (stale / LORA_FILE).write_bytes(b"half")
    path = _save(tmp_path, 4)
    assert path == stale and (path / COMPLETE_MARKER).is_file()
    assert load_file(path / LORA_FILE)["lora"].shape == (3,)
    assert _leftovers(tmp_path) == []


def test_unloadable_state_is_refused_before_writing(tmp_path):
    with pytest.raises(TypeError, match=r"\['extra'\]\['order'\] is a numpy.ndarray"):
        _save(tmp_path, 1, training_state={"extra": {"order": np.arange(3)}})
    with pytest.raises(TypeError, match="numpy.float64"):
        check_weights_only_loadable({"loss": np.float64(1.0)})
    assert list_checkpoints(tmp_path) == []


def test_a_lora_writer_that_writes_nothing_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="wrote no files"):
        _save(tmp_path, 1, write_lora=lambda folder: None)


# ----------------------------------------------------------------------------- keep_last


def test_keep_last_deletes_only_older_complete_ones(tmp_path):
    incomplete = tmp_path / "checkpoints" / "step-000002"
    incomplete.mkdir(parents=True)
    for step in range(1, 6):
        if step != 2:
            _save(tmp_path, step, keep_last=2)
    assert _steps(list_checkpoints(tmp_path)) == [4, 5]
    assert incomplete.is_dir()


def test_keep_last_never_deletes_the_new_or_later_checkpoints(tmp_path):
    for step in (10, 20):
        _save(tmp_path, step)
    _save(tmp_path, 15, keep_last=1)  # resumed from an earlier checkpoint
    assert _steps(list_checkpoints(tmp_path)) == [15, 20]


def test_keep_last_defaults_to_the_config(tmp_path):
    config = TrainingConfig(output={"dir": str(tmp_path), "keep_last": 2})
    for step in (1, 2, 3):
        _save(tmp_path, step, config)
    assert _steps(list_checkpoints(tmp_path)) == [2, 3]


# ----------------------------------------------------------------------------- loading


def test_incomplete_checkpoint_is_refused_naming_the_latest_complete(tmp_path):
    good = _save(tmp_path, 5)
    broken = tmp_path / "checkpoints" / "step-000007"
    broken.mkdir()
    (broken / LORA_FILE).write_bytes(b"half")
    with pytest.raises(CheckpointError, match=f"incomplete.*resume from {good}"):
        load_checkpoint(broken)


def test_incomplete_checkpoint_without_alternatives(tmp_path):
    temp = tmp_path / "checkpoints" / "step-000001.tmp-0123abcd"
    temp.mkdir(parents=True)
    with pytest.raises(CheckpointError, match="incomplete.*no complete checkpoint"):
        load_checkpoint(temp)


def test_damaged_checkpoint_is_refused(tmp_path):
    older, newer = _save(tmp_path, 1), _save(tmp_path, 2)
    (newer / LORA_FILE).write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match=f"damaged.*{LORA_FILE}.*resume from {older}"):
        load_checkpoint(newer)


def _same_size_garbage(path: Path) -> None:
    path.write_bytes(b"\x00" * path.stat().st_size)


def _flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("name", "damage"), [
    ("progress.json", _same_size_garbage),
    ("training_state.pt", _same_size_garbage),
    (LORA_FILE, _flip_one_byte),
    (COMPLETE_MARKER, _same_size_garbage),
])
def test_corruption_is_caught_and_the_newest_intact_checkpoint_named(tmp_path, name, damage):
    intact, also_damaged, newest = _save(tmp_path, 1), _save(tmp_path, 2), _save(tmp_path, 3)
    _flip_one_byte(also_damaged / LORA_FILE)
    damage(newest / name)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(newest)
    message = str(err.value)
    assert "damaged" in message and f"resume from {intact} instead (the newest intact one)" in message
    assert "weights_only" not in message and "Expecting value" not in message
    load_checkpoint(intact)


def test_checkpoints_without_checksums_still_load_and_are_size_checked(tmp_path):
    path = _save(tmp_path, 1)
    marker = json.loads((path / COMPLETE_MARKER).read_text())
    marker["files"] = {name: entry["size"] for name, entry in marker["files"].items()}  # the first format
    (path / COMPLETE_MARKER).write_text(json.dumps(marker))
    load_checkpoint(path)
    _same_size_garbage(path / "training_state.pt")
    with pytest.raises(CheckpointError, match="damaged .its files cannot be read.*no complete checkpoint|damaged"):
        load_checkpoint(path)


# ----------------------------------------------------------------------------- exact resume


def _train_steps(param, optimizer, scheduler, generator, steps: int) -> None:
    for _ in range(steps):
        noise = torch.randn(param.shape, generator=generator)
        optimizer.zero_grad()
        ((param - noise) ** 2).mean().backward()
        optimizer.step()
        scheduler.step()


def _setup(config: TrainingConfig, weights: torch.Tensor):
    param = torch.nn.Parameter(weights.clone())
    optimizer = build_optimizer([{"params": [param]}], config.train)
    return param, optimizer, build_lr_scheduler(optimizer, config.train)


@pytest.mark.parametrize(("name", "lr"), [("adamw", 1e-2), ("adamw8bit", 1e-2), ("prodigy", 1.0)])
def test_resume_continues_exactly_like_straight_through(tmp_path, name, lr):
    config = _config(
        tmp_path,
        train={"optimizer": name, "learning_rate": lr, "lr_scheduler": "cosine", "warmup_steps": 2, "max_steps": 8},
    )
    start = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))  # 8-bit state needs 4096 elements
    param, optimizer, scheduler = _setup(config, start)
    generator = torch.Generator().manual_seed(config.train.seed)
    _train_steps(param, optimizer, scheduler, generator, 3)
    state = make_training_state(optimizer, scheduler, rng=capture_rng_state({"noise": generator}))
    path = _save(tmp_path, 3, config, write_lora=_writer(param.detach()), training_state=state)
    _train_steps(param, optimizer, scheduler, generator, 5)

    progress, loaded = load_checkpoint(path)
    resumed, optimizer2, scheduler2 = _setup(config, load_file(path / LORA_FILE)["lora"])
    restore_training_state(loaded, optimizer2, scheduler2)
    generator2 = torch.Generator()
    assert restore_rng_state(loaded["rng"], {"noise": generator2}) == []
    _train_steps(resumed, optimizer2, scheduler2, generator2, 5)

    assert progress["step"] == 3
    assert torch.equal(resumed.detach(), param.detach())
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()


def test_rng_round_trip_through_a_checkpoint(tmp_path):
    generator = torch.Generator().manual_seed(7)
    state = make_training_state(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), _NoScheduler())
    state["rng"] = capture_rng_state({"data": generator})

    def draw():
        numbers = torch.rand(3), torch.randint(9, (4,), generator=generator)
        return random.random(), np.random.rand(3).tolist(), *numbers

    expected = draw()
    _, loaded = load_checkpoint(_save(tmp_path, 1, training_state=state))
    random.seed(0), np.random.seed(0), torch.manual_seed(0), generator.manual_seed(0)
    assert restore_rng_state(loaded["rng"], {"data": generator}) == []
    again = draw()
    assert again[:2] == expected[:2]
    assert torch.equal(again[2], expected[2]) and torch.equal(again[3], expected[3])


def test_restore_reports_generators_it_has_no_state_for():
    state = capture_rng_state({})
    assert restore_rng_state(state, {"new": torch.Generator()}) == ["new"]


class _NoScheduler:
    def state_dict(self):
        return {}


# ----------------------------------------------------------------------------- resume compatibility


def test_matching_config_may_resume(tmp_path):
    config = _config(tmp_path)
    progress, _ = load_checkpoint(_save(tmp_path, 1, config))
    changed = _config(tmp_path, train={"learning_rate": 5e-5, "max_steps": 4000})
    check_resume_compatible(progress, changed)


def test_mismatched_rank_names_the_key(tmp_path):
    progress, _ = load_checkpoint(_save(tmp_path, 1, _config(tmp_path, lora={"rank": 16})))
    with pytest.raises(ResumeError) as error:
        check_resume_compatible(progress, _config(tmp_path, lora={"rank": 32}))
    assert str(error.value) == (
        "lora.rank is 32 but the checkpoint was trained with rank 16; set lora.rank = 16 "
        "or start a new run in another output folder."
    )


def test_every_difference_is_named(tmp_path):
    progress, _ = load_checkpoint(_save(tmp_path, 1, _config(tmp_path)))
    other = _config(
        tmp_path, model={"family": "flux", "base": "builtin:tiny-flux"}, lora={"use_dora": True, "alpha": 8}
    )
    with pytest.raises(ResumeError) as error:
        check_resume_compatible(progress, other)
    message = str(error.value)
    expected_fixes = [
        'model.family = "sd15"',
        'model.base = "builtin:tiny-sd15"',
        "lora.use_dora = false",
        "lora.alpha = 16.0",
    ]
    for expected in expected_fixes:
        assert expected in message
    assert "lora.rank" not in message


def test_identity_hash_alone_is_checked_too(tmp_path):
    progress = {"step": 1, "identity_hash": "0000000000000000"}
    with pytest.raises(ResumeError, match="LoRA settings"):
        check_resume_compatible(progress, _config(tmp_path))


def test_newer_format_is_refused(tmp_path):
    with pytest.raises(ResumeError, match="update lora-gui"):
        check_resume_compatible({"format": 99}, _config(tmp_path))


def test_progress_file_is_plain_json(tmp_path):
    path = _save(tmp_path, 9)
    assert json.loads((path / "progress.json").read_text())["step"] == 9
    entry = json.loads((path / COMPLETE_MARKER).read_text())["files"][LORA_FILE]
    assert entry["size"] > 0 and len(entry["sha256"]) == 64


# ----------------------------------------------------------------------------- a real full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs (needs root and permission to mount; skipped otherwise)."""
    import subprocess

    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def _fill(folder: Path) -> None:
    """Take every free byte of the disk holding ``folder``."""
    with open(folder / "filler.bin", "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass


def test_a_full_disk_is_reported_and_older_checkpoints_stay_intact(small_disk, monkeypatch):
    import lora_gui.engine.checkpoint as checkpoint_module

    monkeypatch.setattr(checkpoint_module, "DISK_MARGIN_BYTES", 0)
    state = {"extra": {"weights": torch.zeros(64 * 1024)}}  # 256 kB
    first = _save(small_disk, 1, training_state=state)

    def write_then_fill(folder: Path) -> None:
        _writer()(folder)
        _fill(small_disk)  # the disk fills up after the free-space check, during the save itself

    with pytest.raises(CheckpointError, match=r"The disk is full.*Free space on the disk holding"):
        _save(small_disk, 2, training_state=state, write_lora=write_then_fill)
    (small_disk / "filler.bin").unlink()
    assert list_checkpoints(small_disk) == [first] and _leftovers(small_disk) == []
    load_checkpoint(first)


def test_not_enough_space_is_refused_before_writing(small_disk):
    state = {"extra": {"weights": torch.zeros(1024 * 1024)}}  # 4 MB: more than the disk holds
    with pytest.raises(CheckpointError, match=r"Not enough disk space to save a checkpoint in .*small-disk"):
        _save(small_disk, 1, training_state=state)
    assert list_checkpoints(small_disk) == [] and _leftovers(small_disk) == []

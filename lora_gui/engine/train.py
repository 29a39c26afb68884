"""The generic training loop: ``train(config, emit, controls)``.

Read top to bottom: prepare the data (before any model is loaded, so a broken dataset fails
fast), load the family's model, fill the caches, attach LoRA, build the optimizer, resume if
asked, then step until done, checking the controls at every step boundary.
"""

from __future__ import annotations

import gc
import json
import math
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_gui.captioning import unload_all_captioners
from lora_gui.config import TrainingConfig, save_config
from lora_gui.engine import checkpoint as ckpt
from lora_gui.engine.activation_offload import offloaded_activations
from lora_gui.engine.block_swap import BlockSwap, BlockSwapError, attach_block_swap, repeated_blocks
from lora_gui.engine.block_swap import config_problem as block_swap_problem
from lora_gui.engine.devices import (
    autocast_context,
    free_accelerator_memory,
    resolve_placement,
    text_encoder_device,
)
from lora_gui.engine.distributed import Distributed, Share, noised_share
from lora_gui.engine.errors import NonFiniteLoss, StopRequested, TrainingError, explain
from lora_gui.engine.families.detect import with_detected_family
from lora_gui.engine.families.registry import get_family
from lora_gui.engine.lora import inject_lora, load_lora_state, lora_parameters, lora_state_dicts
from lora_gui.engine.lora_files import save_lora_files
from lora_gui.engine.merge import merge_loras
from lora_gui.engine.metrics import MetricsLog
from lora_gui.engine.optim import build_lr_scheduler, build_optimizer, current_lr
from lora_gui.engine.outputs import OutputLock, hold_output_folder, start_fresh
from lora_gui.engine.quantize import quantize_denoiser, quantize_text_encoders_on_cpu
from lora_gui.engine.sampling import SampleSettings, encode_sampling_prompts, render, save_images
from lora_gui.events import (
    CheckpointSaved,
    Controls,
    Emit,
    Failed,
    Finished,
    Progress,
    SamplesReady,
    Status,
    Stopped,
    ignore_events,
)


@dataclass(frozen=True)
class TrainResult:
    status: str  # "finished" or "stopped"
    step: int
    lora_path: str | None
    checkpoint: str | None


def train(
    config: TrainingConfig,
    emit: Emit = ignore_events,
    controls: Controls | None = None,
    resume_from: str | Path | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Train a LoRA. Emits events as it goes; raises ``TrainingError`` (after emitting ``Failed``).

    A run from step 0 refuses an output folder that holds an earlier run unless ``overwrite`` (which
    deletes that run's LoRA, checkpoints, samples and metrics first).
    """
    controls = controls or Controls()
    run = None
    try:
        run = TrainingRun(with_detected_family(config, emit), emit, controls, overwrite)
        return run.execute(resume_from)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        explanation = explain(exc)
        emit(Failed(message=explanation.message, hint=explanation.hint, details=explanation.details))
        if isinstance(exc, TrainingError):
            raise
        raise TrainingError(explanation.message, explanation.hint) from exc
    finally:
        if run is not None:
            run.close()
        controls.cancel_jobs("The training run ended before this request could run.")


class DataCursor:
    """Where training is in the data: epoch and batch index, advanced one micro-batch at a time."""

    def __init__(self, data, epoch: int = 0, batch_index: int = 0) -> None:
        self.data = data
        self.epoch = epoch
        self.batch_index = batch_index
        self._batches = data.batches_for_epoch(epoch)

    def next(self) -> tuple[list[int], int]:
        if self.batch_index >= len(self._batches):
            self.epoch += 1
            self.batch_index = 0
            self._batches = self.data.batches_for_epoch(self.epoch)
        indices = self._batches[self.batch_index]
        self.batch_index += 1
        return indices, self.epoch

    def upcoming(self, count: int) -> list[tuple[list[int], int]]:
        """The next ``count`` positions ``next()`` will return, without moving."""
        epoch, index, batches, positions = self.epoch, self.batch_index, self._batches, []
        while len(positions) < count:
            if index >= len(batches):
                epoch, index = epoch + 1, 0
                batches = self.data.batches_for_epoch(epoch)
                if not batches:
                    break
            positions.append((batches[index], epoch))
            index += 1
        return positions


class BatchPrefetcher:
    """The cursor's batches, loaded ``workers`` at a time on background threads while a step runs
    (``dataset.num_workers``; 0 loads each batch when it is needed). Loading a batch is a pure function of
    its position, so prefetching changes nothing but the time it takes."""

    def __init__(self, data, cursor: DataCursor, workers: int, dist: Distributed | None = None) -> None:
        self.data, self.cursor, self.workers, self.dist = data, cursor, workers, dist
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="lora-gui-batches") if workers else None
        self.pending: deque[tuple[tuple, Future]] = deque()
        self.share: Share | None = None  # this process's part of the last global batch (distributed runs)

    def _local(self, indices: list[int]) -> list[int]:
        return indices if self.dist is None else indices[self.dist.share(len(indices)).positions]

    def next(self):
        indices, epoch = self.cursor.next()
        if self.dist is not None:
            self.share = self.dist.share(len(indices))
            indices = indices[self.share.positions]
        if self.pool is None:
            return self.data.load_batch(indices, epoch)
        wanted = (tuple(indices), epoch)
        while self.pending and self.pending[0][0] != wanted:
            self.pending.popleft()[1].cancel()
        future = self.pending.popleft()[1] if self.pending else self.pool.submit(self.data.load_batch, indices, epoch)
        queued = {key for key, _ in self.pending}
        for ahead_indices, ahead_epoch in self.cursor.upcoming(self.workers * 2):
            ahead_indices = self._local(ahead_indices)
            key = (tuple(ahead_indices), ahead_epoch)
            if key not in queued:
                self.pending.append((key, self.pool.submit(self.data.load_batch, ahead_indices, ahead_epoch)))
                queued.add(key)
        return future.result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


class TrainingRun:
    def __init__(self, config: TrainingConfig, emit: Emit, controls: Controls, overwrite: bool = False) -> None:
        self.config = config
        self.emit = emit
        self.controls = controls
        self.overwrite = overwrite
        self.output_lock: OutputLock | None = None
        self.output_dir = Path(config.output.dir)
        self.family = get_family(config.model.family)
        self.step = 0
        self.metrics: MetricsLog | None = None
        self.sample_prompts: dict | None = None  # validation prompt embeddings, while the text encoders are frozen
        self.resume_progress: dict = {}  # the checkpoint's data position when resuming
        self.dist: Distributed | None = None  # the processes of a distributed run (None: this one alone)

    # ------------------------------------------------------------------ orchestration
    @property
    def is_main(self) -> bool:
        """Whether this process writes the files and reports (always, unless it is one of several)."""
        return self.dist is None or self.dist.is_main

    def execute(self, resume_from: str | Path | None) -> TrainResult:
        self.dist = Distributed.from_environment(resolve_placement(self.config).device)
        if not self.is_main:
            self.emit = ignore_events  # the main process reports for the run
        resume = self.load_resume(resume_from)
        if resume is not None:
            self.check_same_processes(resume[0])
        if self.is_main:
            self.output_lock = hold_output_folder(self.output_dir)
            if resume is None:
                start_fresh(self.output_dir, self.config.output.name, self.overwrite)
        self.in_turn(lambda: None)  # the folder is ready before another process reads its caches
        try:
            self.set_up(resume_from, resume)
        except StopRequested:
            return self.stopped_before_training()
        return self.loop()

    def set_up(self, resume_from: str | Path | None, resume: tuple[dict, dict] | None) -> None:
        """Everything before the first step; a stop request ends it between units of work."""
        self.data = self.prepare_data()
        problem = block_swap_problem(self.config.model.block_swap, self.config.train.gradient_checkpointing,
                                     self.config.model.quantize)
        if problem:
            raise TrainingError(problem, "Change the setting named above, or set model.block_swap = 0.")
        self.placement = resolve_placement(self.config)
        unload_all_captioners()  # a captioning model must not hold accelerator memory while training
        self.check_stop()
        self.status(f"Loading {self.config.model.base} on {self.placement.describe()}")
        self.load_model()
        self.check_stop()
        self.resume_progress = resume[0] if resume is not None else {}
        self.fill_caches()
        self.check_stop()
        self.load_denoiser()
        self.attach_lora()
        self.build_optimization()
        self.cursor = DataCursor(self.data)
        self.noise_generator = torch.Generator(device="cpu").manual_seed(self.config.train.seed)
        if resume is not None:
            self.restore(Path(resume_from), *resume)
        if self.is_main:
            save_config(self.config, self.output_dir / "config.toml")
            self.metrics = MetricsLog(self.output_dir, self.step, self.config.output.tensorboard)

    def check_same_processes(self, progress: dict) -> None:
        saved, now = int(progress.get("processes", 1)), 1 if self.dist is None else self.dist.world_size
        if saved != now:
            raise TrainingError(
                f"This checkpoint was saved by a run of {saved} process(es); this one has {now}. Its place in the "
                "data counts batches of that run, so it resumes only with the same number of processes.",
                f"Start the resume with {saved} process(es) (for example torchrun --nproc_per_node {saved}, or "
                "without a launcher for 1).")

    def in_turn(self, work):
        """``work()`` on the main process first, then on the others (which then find the caches it filled)."""
        if self.dist is None:
            return work()
        if self.is_main:
            done = work()
            self.dist.wait_for_everyone()
            return done
        self.dist.wait_for_everyone()
        return work()

    def check_stop(self) -> None:
        if self.controls.stop_requested:
            raise StopRequested()

    def stopped_before_training(self) -> TrainResult:
        self.status("Stopped before training started; nothing was trained, so there is no checkpoint.")
        self.emit(Stopped(step=self.step, checkpoint=None))
        return TrainResult(status="stopped", step=self.step, lora_path=None, checkpoint=None)

    def status(self, text: str, current: int | None = None, total: int | None = None) -> None:
        self.emit(Status(text=text, current=current, total=total))

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.output_lock is not None:
            self.output_lock.release()
            self.output_lock = None

    # ------------------------------------------------------------------ setup
    def load_resume(self, resume_from: str | Path | None) -> tuple[dict, dict] | None:
        """A checkpoint's (progress, training state), refused before any work if it does not fit the config."""
        if resume_from is None:
            return None
        progress, state = ckpt.load_checkpoint(Path(resume_from))
        ckpt.check_resume_compatible(progress, self.config)
        return progress, state

    def prepare_data(self):
        from lora_gui.data.dataset import TrainingData
        from lora_gui.data.doctor import training_records

        dataset = self.config.dataset
        if not dataset.dir:
            raise TrainingError("dataset.dir is empty.", "Set dataset.dir to a folder of images with .txt captions.")
        self.status(f"Checking {dataset.dir}")
        records = training_records(
            dataset, size_multiple=self.family.size_multiple, log=self.status,
            progress=self.progress_status("Checking dataset images"),
        )
        processes = 1 if self.dist is None else self.dist.world_size
        data = TrainingData(  # a distributed run walks global batches: each process takes its share
            dataset, size_multiple=self.family.size_multiple, batch_size=self.config.train.batch_size * processes,
            seed=self.config.train.seed, log=self.status, records=records,
        )
        self.status(data.describe())
        if self.dist is not None:
            train = self.config.train
            self.status(f"{processes} processes train together: effective batch {train.batch_size} per process x "
                        f"{processes} processes x {train.gradient_accumulation} accumulation = "
                        f"{train.batch_size * processes * train.gradient_accumulation} samples per step")
        return data

    def load_model(self) -> None:
        """Load the text encoders and the VAE into CPU memory; the denoiser follows once the caches are full
        (``load_denoiser``), so that system memory holds the large parts one after the other. The parts move to
        the accelerator as they are needed, so it never holds the encoders and the full model at once."""
        self.components = self.family.load(self.config.model, torch.device("cpu"), self.placement.weight_dtype,
                                           self.emit)
        self.components.device = self.placement.device
        warning = self.family.distillation_warning(self.components)
        if warning:
            self.status(f"Warning: {warning}")
        if self.config.model.merge_loras:  # LoRAs may change the text encoders too: fused before caching
            self.load_denoiser_weights()
            merge_loras(self.family, self.components, self.config.model.merge_loras, self.emit)
        self.quantize_text_encoders()

    def load_denoiser_weights(self):
        if not self.components.denoiser_loaded:
            self.status(f"Loading the {self.family.denoiser_key}")
        return self.components.denoiser

    def load_denoiser(self) -> None:
        """The denoiser, quantized if asked (on the CPU, before it moves), on the accelerator."""
        denoiser = self.load_denoiser_weights()
        self.check_stop()
        mode = self.config.model.quantize
        if mode != "none":
            count = quantize_denoiser(denoiser, mode, torch.device("cpu"))
            self.status(f"Quantized {count} layers of the {self.family.denoiser_key} to {mode}")
        if self.config.model.block_swap <= 0:  # with block swap the denoiser moves once its LoRA is attached
            denoiser.to(self.placement.device)

    def quantize_text_encoders(self) -> None:
        mode = self.config.model.quantize_text_encoders
        if mode == "none":
            return
        if self.config.lora.train_text_encoder:
            raise TrainingError("model.quantize_text_encoders cannot be used with lora.train_text_encoder.",
                                "Set model.quantize_text_encoders = 'none' to train the text encoder, or turn "
                                "lora.train_text_encoder off.")
        count = quantize_text_encoders_on_cpu(self.components.text_encoders, mode)
        self.status(f"Quantized {count} layers of the text encoder(s) to {mode}")
        load_again = self.components.text_encoder_loader
        if load_again is not None:
            def quantized_again() -> list:
                encoders = load_again()
                quantize_text_encoders_on_cpu(encoders, mode)
                return encoders

            self.components.text_encoder_loader = quantized_again

    def cache_dir(self) -> Path:
        return Path(self.config.dataset.cache_dir or self.output_dir / "cache")

    def model_key(self) -> str:
        model = self.config.model
        merged = f"|merged {model.merge_loras}" if model.merge_loras else ""
        quantized = f"|text encoders {model.quantize_text_encoders}" if model.quantize_text_encoders != "none" else ""
        files = f"|files {model.text_encoder_files} {model.vae_file}" if model.text_encoder_files or model.vae_file else ""
        return (f"{model.family}|{model.base}|{model.revision}|{self.components.source}|{self.components.vae.dtype}"
                f"{merged}{quantized}{files}")

    def fill_caches(self) -> None:
        """Encode images and captions once; the VAE and text encoders then leave the accelerator and the
        denoiser takes their place."""
        dataset, comps, device = self.config.dataset, self.components, self.placement.device
        comps.vae.to(device)
        if dataset.cache_latents:
            self.in_turn(self.cache_latents)
            self.offload(comps.vae)
        encoder_device = text_encoder_device(comps.text_encoders, device)  # with the VAE gone, if it could go
        if encoder_device != device:
            self.status("The text encoders do not fit in the free GPU memory: captions are encoded on the CPU "
                        "(slower, once; they are cached).")
        for encoder in comps.text_encoders:
            encoder.to(encoder_device)
        self.text_cached = False
        if dataset.cache_text and not self.config.lora.train_text_encoder:
            cached = self.in_turn(self.cache_text)
            self.text_cached = bool(cached)
            if not cached:
                self.status(f"Text embeddings are computed at each step: {cached.reason}")
            else:
                self.sample_prompts = encode_sampling_prompts(self.family, comps, self.sample_settings())
                for encoder in comps.text_encoders:
                    self.offload(encoder)
                self.release_text_encoders()
        free_accelerator_memory()

    def release_text_encoders(self) -> None:
        """Every caption and validation prompt is encoded: the text encoders leave system memory before the
        denoiser loads (they load again if a new prompt needs them). Fused LoRAs keep them, since a reload
        would lose the fusion."""
        if self.config.model.merge_loras or self.components.denoiser_loaded:
            return
        if self.components.release_text_encoders():
            gc.collect()
            self.status("Captions and validation prompts are cached: the text encoders leave memory until needed")

    def cache_latents(self) -> None:
        comps, device = self.components, self.placement.device

        def encode_images(pixels: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return self.family.encode_images(comps, pixels.to(device, comps.vae.dtype)).float().cpu()

        self.data.fill_latent_cache(encode_images, self.cache_dir(), self.model_key(),
                                    self.progress_status("Caching latents"))

    def cache_text(self):
        comps = self.components

        def encode_text(captions: list[str]) -> dict[str, torch.Tensor]:
            with torch.no_grad():
                embeds = self.family.encode_prompts(comps, captions)
            return {k: v.float().cpu() for k, v in embeds.items()}

        return self.data.fill_text_cache(encode_text, self.cache_dir(), self.model_key(),
                                         self.progress_status("Caching text embeddings"),
                                         planned=self.planned_captions())

    def planned_captions(self) -> list[str]:
        """Every caption the remaining steps will train with (tag shuffling and dropout applied): where the
        data cursor will go from the start or the resumed position."""
        progress, train = self.resume_progress, self.config.train
        cursor = DataCursor(self.data, int(progress.get("epoch", 0)), int(progress.get("batch_in_epoch", 0)))
        remaining = max(0, train.max_steps - int(progress.get("step", 0))) * train.gradient_accumulation
        return sorted({self.data.caption_for(sample, epoch)
                       for indices, epoch in cursor.upcoming(remaining) for sample in indices})

    def progress_status(self, label: str):
        """A progress callback for one unit of work at a time; it is also where a stop request lands."""

        def report(done: int, total: int) -> None:
            self.check_stop()
            self.status(f"{label} {done}/{total}", done, total)

        return report

    def offload(self, module) -> None:
        """Caches are full: the module leaves the accelerator until sampling needs it."""
        if self.placement.device.type != "cpu":
            module.to("cpu")

    def attach_lora(self) -> None:
        lora = self.config.lora
        self.lora_modules = self.family.trainable_modules(self.components, lora.train_text_encoder)
        targets = {
            key: (self.family.lora_targets(lora.targets, self.components.denoiser) if key == self.family.denoiser_key
                  else self.family.text_encoder_lora_targets)
            for key in self.lora_modules
        }
        torch.manual_seed(self.config.train.seed)  # LoRA initialisation and dropout draw from the global RNG
        inject_lora(self.lora_modules, targets, lora)
        if self.config.train.gradient_checkpointing:
            self.enable_gradient_checkpointing()
        self.block_swap = self.swap_blocks()
        for module in self.lora_modules.values():
            module.train()
        if self.config.train.compile_blocks:
            self.compile_blocks()

    def compile_blocks(self) -> None:
        """train.compile_blocks: torch.compile each repeated block in place (the first steps compile them)."""
        from lora_gui.engine.families.common import unwrap

        denoiser = unwrap(self.components.denoiser)
        if not getattr(denoiser, "_repeated_blocks", None):
            raise TrainingError(f"train.compile_blocks: the {self.family.label} denoiser has no repeated blocks to "
                                "compile.", "Set train.compile_blocks = false.")
        denoiser.compile_repeated_blocks(**COMPILE_OPTIONS)
        self.status("Compiling the repeated blocks with torch.compile during the first steps (a minute or more)")

    def swap_blocks(self) -> BlockSwap | None:
        """model.block_swap: the last blocks' frozen weights stay in system memory (see engine/block_swap.py)."""
        model, denoiser = self.config.model, self.components.denoiser
        try:
            swap = attach_block_swap(denoiser, model.block_swap, self.placement.device,
                                     self.config.train.gradient_checkpointing, model.quantize)
        except BlockSwapError as exc:
            raise TrainingError(str(exc), "Change the setting named above, or set model.block_swap = 0.") from None
        if swap is not None:
            stored = sum(t.numel() * t.element_size() for tensors in swap.stored.values() for t in tensors)
            self.status(f"Block swap: the frozen weights of the last {model.block_swap} of "
                        f"{len(repeated_blocks(denoiser))} blocks ({stored / 1024**3:.1f} GiB) stay in system "
                        "memory and visit the accelerator one block at a time")
        return swap

    def enable_gradient_checkpointing(self) -> None:
        for key, module in self.lora_modules.items():
            if key == self.family.denoiser_key:
                module.enable_gradient_checkpointing()
            else:  # transformers 5.24 renamed it; the old name goes in transformers 6
                enable = getattr(module, "activation_checkpointing_enable", None) or module.gradient_checkpointing_enable
                enable()

    def build_optimization(self) -> None:
        train, lora = self.config.train, self.config.lora
        params = lora_parameters(self.lora_modules)
        groups = [{"params": params[self.family.denoiser_key], "lr": train.learning_rate}]
        for key, group in params.items():
            if key != self.family.denoiser_key and group:
                groups.append({"params": group, "lr": lora.text_encoder_lr or train.learning_rate})
        self.trainable = [p for group in groups for p in group["params"]]
        self.optimizer = build_optimizer(groups, train)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, train)
        self.scaler = torch.amp.GradScaler("cuda") if self.placement.uses_grad_scaler else None
        self.objective = self.family.make_objective(self.components, train)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> str | None:
        """A resumable checkpoint, written by the main process (every process holds the same state)."""
        if not self.is_main:
            return None
        self.status(f"Saving checkpoint at step {self.step}")
        training_state = ckpt.make_training_state(
            self.optimizer, self.lr_scheduler, self.scaler,
            rng=ckpt.capture_rng_state({"noise": self.noise_generator}),
            lora=lora_state_dicts(self.lora_modules),
        )
        path = ckpt.save_checkpoint(
            self.output_dir,
            step=self.step,
            epoch=self.cursor.epoch,
            batch_in_epoch=self.cursor.batch_index,
            config=self.config,
            write_lora=lambda folder: self.write_lora(folder / f"{self.config.output.name}.safetensors"),
            training_state=training_state,
            processes=1 if self.dist is None else self.dist.world_size,
        )
        self.emit(CheckpointSaved(step=self.step, path=str(path)))
        return str(path)

    def restore(self, folder: Path, progress: dict, state: dict) -> None:
        load_lora_state(self.lora_modules, state["extra"]["lora"])
        ckpt.restore_training_state(state, self.optimizer, self.lr_scheduler, self.scaler)
        missing = ckpt.restore_rng_state(state["rng"], {"noise": self.noise_generator})
        if missing:
            self.status(f"Note: random state for {', '.join(missing)} could not be restored on this machine")
        self.step = int(progress["step"])
        self.cursor = DataCursor(self.data, int(progress["epoch"]), int(progress["batch_in_epoch"]))
        self.status(f"Resumed from {folder} at step {self.step}")

    def metadata(self) -> dict[str, str]:
        config = self.config
        return {
            "lora_gui.family": config.model.family,
            "lora_gui.base": config.model.base,
            "lora_gui.rank": str(config.lora.rank),
            "lora_gui.alpha": str(config.lora.alpha),
            "lora_gui.steps": str(self.step),
            "lora_gui.trigger_word": config.dataset.trigger_word,
            "lora_gui.config_hash": config.full_hash(),
            "lora_gui.targets": config.lora.targets,
            "lora_gui.resolution": str(config.dataset.resolution),
            "lora_gui.merged_loras": json.dumps(config.model.merge_loras),
            "ss_network_dim": str(config.lora.rank),
            "ss_network_alpha": str(config.lora.alpha),
        }

    def write_lora(self, kohya_path: Path) -> tuple[Path, Path]:
        diffusers_path = kohya_path.with_name(kohya_path.stem + ".diffusers.safetensors")
        save_lora_files(
            self.family.pipeline_class(), self.lora_modules, self.config.lora, kohya_path, diffusers_path,
            self.metadata(), single_file_prefix=self.family.single_file_lora_prefix,
            single_file_folds_alpha=self.family.single_file_folds_alpha,
        )
        return kohya_path, diffusers_path

    # ------------------------------------------------------------------ the loop
    def loop(self) -> TrainResult:
        self.batches = BatchPrefetcher(self.data, self.cursor, self.config.dataset.num_workers, self.dist)
        try:
            return self.run_steps()
        finally:
            self.batches.close()

    def run_steps(self) -> TrainResult:
        train, output = self.config.train, self.config.output
        self.status(f"Training {self.family.label} LoRA: {train.max_steps - self.step} steps to go")
        window: list[float] = []
        while self.step < train.max_steps:
            if self.controls.paused:
                self.pause()
            stop = self.controls.stop_requested
            if self.dist is not None:
                stop = self.dist.any(stop)  # every process stops at the same step
            if stop:
                return self.stop()
            self.controls.run_jobs(self.family, self.components)
            started = time.perf_counter()
            loss = self.optimizer_step()
            self.step += 1
            seconds = time.perf_counter() - started
            window = (window + [seconds])[-20:]
            self.report(loss, seconds, sum(window) / len(window))
            if output.save_every and self.step % output.save_every == 0 and self.step < train.max_steps:
                self.save_checkpoint()
            elif self.controls.take_save_request():
                self.save_checkpoint()
            every = self.config.sample.every
            if (every and self.step % every == 0 and self.step < train.max_steps) or self.controls.take_sample_request():
                try:
                    self.sample()
                except StopRequested:
                    return self.stop()
        return self.finish()

    def optimizer_step(self) -> float:
        """One optimizer step over ``gradient_accumulation`` micro-batches; the loss stays on the device until the
        step is done, so the host waits for the device once per step, not once per micro-batch."""
        train = self.config.train
        total, paths = None, []
        for _ in range(train.gradient_accumulation):
            batch = self.batches.next()
            paths += batch.paths
            loss = self.compute_loss(batch, self.batches.share) / train.gradient_accumulation
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            total = loss.detach() if total is None else total + loss.detach()
        value = total.item() if self.dist is None else self.dist.sum_gradients(self.trainable, total)
        if not math.isfinite(value):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(self.step + 1, paths)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if train.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.trainable, train.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return value

    def compute_loss(self, batch, share: Share | None = None) -> torch.Tensor:
        """The batch's mean loss; for a distributed run's ``share``, weighted by its part of the global batch."""
        comps, device = self.components, self.placement.device
        with autocast_context(self.placement):
            if batch.latents is not None:
                latents = batch.latents.to(device, comps.weight_dtype)
            else:
                with torch.no_grad():
                    latents = self.family.encode_images(comps, batch.pixels.to(device, comps.vae.dtype))
            if batch.embeds is not None:
                embeds = {k: v.to(device, comps.weight_dtype) for k, v in batch.embeds.items()}
            else:
                with torch.set_grad_enabled(self.config.lora.train_text_encoder):
                    embeds = self.family.encode_prompts(comps, list(batch.captions))
                embeds = {k: v.to(device) for k, v in embeds.items()}
            if share is None:
                noised = self.objective.add_noise(latents.float(), self.noise_generator)
            else:
                noised = noised_share(self.objective, latents.float(), self.noise_generator, share)
            with offloaded_activations(self.config.train.offload_activations, device):
                prediction = self.family.predict(
                    comps, noised.noisy.to(comps.weight_dtype), noised.timesteps, embeds, list(batch.conditioning),
                    self.config.train,
                )
                loss = self.objective.loss(prediction, noised)
                return loss if share is None else loss * share.weight

    def report(self, loss: float, seconds: float, average_seconds: float) -> None:
        lr = current_lr(self.optimizer)
        remaining = (self.config.train.max_steps - self.step) * average_seconds
        if self.metrics is not None:  # the main process's
            self.metrics.log(self.step, self.cursor.epoch, loss, lr, seconds)
        self.emit(Progress(
            step=self.step, max_steps=self.config.train.max_steps, epoch=self.cursor.epoch, loss=loss, lr=lr,
            sec_per_step=average_seconds, eta_seconds=remaining,
        ))

    def pause(self) -> None:
        self.status(f"Paused at step {self.step}")

        def while_paused() -> None:
            self.controls.run_jobs(self.family, self.components)
            if self.controls.take_save_request():
                self.save_checkpoint()
            if self.controls.take_sample_request():
                try:
                    self.sample()
                except StopRequested:
                    pass  # the loop stops (and saves) as soon as the pause ends

        self.controls.wait_while_paused(on_idle=while_paused)
        if not self.controls.stop_requested:
            self.status(f"Resumed at step {self.step}")

    def stop(self) -> TrainResult:
        checkpoint = self.save_checkpoint() if self.step > 0 else None
        self.status(f"Stopped at step {self.step}" + (f"; resume from {checkpoint}" if checkpoint else ""))
        self.emit(Stopped(step=self.step, checkpoint=checkpoint))
        return TrainResult(status="stopped", step=self.step, lora_path=None, checkpoint=checkpoint)

    def sample_settings(self) -> SampleSettings:
        return SampleSettings.from_config(self.config.sample, self.config.dataset.resolution,
                                          self.family.size_multiple)

    def sample(self) -> None:
        if not self.is_main:
            return
        settings = self.sample_settings()
        if not settings.prompts:
            self.status("No validation images: sample.prompts is empty (add prompts on the Config tab to see some)")
            return
        self.status(f"Rendering {len(settings.prompts)} validation image(s) at step {self.step}")
        images = render(self.family, self.components, settings, progress=self.progress_status("Sampling"),
                        encoded=self.sample_prompts, between_steps=self.check_stop)
        paths = save_images(images, self.output_dir / "samples" / f"step-{self.step:06d}")
        self.emit(SamplesReady(step=self.step, paths=tuple(paths), prompts=settings.prompts))
        self.status(f"Validation images of step {self.step} saved")  # replaces "Sampling n/n"

    def finish(self) -> TrainResult:
        if not self.is_main:
            return TrainResult(status="finished", step=self.step, lora_path=None, checkpoint=None)
        kohya_path, diffusers_path = self.write_lora(self.output_dir / f"{self.config.output.name}.safetensors")
        checkpoint = self.save_checkpoint()
        if self.sample_settings().prompts:
            try:
                self.sample()
            except StopRequested:
                self.status("Stopped before the final validation images; the LoRA and checkpoint are saved.")
        self.status(f"Finished: {kohya_path}")
        self.emit(Finished(step=self.step, lora_path=str(kohya_path), diffusers_path=str(diffusers_path)))
        return TrainResult(status="finished", step=self.step, lora_path=str(kohya_path), checkpoint=checkpoint)


# torch.compile's options for train.compile_blocks (its default backend, inductor, unless a test says otherwise).
COMPILE_OPTIONS: dict = {}

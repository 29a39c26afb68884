"""The generic training loop: ``train(config, emit, controls)``.

Read top to bottom: prepare the data (before any model is loaded, so a broken dataset fails
fast), load the family's model, fill the caches, attach LoRA, build the optimizer, resume if
asked, then step until done, checking the controls at every step boundary. The set-up steps live in
``train_setup.py``, the data position in ``data_cursor.py``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_gui.captioning import unload_all_captioners
from lora_gui.config import TrainingConfig, save_config
from lora_gui.engine import checkpoint as ckpt
from lora_gui.engine.activation_offload import offloaded_activations
from lora_gui.engine.block_swap import config_problem as block_swap_problem
from lora_gui.engine.data_cursor import BatchPrefetcher, DataCursor
from lora_gui.engine.devices import autocast_context, resolve_placement
from lora_gui.engine.distributed import Distributed, Share, noised_share
from lora_gui.engine.errors import NonFiniteLoss, StopRequested, TrainingError, explain
from lora_gui.engine.families.detect import with_detected_family
from lora_gui.engine.families.registry import get_family
from lora_gui.engine.lora import lora_state_dicts
from lora_gui.engine.lora_files import save_lora_files
from lora_gui.engine.metrics import MetricsLog
from lora_gui.engine.optim import current_lr
from lora_gui.engine.outputs import OutputLock, hold_output_folder, start_fresh
from lora_gui.engine.sampling import SampleSettings, render, save_images
from lora_gui.engine.train_setup import RunSetUp
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

PAUSE_POLL_S = 0.2


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


class TrainingRun(RunSetUp):
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
        self.resume_state: dict | None = None  # the checkpoint's training state when resuming
        self.step_samples = 0  # the samples of the last step (its effective batch)

    # ------------------------------------------------------------------ orchestration
    @property
    def processes(self) -> int:
        return 1 if self.dist is None else self.dist.world_size

    @property
    def sharded(self) -> bool:
        """Whether the denoiser is sharded over the processes (train.shard_model in a distributed run)."""
        return self.dist is not None and self.config.train.shard_model

    @property
    def is_main(self) -> bool:
        """Whether this process writes the files and reports (always, unless it is one of several)."""
        return self.dist is None or self.dist.is_main

    def execute(self, resume_from: str | Path | None) -> TrainResult:
        self.dist = Distributed.from_environment(resolve_placement(self.config).device)
        if not self.is_main:
            self.emit = ignore_events  # the main process reports for the run
        resume = self.load_resume(resume_from)
        if self.is_main:
            self.output_lock = hold_output_folder(self.output_dir)
            if resume is None:
                start_fresh(self.output_dir, self.config.output.name, self.overwrite)
        self.in_turn(self.build_builtin_base)  # and the folder is ready before another process reads its caches
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
        self.check_sharding()
        unload_all_captioners()  # a captioning model must not hold accelerator memory while training
        self.check_stop()
        self.status(f"Loading {self.config.model.base} on {self.placement.describe()}")
        self.load_model()
        self.check_stop()
        self.resume_progress, self.resume_state = resume if resume is not None else ({}, None)
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

    # ------------------------------------------------------------------ checkpoints
    def gathered_lora(self) -> dict | None:
        """A sharded run's LoRA weights gathered whole (every process joins in); None: read them from the modules."""
        from lora_gui.engine.sharding import full

        return full(lora_state_dicts(self.lora_modules)) if self.sharded else None

    def save_checkpoint(self) -> str | None:
        """A resumable checkpoint, written by the main process (every process holds the same state; a sharded
        run's processes first gather it together)."""
        if not self.is_main and not self.sharded:
            return None
        from lora_gui.engine.sharding import full

        lora = self.gathered_lora()
        optimizer_state = full(self.optimizer.state_dict()) if self.sharded else None
        if not self.is_main:
            return None
        self.status(f"Saving checkpoint at step {self.step}")
        training_state = ckpt.make_training_state(
            self.optimizer, self.lr_scheduler, self.scaler,
            rng=ckpt.capture_rng_state({"noise": self.noise_generator}),
            optimizer_state=optimizer_state,
            lora=lora if lora is not None else lora_state_dicts(self.lora_modules),
        )
        path = ckpt.save_checkpoint(
            self.output_dir,
            step=self.step,
            epoch=self.cursor.epoch,
            batch_in_epoch=self.cursor.batch_index,
            config=self.config,
            write_lora=lambda folder: self.write_lora(folder / f"{self.config.output.name}.safetensors", lora),
            training_state=training_state,
            data_position={"processes": self.processes, "global_batch": self.data.batch_size,
                           "samples_in_epoch": self.cursor.samples_in_epoch},
        )
        self.emit(CheckpointSaved(step=self.step, path=str(path)))
        return str(path)

    def restore(self, folder: Path, progress: dict, state: dict) -> None:
        """The optimizer, schedule, random state and data position (the LoRA is loaded as it is attached)."""
        ckpt.restore_training_state(state, self.optimizer, self.lr_scheduler, self.scaler)
        if self.sharded:
            from lora_gui.engine.sharding import shard_optimizer_state

            shard_optimizer_state(self.optimizer)
        missing = ckpt.restore_rng_state(state["rng"], {"noise": self.noise_generator})
        if missing:
            self.status(f"Note: random state for {', '.join(missing)} could not be restored on this machine")
        self.step = int(progress["step"])
        self.cursor = self.resumed_cursor(progress)
        self.status(f"Resumed from {folder} at step {self.step}")
        saved_processes, saved_batch = int(progress.get("processes", 1)), self.saved_global_batch(progress)
        if saved_batch != self.data.batch_size or saved_processes != self.processes:
            self.status(f"The checkpoint was trained by {saved_processes} process(es) with a global batch of "
                        f"{saved_batch}; this run has {self.processes} with {self.data.batch_size}. Epoch "
                        f"{self.cursor.epoch} goes on at sample {self.cursor.samples_in_epoch}, in batches of the "
                        "new size.")

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

    def write_lora(self, kohya_path: Path, states: dict | None = None) -> tuple[Path, Path]:
        diffusers_path = kohya_path.with_name(kohya_path.stem + ".diffusers.safetensors")
        save_lora_files(
            self.family.pipeline_class(), self.lora_modules, self.config.lora, kohya_path, diffusers_path,
            self.metadata(), single_file_prefix=self.family.single_file_lora_prefix,
            single_file_folds_alpha=self.family.single_file_folds_alpha, states=states,
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
            stop, paused = self.requests()
            if paused:
                self.pause()
                stop = self.requests()[0]
            if stop:
                return self.stop()
            self.controls.run_jobs(self.family, self.components)
            started = time.perf_counter()
            loss = self.optimizer_step()
            self.step += 1
            seconds = time.perf_counter() - started
            window = (window + [seconds])[-20:]
            self.report(loss, seconds, sum(window) / len(window))
            save_now, sample_now = self.asked_now()
            if (output.save_every and self.step % output.save_every == 0 and self.step < train.max_steps) or save_now:
                self.save_checkpoint()
            every = self.config.sample.every
            if (every and self.step % every == 0 and self.step < train.max_steps) or sample_now:
                try:
                    self.sample()
                except StopRequested:
                    return self.stop()
        return self.finish()

    def optimizer_step(self) -> float:
        """One optimizer step over ``gradient_accumulation`` micro-batches; the loss stays on the device until the
        step is done, so the host waits for the device once per step, not once per micro-batch."""
        train = self.config.train
        total, paths, self.step_samples = None, [], 0
        for _ in range(train.gradient_accumulation):
            batch = self.batches.next()
            paths += batch.paths
            self.step_samples += len(batch.paths) if self.batches.share is None else self.batches.share.count
            loss = self.compute_loss(batch, self.batches.share) / train.gradient_accumulation
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            total = loss.detach() if total is None else total + loss.detach()
        if self.dist is None:
            value = total.item()
        else:  # a sharded run's gradients were summed as the backward pass went
            from lora_gui.engine.sharding import is_sharded

            value = self.dist.sum_gradients([p for p in self.trainable if not is_sharded(p)], total)
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
            self.metrics.log(self.step, self.cursor.epoch, loss, lr, seconds, self.step_samples)
        self.emit(Progress(
            step=self.step, max_steps=self.config.train.max_steps, epoch=self.cursor.epoch, loss=loss, lr=lr,
            sec_per_step=average_seconds, eta_seconds=remaining,
        ))

    def asked_now(self) -> tuple[bool, bool]:
        """(save, sample) as asked of any process since the last step (Save now, Sample now)."""
        save, sample = self.controls.take_save_request(), self.controls.take_sample_request()
        return (save, sample) if self.dist is None else self.dist.any(save, sample)

    def requests(self) -> tuple[bool, bool]:
        """(stop, pause) as asked of any process: every process stops or pauses at the same step."""
        stop, paused = self.controls.stop_requested, self.controls.paused and not self.controls.stop_requested
        return (stop, paused) if self.dist is None else self.dist.any(stop, paused)

    def pause(self) -> None:
        self.status(f"Paused at step {self.step}")

        def while_paused() -> None:
            self.controls.run_jobs(self.family, self.components)
            save, sample = self.asked_now()
            if save:
                self.save_checkpoint()
            if sample:
                try:
                    self.sample()
                except StopRequested:
                    pass  # the loop stops (and saves) as soon as the pause ends

        if self.dist is None:
            self.controls.wait_while_paused(on_idle=while_paused)
        else:  # the processes ask each other whether the pause goes on (only the main one is asked to pause)
            while True:
                while_paused()
                if not self.requests()[1]:
                    break
                time.sleep(PAUSE_POLL_S)
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
        """Validation images, rendered by the main process (by every process of a sharded run, which all run
        the sharded model together; a stop then waits for the images)."""
        if not self.is_main and not self.sharded:
            return
        settings = self.sample_settings()
        if not settings.prompts:
            self.status("No validation images: sample.prompts is empty (add prompts on the Config tab to see some)")
            return
        self.status(f"Rendering {len(settings.prompts)} validation image(s) at step {self.step}")
        images = render(self.family, self.components, settings,
                        progress=self.progress_status("Sampling", stoppable=not self.sharded),
                        encoded=self.sample_prompts, between_steps=None if self.sharded else self.check_stop)
        if not self.is_main:
            return
        paths = save_images(images, self.output_dir / "samples" / f"step-{self.step:06d}")
        self.emit(SamplesReady(step=self.step, paths=tuple(paths), prompts=settings.prompts))
        self.status(f"Validation images of step {self.step} saved")  # replaces "Sampling n/n"

    def finish(self) -> TrainResult:
        if not self.is_main and not self.sharded:
            return TrainResult(status="finished", step=self.step, lora_path=None, checkpoint=None)
        lora = self.gathered_lora()
        if self.is_main:
            kohya_path, diffusers_path = self.write_lora(self.output_dir / f"{self.config.output.name}.safetensors",
                                                         lora)
        checkpoint = self.save_checkpoint()
        if self.sample_settings().prompts:
            try:
                self.sample()
            except StopRequested:
                self.status("Stopped before the final validation images; the LoRA and checkpoint are saved.")
        if not self.is_main:
            return TrainResult(status="finished", step=self.step, lora_path=None, checkpoint=None)
        self.status(f"Finished: {kohya_path}")
        self.emit(Finished(step=self.step, lora_path=str(kohya_path), diffusers_path=str(diffusers_path)))
        return TrainResult(status="finished", step=self.step, lora_path=str(kohya_path), checkpoint=checkpoint)

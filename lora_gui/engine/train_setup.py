"""Everything a training run does before its first step: data, models, caches, LoRA, optimizer."""

from __future__ import annotations

import gc
from pathlib import Path

import torch

from lora_gui.engine import checkpoint as ckpt
from lora_gui.engine.block_swap import BlockSwap, BlockSwapError, attach_block_swap, repeated_blocks
from lora_gui.engine.data_cursor import DataCursor, cursor_at
from lora_gui.engine.devices import free_accelerator_memory, text_encoder_device
from lora_gui.engine.errors import TrainingError
from lora_gui.engine.lora import inject_lora, load_lora_state, lora_parameters
from lora_gui.engine.merge import merge_loras
from lora_gui.engine.optim import build_lr_scheduler, build_optimizer
from lora_gui.engine.quantize import quantize_denoiser, quantize_text_encoders_on_cpu
from lora_gui.engine.sampling import encode_sampling_prompts


class RunSetUp:
    """The set-up steps of ``TrainingRun`` (engine/train.py), in the order it calls them."""

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
        processes = self.processes
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

    def build_builtin_base(self) -> None:
        """A built-in model is built on first use; in a distributed run by the main process, before the others
        read it (transformers saves a model on the first process only, so the others would build it broken)."""
        from lora_gui.engine.families.builtin import ensure_builtin, is_builtin

        model = self.config.model
        if is_builtin(model.base):
            try:
                ensure_builtin(model.base, model.cache_dir)
            except ValueError:
                pass  # an unknown name: loading the model says so

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
        if self.config.model.block_swap <= 0 and not self.sharded:  # with block swap or sharding the denoiser
            denoiser.to(self.placement.device)                           # moves once its LoRA is attached

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
        cursor = self.resumed_cursor(progress) if progress else DataCursor(self.data)
        remaining = max(0, train.max_steps - int(progress.get("step", 0))) * train.gradient_accumulation
        return sorted({self.data.caption_for(sample, epoch)
                       for indices, epoch in cursor.upcoming(remaining) for sample in indices})

    def resumed_cursor(self, progress: dict) -> DataCursor:
        return cursor_at(self.data, progress, self.saved_global_batch(progress))

    def saved_global_batch(self, progress: dict) -> int:
        """A checkpoint's global batch (older checkpoints record only their number of processes)."""
        return int(progress.get("global_batch", self.config.train.batch_size * int(progress.get("processes", 1))))

    def progress_status(self, label: str, stoppable: bool = True):
        """A progress callback for one unit of work at a time; it is also where a stop request lands (unless
        not ``stoppable``: work that every process of a sharded run must finish together)."""

        def report(done: int, total: int) -> None:
            if stoppable:
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
        if self.resume_state is not None:  # the checkpoint's LoRA, before any sharding
            load_lora_state(self.lora_modules, self.resume_state["extra"]["lora"])
        if self.config.train.gradient_checkpointing:
            self.enable_gradient_checkpointing()
        if self.sharded:
            self.shard_denoiser()
        self.block_swap = self.swap_blocks()
        for module in self.lora_modules.values():
            module.train()
        if self.config.train.compile_blocks:
            self.compile_blocks()

    def shard_denoiser(self) -> None:
        from lora_gui.engine.families.common import unwrap
        from lora_gui.engine.sharding import shard_denoiser

        units = shard_denoiser(unwrap(self.components.denoiser), self.placement.device, self.processes)
        self.status(f"train.shard_model: the {self.family.denoiser_key} is sharded over {self.processes} processes "
                    f"in {units} units (FSDP2); each holds 1/{self.processes} of its weights")

    def check_sharding(self) -> None:
        """train.shard_model: refused with what it cannot go with; a note when there is nothing to shard over."""
        from lora_gui.engine.sharding import config_problem

        config = self.config
        if not config.train.shard_model:
            return
        if self.dist is None:
            self.status("train.shard_model: this run has one process, so the model is not sharded")
            return
        problem = config_problem(config, self.placement.uses_grad_scaler)
        if problem:
            raise TrainingError(problem, "Change the settings named above, or set train.shard_model = false.")

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



# torch.compile's options for train.compile_blocks (its default backend, inductor, unless a test says otherwise).
COMPILE_OPTIONS: dict = {}

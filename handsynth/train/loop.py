"""The training loop: accelerate, checkpoints that resume exactly, validation images, a loss log.

The output folder (``--out``)::

    <out>/config.json, diffusion_pytorch_model.safetensors   the guidance module (save_pretrained), rewritten
                                   at every checkpoint and at the end: a generate recipe's model.guidance
    <out>/manifest.json            stage "train": command, fingerprint, step reached, status
    <out>/checkpoints/step-NNNNNNN/  guidance/ (safetensors), training_state.pt (optimiser, LR schedule,
                                   loss scaler), state.json (step, samples drawn, sha256 of both; written last)
    <out>/validation/step-NNNNNNN/<key>.<fmt>, <key>-local.<fmt>   fixed prompts, meshes and seeds
    <out>/log.jsonl                one line per ``log_every`` steps: step, loss, loss_global, loss_local, lr, tas_loss
    <out>/tensorboard/             the same scalars, when tensorboard is installed

Exact resume: every random draw of a step comes from the generators of its sample positions
(:func:`handsynth.train.data.sample_generator`) and the data order is a function of the position, so the
only state is the step, the model, the optimiser, the LR schedule and (fp16) the loss scaler - all in the
checkpoint. ``training_state.pt`` is read with ``torch.load(weights_only=True)`` (tensors and plain values
only, never code). A rerun of the same command continues from the newest complete checkpoint; a run
interrupted between checkpoints redoes the steps since the last one, with the same result.

Multi-GPU: run the same command under ``accelerate launch``; each optimiser step then draws
batch_size x gradient_accumulation x processes samples. Only the main process writes files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from handsynth import io, rundir
from handsynth.console import console, progress
from handsynth.errors import InputError, MissingResourceError

STAGE = "train"
SUBDIRS = ("checkpoints", "validation")
WEIGHTS = "diffusion_pytorch_model.safetensors"
STATE, TRAINING_STATE = "state.json", "training_state.pt"
# Recipe fields that do not change the trained weights (left out of the fingerprint).
NOT_FINGERPRINTED = {"output", "inputs"}
NOT_FINGERPRINTED_TRAIN = {"checkpoint_every", "keep_checkpoints", "validate_every", "validation_count", "log_every"}


@dataclass
class Summary:
    out: Path
    start_step: int
    steps: int
    elapsed_s: float
    last_loss: float | None


def fingerprint(recipe, inputs_sha256: str, model: dict[str, Any]) -> dict[str, str]:
    """What decides the weights: the recipe (less output, inputs, bookkeeping), the inputs, the models."""
    settings = recipe.model_dump(mode="json", exclude=NOT_FINGERPRINTED)
    for name in NOT_FINGERPRINTED_TRAIN:
        settings["train"].pop(name, None)
    digest = lambda obj: hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()  # noqa: E731
    return {"recipe": digest(settings), "inputs": inputs_sha256, "model": digest(model)}


def step_dir(out: Path, step: int) -> Path:
    return Path(out) / "checkpoints" / f"step-{step:07d}"


def latest_checkpoint(out: Path) -> tuple[int, Path] | None:
    """The newest complete checkpoint (state.json parses and both files match its hashes), or None."""
    folder = Path(out) / "checkpoints"
    if not folder.is_dir():
        return None
    for path in sorted(folder.glob("step-*"), reverse=True):
        try:
            state = json.loads((path / STATE).read_text(encoding="utf-8"))
            files = state["sha256"]
            if all(rundir.intact(path / rel, digest) for rel, digest in files.items()):
                return int(state["step"]), path
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def _files_sha256(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): io.sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def write_weights(module, out: Path) -> None:
    """The guidance module's config.json and safetensors into ``out``, each replaced atomically."""
    tmp = Path(out) / f".weights.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    module.save_pretrained(tmp, safe_serialization=True)
    for name in (WEIGHTS, "config.json"):
        os.replace(tmp / name, Path(out) / name)
    shutil.rmtree(tmp, ignore_errors=True)


class Trainer:
    """Holds the models, optimiser and data of one run; :meth:`run` trains to ``steps``."""

    def __init__(self, recipe, data, pipe, controlnet, out: Path, *, device: str, precision: str):
        import torch
        from accelerate import Accelerator
        from diffusers.optimization import get_scheduler

        from handsynth.attentionhand.tas import AttentionStore, TASConfig
        from handsynth.train.step import Models, alphas_cumprod

        self.recipe, self.data, self.pipe, self.out = recipe, data, pipe, Path(out)
        settings = recipe.train
        mixed = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}[precision]
        self.accelerator = Accelerator(mixed_precision=mixed, cpu=device.startswith("cpu"),
                                       gradient_accumulation_steps=settings.gradient_accumulation)
        self.precision = precision
        self.tas = TASConfig(**recipe.tas.model_dump())
        controlnet.to(self.accelerator.device)
        if controlnet.dtype != torch.float32:         # the trained module stays float32 (mixed precision)
            controlnet.float()
        controlnet.train()
        controlnet.requires_grad_(True)
        if settings.gradient_checkpointing:
            controlnet.enable_gradient_checkpointing()
            pipe.unet.enable_gradient_checkpointing()
        self.optimizer = make_optimizer(settings, controlnet.parameters())
        self.lr_scheduler = get_scheduler(settings.lr_schedule, self.optimizer, num_warmup_steps=settings.warmup_steps,
                                          num_training_steps=settings.steps)
        self.controlnet, self.optimizer = self.accelerator.prepare(controlnet, self.optimizer)
        self.models = Models(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
                             controlnet=self.controlnet, alphas_cumprod=alphas_cumprod(pipe.scheduler.config),
                             weight_dtype=pipe.unet.dtype, store=AttentionStore(self.tas.attention_res))
        self.step = 0

    @property
    def module(self):
        """The trained guidance module itself (unwrapped from accelerate's wrappers)."""
        return self.accelerator.unwrap_model(self.controlnet)

    # -- checkpoints --

    def save_checkpoint(self) -> Path:
        import torch

        final = step_dir(self.out, self.step)
        tmp = final.parent / f".{final.name}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.module.save_pretrained(tmp / "guidance", safe_serialization=True)
        scaler = self.accelerator.scaler
        torch.save({"optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None}, tmp / TRAINING_STATE)
        state = {"step": self.step, "samples_drawn": self.step * self.samples_per_step,
                 "sha256": _files_sha256(tmp)}
        io.write_json_atomic(tmp / STATE, state)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_weights(self.module, self.out)
        kept = sorted((self.out / "checkpoints").glob("step-*"))
        for old in kept[:-self.recipe.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load_checkpoint(self, step: int, path: Path) -> None:
        import torch
        from safetensors.torch import load_file

        weights = load_file(str(path / "guidance" / WEIGHTS))
        self.module.load_state_dict(weights, strict=True)
        try:
            state = torch.load(path / TRAINING_STATE, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - an unreadable checkpoint: say which and how to go on
            raise InputError(f"the checkpoint's training state cannot be read ({type(exc).__name__}: {exc})",
                             where=path / TRAINING_STATE,
                             fix="delete that checkpoint folder to resume from the one before it") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if state.get("scaler") is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.step = step

    # -- steps --

    @property
    def samples_per_step(self) -> int:
        return self.recipe.batch_size * self.recipe.train.gradient_accumulation * self.accelerator.num_processes

    def positions(self, step: int, micro: int) -> list[int]:
        """The sample positions of this process's micro-batch ``micro`` of optimiser step ``step``."""
        b, acc = self.recipe.batch_size, self.accelerator
        first = ((step * self.recipe.train.gradient_accumulation + micro) * acc.num_processes
                 + acc.process_index) * b
        return list(range(first, first + b))

    def train_step(self) -> dict[str, float]:
        """One optimiser step (gradient accumulation included); returns the mean losses of its micro-batches."""
        from handsynth.attentionhand.tas import tas_processors

        settings = self.recipe.train
        sums: dict[str, float] = {}
        with tas_processors(self.models.unet, self.models.store):
            self._micro_batches(settings, sums)
        self.lr_scheduler.step()
        self.step += 1
        out = {k: v / settings.gradient_accumulation for k, v in sums.items()}
        out["lr"] = float(self.lr_scheduler.get_last_lr()[0])
        return out

    def _micro_batches(self, settings, sums: dict[str, float]) -> None:
        import torch

        from handsynth.train.data import sample_generator
        from handsynth.train.step import training_loss

        acc = self.accelerator
        for micro in range(settings.gradient_accumulation):
            positions = self.positions(self.step, micro)
            samples = [self.data[p] for p in positions]
            generators = [sample_generator(self.recipe.seed, p, acc.device) for p in positions]
            with acc.accumulate(self.controlnet):
                with acc.autocast():
                    result = training_loss(self.models, samples, generators, self.tas, target=settings.target,
                                           lambda_global=settings.lambda_global,
                                           lambda_local=settings.lambda_local, mixed_fp16=self.precision == "fp16")
                acc.backward(result.loss)
                if acc.sync_gradients and settings.max_grad_norm > 0:
                    acc.clip_grad_norm_(self.controlnet.parameters(), settings.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            for name, value in (("loss", result.loss), ("loss_global", result.loss_global),
                                ("loss_local", result.loss_local), ("tas_loss", result.tas_loss.mean())):
                if value is not None:
                    sums[name] = sums.get(name, 0.0) + float(torch.as_tensor(value).detach().float().mean())

    # -- validation --

    def validate(self) -> Path:
        """Images for the first ``validation_count`` frames (their first prompts, fixed seeds) at this step."""
        import torch

        from handsynth.attentionhand.loading import make_scheduler
        from handsynth.attentionhand.pipeline import AttentionHandPipeline
        from handsynth.generate.plan import noise_seed
        from handsynth.generate.runner import encode_image
        from handsynth.prompts.spans import hand_token_indices

        recipe, pipe = self.recipe, self.pipe
        module = self.module
        was_training = module.training
        module.eval()
        sampler = recipe.sampler
        val = AttentionHandPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                    unet=pipe.unet, controlnet=module,
                                    scheduler=make_scheduler(sampler.scheduler, pipe.scheduler.config))
        folder = self.out / "validation" / f"step-{self.step:07d}"
        count = min(recipe.train.validation_count, len(self.data))
        device = self.accelerator.device
        with self.accelerator.autocast():
            for index in range(count):
                frame = self.data.frames[index]
                rgb, mesh, local_rgb, local_mesh = self.data.images(frame)
                prompt = self.data.prompt(frame, index)
                tokens = hand_token_indices(pipe.tokenizer, prompt.text, prompt.hand_spans)
                seeds = [noise_seed(recipe.seed, index), noise_seed(recipe.seed, index, 2)]
                result = val(prompt=[prompt.text], mesh_image=[mesh], local_mesh_image=[local_mesh],
                             hand_token_indices=[tokens],
                             generator=[torch.Generator(device).manual_seed(seeds[0])],
                             local_generator=[torch.Generator(device).manual_seed(seeds[1])],
                             num_inference_steps=sampler.steps, guidance_scale=sampler.guidance_scale,
                             controlnet_conditioning_scale=sampler.control_scale, eta=sampler.eta,
                             negative_prompt=sampler.negative_prompt, tas=self.tas,
                             width=recipe.image.size, height=recipe.image.size, output_type="pil")
                ext = recipe.image.format
                for name, image in ((frame.key, result.images[0]), (f"{frame.key}-local", result.local_images[0])):
                    io.write_bytes_atomic(folder / f"{name}.{ext}", encode_image(image, ext, recipe.image.quality))
        module.train(was_training)
        return folder


def check_optimizer(settings) -> None:
    """MissingResourceError now (before models load) when ``optimizer: adamw-8bit`` lacks bitsandbytes."""
    if settings.optimizer != "adamw-8bit":
        return
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise MissingResourceError("train.optimizer is adamw-8bit, but bitsandbytes is not installed",
                                   where="train.optimizer",
                                   fix="pip install bitsandbytes (CUDA GPUs), or use optimizer: adamw")


def make_optimizer(settings, parameters):
    """AdamW (torch), or bitsandbytes' 8-bit AdamW when ``optimizer: adamw-8bit`` and it is installed."""
    import torch

    if settings.optimizer == "adamw-8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise MissingResourceError("train.optimizer is adamw-8bit, but bitsandbytes is not installed",
                                       where="train.optimizer",
                                       fix="pip install bitsandbytes (CUDA GPUs), or use optimizer: adamw") from None
        return bnb.optim.AdamW8bit(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    return torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay)


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


def run(trainer: Trainer, run_dir: rundir.RunDir, *, steps: int, manifest: dict[str, Any]) -> Summary:
    """Train to ``steps`` optimiser steps in ``run_dir`` (resuming from its newest complete checkpoint)."""
    import torch

    started = time.perf_counter()
    settings, out = trainer.recipe.train, trainer.out
    main_process = trainer.accelerator.is_main_process
    opened = run_dir.open(**manifest) if main_process else _Follower()   # only the main process owns the folder
    trainer.accelerator.wait_for_everyone()
    with opened as rd:
        found = latest_checkpoint(out) if rd.resuming else None
        if found is not None:
            trainer.load_checkpoint(*found)
            console.print(f"[dim]resuming from {found[1]} (step {found[0]})[/dim]")
        start = trainer.step
        if main_process:
            _trim_log(out / "log.jsonl", start)
        writer = _tensorboard(out) if main_process else None
        last = None
        with progress("steps") as bar:
            task = bar.add_task("train", total=steps, completed=min(start, steps))
            while trainer.step < steps:
                logs = trainer.train_step()
                last = logs["loss"]
                if not math.isfinite(last):
                    raise InputError(f"the loss became {last} at step {trainer.step}", where=out / "log.jsonl",
                                     fix="lower train.learning_rate, or use model.precision fp32 or bf16")
                bar.update(task, completed=trainer.step, description=f"train loss {last:.4f}")
                if main_process and (trainer.step % settings.log_every == 0 or trainer.step == steps):
                    with open(out / "log.jsonl", "a", encoding="utf-8") as log:
                        log.write(json.dumps({"step": trainer.step, **logs}, sort_keys=True) + "\n")
                    if writer is not None:
                        for name, value in logs.items():
                            writer.add_scalar(f"train/{name}", value, trainer.step)
                if trainer.step % settings.checkpoint_every == 0 or trainer.step == steps:
                    trainer.accelerator.wait_for_everyone()
                    if main_process:
                        trainer.save_checkpoint()
                        rd.update(step=trainer.step)
                if settings.validate_every and trainer.step % settings.validate_every == 0 and main_process:
                    with torch.no_grad():
                        trainer.validate()
        if writer is not None:
            writer.close()
        if trainer.step == start and main_process and found is None:
            write_weights(trainer.module, out)
        elapsed = time.perf_counter() - started
        rd.finish(step=trainer.step, steps_this_run=trainer.step - start, elapsed_s=round(elapsed, 3))
    return Summary(out=out, start_step=start, steps=trainer.step, elapsed_s=elapsed, last_loss=last)


class _Follower:
    """What a non-main process holds instead of the run directory: it reads checkpoints, writes nothing."""

    resuming = True           # the main process decided; a new folder simply has no checkpoint yet

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def update(self, **fields: Any) -> None:
        pass

    def finish(self, **fields: Any) -> None:
        pass


def _trim_log(path: Path, step: int) -> None:
    """Drop log lines past ``step`` (left by a run interrupted after its last checkpoint)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines()
             if line.strip() and json.loads(line).get("step", 0) <= step]
    io.write_bytes_atomic(path, "".join(line + "\n" for line in lines).encode())

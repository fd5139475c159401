"""``handsynth train``: fit the guidance module on labelled real images (see handsynth.train.loop)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from handsynth.console import console, print_defaults, stdout


def train(
    recipe: Annotated[Path, typer.Option("--recipe", "-r", help="Training recipe YAML, e.g. "
                                         "recipes/train-interhand.yaml.", show_default=False)],
    run: Annotated[Optional[Path], typer.Option(
        "--run", help="Render run of labelled real images (its labels' image_path must exist); overrides the "
                      "recipe's inputs (default: the recipe's inputs, else the newest render run under ./runs/).")] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Folder for the trained guidance module, its checkpoints, validation images and log "
                      "(default: the recipe's output, else models/<recipe name>). Rerunning the same command "
                      "resumes from its newest checkpoint.")] = None,
    steps: Annotated[Optional[int], typer.Option(
        "--steps", min=1, help="Train up to this optimiser step (default: the recipe's train.steps, which also "
                               "sets the LR schedule's length).")] = None,
    device: Annotated[Optional[str], typer.Option(
        "--device", help="cuda or cpu (default: cuda when available; cpu is for tiny/test models only). Several "
                         "GPUs: run this command under `accelerate launch`.")] = None,
) -> None:
    """Train the guidance module (AttentionHand: global + local branch, TAS, one shared module) resumably.

    Writes the module into --out as a folder that a generate recipe's model.guidance loads directly.
    """
    from handsynth.attentionhand.guidance import build_guidance_module
    from handsynth.attentionhand.loading import load_guidance_module, load_pipeline, resolve_guidance
    from handsynth.attentionhand.tas import cross_attention_resolutions
    from handsynth.generate.command import _device
    from handsynth.generate.driver import guidance_files
    from handsynth.prompts.recipe import check_tas_resolution
    from handsynth.train import loop
    from handsynth.train.data import TrainData, read_frames
    from handsynth.train.recipe import load_train_recipe

    loaded = load_train_recipe(recipe)
    loop.check_optimizer(loaded.train)
    guidance = resolve_guidance(loaded.model.guidance)
    defaults: dict[str, object] = {}
    inputs, frames, missing, note = read_frames(loaded, run)
    if note:
        defaults["--run"] = note
    if missing:
        console.print(f"[yellow]warning:[/yellow] {missing} input frame(s) have no source RGB image and are left "
                      f"out; training on {len(frames)}", soft_wrap=True)
    if out is None:
        out = loaded.output if "output" not in loaded.defaults else Path("models") / loaded.path.stem
        defaults["--out"] = out
    if steps is None:
        steps = loaded.train.steps
        defaults["--steps"] = f"{steps} (recipe train.steps)"
    device = _device(device)
    precision = loaded.model.precision
    if device.startswith("cpu") and precision != "fp32":
        console.print(f"[dim]note: model.precision {precision} -> fp32 on the CPU[/dim]")
        precision = "fp32"
    print_defaults(defaults)

    model = {"base": loaded.model.base, "guidance": loaded.model.guidance,
             "guidance_files_sha256": guidance_files(loaded.model.guidance), "precision": precision}
    inputs_sha = inputs.sha256 if inputs is not None else _file_sha(loaded.inputs.modalities)
    prints = loop.fingerprint(loaded, inputs_sha, model)
    run_dir = loop.rundir.RunDir(out, loop.STAGE, fingerprint=prints, subdirs=loop.SUBDIRS, what="training run")
    run_dir.check()                                # before the slow model load
    dtype = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}[precision]
    pipe = load_pipeline(loaded.model.base, "none", dtype=dtype, device=device, scheduler=loaded.sampler.scheduler)
    check_tas_resolution(loaded, pipe.vae_scale_factor, cross_attention_resolutions(
        pipe.unet, loaded.image.size // pipe.vae_scale_factor))
    if guidance.kind == "none":
        import torch

        with torch.random.fork_rng(devices=[]):       # the hint encoder's random init: a function of the seed
            torch.manual_seed(loaded.seed)
            controlnet = build_guidance_module(pipe.unet, pipe.vae_scale_factor)
    else:
        controlnet = load_guidance_module(loaded.model.guidance, base=loaded.model.base)
    console.print(f"[dim]training {sum(p.numel() for p in controlnet.parameters()) / 1e6:.1f} M parameters from "
                  f"{guidance.describe() if guidance.kind != 'none' else 'a copy of the base UNet'} on "
                  f"{len(frames)} frame(s)[/dim]", soft_wrap=True)
    data = TrainData(frames, loaded, pipe.tokenizer)
    trainer = loop.Trainer(loaded, data, pipe, controlnet, Path(out), device=device, precision=precision)
    manifest = {"recipe": {"path": str(loaded.path.resolve()), "resolved": loaded.model_dump(mode="json")},
                "inputs": inputs.record if inputs is not None else {"modalities": str(loaded.inputs.modalities)},
                "frames": len(frames), "frames_left_out": missing, "model": model, "device": device,
                "target_steps": steps, "samples_per_step": trainer.samples_per_step}
    summary = loop.run(trainer, run_dir, steps=steps, manifest=manifest)
    done = summary.steps - summary.start_step
    loss = f", last loss {summary.last_loss:.4f}" if summary.last_loss is not None else ""
    stdout.print(f"trained {done} step(s) (step {summary.start_step} -> {summary.steps}){loss} into {summary.out} "
                 f"in {summary.elapsed_s:.1f} s; use it as model.guidance: {summary.out}")


def _file_sha(path: Path) -> str:
    from handsynth import io

    return io.sha256_file(path)

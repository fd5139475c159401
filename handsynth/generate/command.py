"""``handsynth generate``: a recipe's prompts + mesh images -> generated images, on this machine's GPUs or a
Ray cluster (the work below the command line: :func:`handsynth.generate.driver.generate_run`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from handsynth.console import console, print_defaults, stdout
from handsynth.errors import InputError

# Recipe defaults the command prints itself (as --run / --out).
_SHOWN_BY_COMMAND = {"inputs", "output", "batch_size"}


def _device(requested: Optional[str]) -> str:
    import torch

    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise InputError(f"--device '{requested}' is not a device name", where="--device",
                         fix="use cuda, cuda:N or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device asks for cuda, but torch sees no CUDA GPU on this machine", where="--device",
                         fix="run on a machine with an NVIDIA GPU and a CUDA build of torch, or pass --device cpu "
                             "(tiny/test models only)")
    return requested


def generate(
    recipe: Annotated[Path, typer.Option("--recipe", "-r", help="Recipe YAML file, e.g. recipes/outdoor.yaml.",
                                         show_default=False)],
    count: Annotated[Optional[int], typer.Option(
        "--count", "-n", min=1, help="Number of samples (default: one per input frame). Sample i uses frame "
                                     "i mod n_frames as variant i div n_frames. A sample is one image, or two "
                                     "(global + local hand crop) when the recipe has `branches: [global, "
                                     "local]`.")] = None,
    start: Annotated[int, typer.Option("--start", min=0, help="First sample index (to split a run).")] = 0,
    run: Annotated[Optional[Path], typer.Option(
        "--run", help="Render run directory to take mesh images from; overrides the recipe's inputs (default: "
                      "the recipe's inputs, else the newest render run under ./runs/).")] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Run directory to write (default: the recipe's output, else runs/<recipe name>-gen). "
                      "Rerunning into it resumes: finished samples are kept.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(
        "--batch-size", min=1, help="Images per diffusion batch (default: the recipe's batch_size). Frames, "
                                    "prompts and seeds do not depend on it; pixels may differ by float rounding "
                                    "across batch sizes. Batches lie on a fixed grid from --start, so the same "
                                    "--batch-size gives the same bytes, resumed or not.")] = None,
    device: Annotated[Optional[str], typer.Option(
        "--device", help="torch device (default: cuda when available, else cpu - for tiny/test models "
                         "only).")] = None,
    workers: Annotated[Optional[int], typer.Option(
        "--workers", min=1, help="Worker processes (Ray: actors), each loading the model once and claiming "
                                 "batches of the grid (default: one per visible GPU with a bare --device cuda, "
                                 "else 1). The files do not depend on it.")] = None,
    backend: Annotated[str, typer.Option(
        "--backend", help="local: worker processes on this machine; ray: Ray Data actors on a Ray cluster "
                          "(pip install 'handsynth[ray]'; --out must be on a filesystem every node sees).")] = "local",
    address: Annotated[Optional[str], typer.Option(
        "--address", help="Ray cluster to join (--backend ray), e.g. auto or ray://head:10001 (default: a new "
                          "local Ray instance).")] = None,
) -> None:
    """Generate images for sample indices START..START+COUNT-1 of a recipe, resumably.

    Each sample's frame, prompt and noise seed are a pure function of the recipe and its index, so
    runs can be split (--start/--count), resumed and audited. Writes
    images/<key>, local/<key> (hand crops, when the recipe's branches include local) and
    samples/<key>.json (written last) plus manifest.json into --out.
    """
    from handsynth.attentionhand.loading import resolve_guidance
    from handsynth.generate.driver import generate_run
    from handsynth.generate.plan import find_inputs
    from handsynth.prompts.recipe import load_recipe

    if address is not None and backend != "ray":
        raise InputError("--address names a Ray cluster, which only --backend ray uses", where="--address",
                         fix="add --backend ray, or drop --address")
    loaded = load_recipe(recipe)
    guidance = resolve_guidance(loaded.model.guidance)      # a wrong guidance path fails before anything runs
    defaults: dict[str, object] = {}
    inputs, note = find_inputs(loaded, run)
    if note:
        defaults["--run"] = note
    if inputs.kind == "run" and loaded.prompts is None:
        raise InputError("the recipe has no 'prompts' section, which render-run inputs need", where=loaded.path,
                         fix="add prompts.templates and prompts.slots (see recipes/outdoor.yaml)")
    if count is None:
        count = len(inputs.frames)
        defaults["--count"] = f"{count} (one sample per input frame)"
    if out is None:
        out = loaded.output
        defaults["--out"] = out
    if batch_size is None:
        batch_size = loaded.batch_size
        defaults["--batch-size"] = f"{batch_size} (recipe batch_size)"
    if device is None:
        device = _device(None)
        defaults["--device"] = device
    else:
        device = _device(device)
    precision = loaded.model.precision
    if device.startswith("cpu"):
        console.print("[yellow]warning:[/yellow] generating on the CPU: fine for tiny/test models only; a Stable "
                      "Diffusion model needs a CUDA GPU (minutes per image on a CPU)")
        if precision != "fp32":
            console.print(f"[dim]note: model.precision {precision} -> fp32 on the CPU[/dim]")
            precision = "fp32"
    print_defaults(defaults)
    recipe_defaults = [f"{k}={v!r}" for k, v in loaded.defaults.items() if k not in _SHOWN_BY_COMMAND]
    if recipe_defaults:
        console.print(f"[dim]using recipe defaults: {', '.join(recipe_defaults)}[/dim]")

    console.print(f"[dim]model: base {loaded.model.base}; guidance {guidance.describe()}; condition images "
                  f"{loaded.model.condition}[/dim]", soft_wrap=True)
    summary = generate_run(loaded, inputs, out=Path(out), start=start, count=count, batch_size=batch_size,
                           device=device, precision=precision, workers=workers, backend=backend, address=address)
    samples = f" ({summary.done} sample(s) x global + local)" if summary.images_done != summary.done else ""
    stdout.print(f"generated {summary.images_done} image(s){samples}, {summary.images_skipped} already done, into "
                 f"{summary.out} in {summary.elapsed_s:.1f} s"
                 + (f" on {summary.workers} workers" if summary.workers > 1 else ""))

"""The local runner: generate samples ``[start, start + count)`` of a recipe into a run directory.

The run directory's layout is :mod:`handsynth.generate.layout`; :mod:`handsynth.rundir` locks it,
refuses an ``out`` made with another recipe, model or inputs (compared by the manifest's
fingerprint) and records how the run ended. Every file is written atomically; a finished file is
never rewritten.

Batches lie on a fixed grid: batch k holds the indices ``[start + k*B, start + (k+1)*B)`` (B the
batch size, the last batch shorter). A rerun skips batches whose samples are all complete (sample
file parses, images match their recorded sha256) and generates every other batch WHOLE, writing
only its missing or damaged samples. What a sample is - frame, prompt, hand tokens, noise seeds -
depends on (recipe, sample index) only; its pixels can still differ by float rounding with the
batch it shares (kernels round per batch shape), and the grid makes that batch the same in every
run with the same ``--start`` and ``--batch-size``: an interrupted and resumed run gives the same
bytes as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import io as _io
import json
import time
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any

from handsynth import io, rundir
from handsynth.console import progress
from handsynth.errors import InputError
from handsynth.generate import layout
from handsynth.generate.plan import SEED_RULE, Inputs, Plan, SampleSpec

STAGE = layout.STAGE
# Recipe fields that do not change any sample (left out of the fingerprint).
NOT_FINGERPRINTED = {"output", "batch_size", "inputs"}


@dataclass
class Summary:
    out: Path
    requested: int
    done: int
    skipped: int
    elapsed_s: float


def guidance_files(guidance: str) -> dict[str, str] | None:
    """sha256 of a local guidance file, or of each .safetensors file of a local guidance folder (None for a
    hub id or ``none``)."""
    path = Path(guidance).expanduser()
    if path.is_file():
        return {path.name: io.sha256_file(path)}
    if not path.is_dir():
        return None
    return {str(p.relative_to(path)): io.sha256_file(p) for p in sorted(path.rglob("*.safetensors"))}


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def fingerprint(recipe, inputs: Inputs, model: dict[str, Any], precision: str) -> dict[str, str]:
    """What decides the samples, as digests: the recipe (less output/batch size/inputs), the inputs'
    content, the model (ids/folders and guidance weights) and the precision."""
    settings = recipe.model_dump(mode="json", exclude=NOT_FINGERPRINTED)
    return {"recipe": _digest(settings), "inputs": inputs.sha256, "model": _digest(model),
            "precision": precision}


def run_dir(out: Path, prints: dict[str, str], command: list[str] | None = None) -> rundir.RunDir:
    """The run directory ``out`` for a plan with fingerprint ``prints``."""
    return rundir.RunDir(out, STAGE, fingerprint=prints, command=command, subdirs=layout.SUBDIRS)


def check_out_dir(out: Path, prints: dict[str, str]) -> bool:
    """Whether ``out`` holds an earlier run of the same plan to resume. Refuses (InputError) a folder made
    by another stage, with another recipe/model/inputs/precision, or a non-empty folder that is no run."""
    return run_dir(out, prints).check()


def is_complete(out: Path, plan: Plan, index: int) -> bool:
    """Whether sample ``index`` is finished in ``out`` (see :func:`handsynth.generate.layout.sample_complete`)."""
    return layout.sample_complete(out, plan.key(index), local=plan.frames[index % len(plan.frames)].local is not None)


def encode_image(image, fmt: str, quality: int) -> bytes:
    """Image bytes with fixed options and no metadata, so a rerun gives identical files."""
    buf = _io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG")
    else:
        image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _open_rgb(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise InputError(f"cannot read the mesh image: {exc}", where=path,
                         fix="rerun the stage that wrote it (e.g. `handsynth render` into a new --out)") from None


class Runner:
    """Generates samples with one loaded pipeline; see the module docstring for the files it writes."""

    def __init__(self, recipe, pipe, out: Path, device: str):
        from handsynth.attentionhand.tas import TASConfig

        self.recipe, self.pipe, self.out, self.device = recipe, pipe, Path(out), device
        self.tas = TASConfig(**recipe.tas.model_dump())
        self.ext = recipe.image.format

    def generate(self, specs: list[SampleSpec], write: set[int] | None = None) -> None:
        """Generate one batch (frames with and without a local mesh image run apart), then write the
        samples whose index is in ``write`` (default: all)."""
        for has_local, group in groupby(specs, key=lambda s: s.frame.local is not None):
            self._generate_group(list(group), has_local, write)

    def _generate_group(self, specs: list[SampleSpec], has_local: bool, write: set[int] | None) -> None:
        import torch

        sampler, size = self.recipe.sampler, self.recipe.image.size
        result = self.pipe(
            prompt=[s.prompt.text for s in specs],
            mesh_image=[_open_rgb(s.frame.mesh) for s in specs],
            local_mesh_image=[_open_rgb(s.frame.local) for s in specs] if has_local else None,
            hand_token_indices=[s.token_indices for s in specs],
            generator=[torch.Generator(self.device).manual_seed(s.seed) for s in specs],
            local_generator=[torch.Generator(self.device).manual_seed(s.local_seed) for s in specs]
            if has_local else None,
            num_inference_steps=sampler.steps, guidance_scale=sampler.guidance_scale,
            controlnet_conditioning_scale=sampler.control_scale, eta=sampler.eta,
            negative_prompt=sampler.negative_prompt, tas=self.tas, height=size, width=size, output_type="pil")
        for n, spec in enumerate(specs):
            if write is None or spec.index in write:
                local = result.local_images[n] if has_local else None
                self._write(spec, result.images[n], local)

    def _write(self, spec: SampleSpec, image, local_image) -> None:
        quality = self.recipe.image.quality
        encoded = {"image": encode_image(image, self.ext, quality)}
        if local_image is not None:
            encoded["local"] = encode_image(local_image, self.ext, quality)
        outputs = {name: layout.output_ref(name, spec.key, self.ext) for name in encoded}
        for name, data in encoded.items():
            io.write_bytes_atomic(self.out / outputs[name], data)
        mesh = {"global": spec.frame.mesh_ref}
        if spec.frame.local_ref is not None:
            mesh["local"] = spec.frame.local_ref
        record = {
            "key": spec.key, "index": spec.index, "frame": spec.frame.key, "variant": spec.variant,
            "hands": spec.frame.hands, "prompt": spec.prompt.text, "hand_words": spec.prompt.hand_words,
            "hand_spans": [list(s) for s in spec.prompt.hand_spans], "hand_token_indices": spec.token_indices,
            "seed": spec.seed, "local_seed": spec.local_seed if local_image is not None else None,
            "mesh": mesh, "outputs": outputs,
            "outputs_sha256": {name: hashlib.sha256(data).hexdigest() for name, data in encoded.items()},
        }
        io.write_json_atomic(layout.sample_path(self.out, spec.key), record)


def run(recipe, inputs: Inputs, pipe, *, out: Path, start: int, count: int, batch_size: int, device: str,
        precision: str, model: dict[str, Any], prints: dict[str, str], command: list[str] | None = None) -> Summary:
    """Generate samples ``[start, start + count)`` into ``out`` (checked with :func:`check_out_dir`) on the
    fixed batch grid (see the module docstring)."""
    started = time.perf_counter()
    plan = Plan(recipe, inputs.frames, pipe.tokenizer)
    manifest = {
        "recipe": {"path": str(recipe.path.resolve()) if recipe.path else None,
                   "sha256": io.sha256_file(recipe.path) if recipe.path else None,
                   "resolved": recipe.model_dump(mode="json")},
        "inputs": {"kind": inputs.kind, **inputs.record},
        "model": model, "precision": precision, "device": device, "seeds": SEED_RULE,
        "batch_size": batch_size, "batch_grid": "batch k = sample indices [start + k*batch_size, "
                                                "start + (k+1)*batch_size)",
        "range": {"start": start, "count": count},
        "layout": {"images": layout.output_ref("image", "<key>", recipe.image.format),
                   "local": layout.output_ref("local", "<key>", recipe.image.format),
                   "samples": "samples/<key>.json"},
    }
    done = skipped = 0
    with run_dir(out, prints, command).open(counts={"requested": count}, **manifest) as run:
        out = run.out
        runner = Runner(recipe, pipe, out, device)
        with progress("images") as bar:
            task = bar.add_task("generate", total=count)
            for first in range(start, start + count, batch_size):
                batch = range(first, min(first + batch_size, start + count))
                todo = {i for i in batch if not is_complete(out, plan, i)}
                if todo:
                    runner.generate([plan(i) for i in batch], write=todo)
                done += len(todo)
                skipped += len(batch) - len(todo)
                bar.advance(task, len(batch))
        elapsed = time.perf_counter() - started
        complete = sum(1 for _ in (out / "samples").glob("*.json"))
        run.finish(counts={"requested": count, "done": done, "skipped": skipped, "samples_in_out": complete},
                   elapsed_s=round(elapsed, 3))
    return Summary(out=out, requested=count, done=done, skipped=skipped, elapsed_s=elapsed)

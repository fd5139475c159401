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
from pathlib import Path
from typing import Any

from handsynth import io, rundir
from handsynth.console import progress
from handsynth.errors import InputError
from handsynth.generate import layout
from handsynth.generate.frame import SampleFrames, resample, sample_frames
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


@dataclass
class _Prepared:
    """One sample ready for the pipeline: its frames and its mesh images cut to them."""

    spec: SampleSpec
    frames: SampleFrames
    mesh: Any
    local_mesh: Any | None


class Runner:
    """Generates samples with one loaded pipeline; see the module docstring for the files it writes."""

    def __init__(self, recipe, pipe, out: Path, device: str):
        from handsynth.attentionhand.tas import TASConfig

        self.recipe, self.pipe, self.out, self.device = recipe, pipe, Path(out), device
        self.tas = TASConfig(**recipe.tas.model_dump())
        self.ext = recipe.image.format

    def generate(self, specs: list[SampleSpec], write: set[int] | None = None) -> None:
        """Generate one batch, then write the samples whose index is in ``write`` (default: all). Samples
        run together when they share the generated size and whether they have a local image (frames of
        other aspects run apart)."""
        groups: dict[tuple[bool, tuple[int, int]], list[_Prepared]] = {}
        for spec in specs:
            item = self._prepare(spec)
            groups.setdefault((item.local_mesh is not None, item.frames.image.size), []).append(item)
        for (has_local, size), group in groups.items():
            self._generate_group(group, has_local, size, write)

    def _prepare(self, spec: SampleSpec) -> _Prepared:
        """The sample's frames (from its render label and recipe image.fit/size) and its mesh images cut and
        resampled onto them - what the model is conditioned on."""
        mesh = _open_rgb(spec.frame.mesh)
        label = io.read_json(spec.frame.label, what="render label") if spec.frame.label is not None else None
        try:
            frames = sample_frames(label, self.recipe.image.fit, self.recipe.image.size, mesh.size,
                                   local=spec.frame.local is not None)
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise InputError(f"the render label lacks a field generate needs or has a malformed one "
                             f"({type(exc).__name__}: {exc})", where=spec.frame.label,
                             fix="rerun `handsynth render` into a new --out") from None
        if label is not None and list(mesh.size) != list(label["image_size"]):
            raise InputError(f"the mesh image is {mesh.size[0]}x{mesh.size[1]} but its render label says the "
                             f"frame is {label['image_size']}", where=spec.frame.mesh,
                             fix="rerun `handsynth render` into a new --out") from None
        local = None
        if frames.local_mesh is not None:
            local = resample(_open_rgb(spec.frame.local), frames.local_mesh)
        return _Prepared(spec, frames, resample(mesh, frames.image), local)

    def _generate_group(self, items: list[_Prepared], has_local: bool, size: tuple[int, int],
                        write: set[int] | None) -> None:
        specs = [item.spec for item in items]
        meshes = [item.mesh for item in items]
        local_size = (self.recipe.image.size,) * 2
        if has_local and size == local_size:        # one pass: both branches share a batch
            result = self._call(specs, meshes, [s.seed for s in specs], size,
                                [item.local_mesh for item in items], [s.local_seed for s in specs])
            images, locals_ = result.images, result.local_images
        else:                                       # the branches differ in size: one pass each
            images = self._call(specs, meshes, [s.seed for s in specs], size).images
            locals_ = self._call(specs, [item.local_mesh for item in items], [s.local_seed for s in specs],
                                 local_size).images if has_local else None
        for n, item in enumerate(items):
            if write is None or item.spec.index in write:
                self._write(item, images[n], locals_[n] if has_local else None)

    def _call(self, specs: list[SampleSpec], meshes: list, seeds: list[int], size: tuple[int, int],
              local_meshes: list | None = None, local_seeds: list[int] | None = None):
        import torch

        sampler = self.recipe.sampler
        return self.pipe(
            prompt=[s.prompt.text for s in specs], mesh_image=meshes, local_mesh_image=local_meshes,
            hand_token_indices=[s.token_indices for s in specs],
            generator=[torch.Generator(self.device).manual_seed(seed) for seed in seeds],
            local_generator=[torch.Generator(self.device).manual_seed(seed) for seed in local_seeds]
            if local_seeds is not None else None,
            num_inference_steps=sampler.steps, guidance_scale=sampler.guidance_scale,
            controlnet_conditioning_scale=sampler.control_scale, eta=sampler.eta,
            negative_prompt=sampler.negative_prompt, tas=self.tas, width=size[0], height=size[1],
            output_type="pil")

    def _write(self, item: _Prepared, image, local_image) -> None:
        spec, quality = item.spec, self.recipe.image.quality
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
            "image": item.frames.image_block,
        }
        if local_image is not None:
            record["local_image"] = item.frames.local_block
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

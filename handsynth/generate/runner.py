"""The local runner: generate samples ``[start, start + count)`` of a recipe into a run directory.

Run directory (read by ``handsynth export``)::

    <out>/manifest.json          stage "generate": command, recipe (path, sha256, resolved), inputs, model,
                                 precision, device, seed rule, fingerprint, counts, status running|complete
    <out>/images/<skey>.<ext>    generated global image (recipe image.format / quality)
    <out>/local/<skey>.<ext>     generated local (hand crop) image, when the frame has a local mesh image
    <out>/samples/<skey>.json    per sample, written LAST: marks the sample complete

Every file is written atomically. A rerun skips samples whose ``samples/<skey>.json`` and images
exist and never rewrites a finished file; it refuses an ``out`` made with another recipe, model or
inputs (compared by the manifest's fingerprint). What a sample is - frame, prompt, hand tokens, noise
seeds - depends on (recipe, sample index) only. Its pixels can still differ by float rounding when it
shares a batch with other samples or sits at another batch position (kernels round per batch shape):
reruns with the same batches are byte-exact, and ``--batch-size 1`` is exact whatever ran before.
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

from handsynth import io
from handsynth.console import progress
from handsynth.errors import InputError
from handsynth.generate.plan import SEED_RULE, Inputs, Plan, SampleSpec

STAGE = "generate"
SUBDIRS = ("images", "local", "samples")
# Recipe fields that do not change any sample (left out of the fingerprint).
NOT_FINGERPRINTED = {"output", "batch_size", "inputs"}


@dataclass
class Summary:
    out: Path
    requested: int
    done: int
    skipped: int
    elapsed_s: float


def sample_path(out: Path, key: str) -> Path:
    return out / "samples" / f"{key}.json"


def guidance_files(guidance: str) -> dict[str, str] | None:
    """sha256 of each .safetensors file of a local guidance folder (None for a hub id)."""
    folder = Path(guidance).expanduser()
    if not folder.is_dir():
        return None
    return {str(p.relative_to(folder)): io.sha256_file(p) for p in sorted(folder.rglob("*.safetensors"))}


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def fingerprint(recipe, inputs: Inputs, model: dict[str, Any], precision: str) -> dict[str, str]:
    """What decides the samples, as digests: the recipe (less output/batch size/inputs), the inputs'
    content, the model (ids/folders and guidance weights) and the precision."""
    settings = recipe.model_dump(mode="json", exclude=NOT_FINGERPRINTED)
    return {"recipe": _digest(settings), "inputs": inputs.sha256, "model": _digest(model),
            "precision": precision}


def check_out_dir(out: Path, prints: dict[str, str]) -> bool:
    """Whether ``out`` holds an earlier run of the same plan to resume. Refuses (InputError) a folder made
    by another stage, with another recipe/model/inputs/precision, or a non-empty folder that is no run."""
    manifest = out / io.MANIFEST
    if manifest.exists():
        earlier = io.read_manifest(out)
        if earlier.get("stage") != STAGE:
            raise InputError(f"{out} holds the output of the '{earlier.get('stage')}' stage", where=manifest,
                             fix="choose another --out for generate")
        before = earlier.get("fingerprint") or {}
        for part, now in prints.items():
            if before.get(part) != now:
                raise InputError(
                    f"{out} holds samples generated with a different {part} (fingerprint {before.get(part)!r}, "
                    f"now {now!r}), so resuming would mix two plans", where=manifest,
                    fix="use a new --out for this recipe, or rerun with the original recipe, model and inputs "
                        "to resume")
        return True
    if out.is_dir() and any(out.iterdir()):
        raise InputError(f"{out} is not empty and holds no generate run (no {io.MANIFEST})", where=out,
                         fix="choose a new or empty --out")
    return False


def _remove_stray_temporaries(out: Path) -> None:
    """Delete the temporary files (``.<name>.<hex>.tmp``, see io.atomic_path) an interrupted run left."""
    for folder in (out, *(out / sub for sub in SUBDIRS)):
        for p in folder.glob(".*.tmp"):
            p.unlink(missing_ok=True)


def is_complete(out: Path, plan: Plan, index: int, ext: str) -> bool:
    """Whether sample ``index`` is finished in ``out``: its sample file and the images it lists exist
    (an image lost after its sample file was written makes the sample pending again)."""
    key = plan.key(index)
    needed = [sample_path(out, key), out / "images" / f"{key}.{ext}"]
    if plan.frames[index % len(plan.frames)].local is not None:
        needed.append(out / "local" / f"{key}.{ext}")
    return all(p.is_file() for p in needed)


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

    def generate(self, specs: list[SampleSpec]) -> None:
        """Generate, then write, one batch (frames with and without a local mesh image run apart)."""
        for has_local, group in groupby(specs, key=lambda s: s.frame.local is not None):
            self._generate_group(list(group), has_local)

    def _generate_group(self, specs: list[SampleSpec], has_local: bool) -> None:
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
            local = result.local_images[n] if has_local else None
            self._write(spec, result.images[n], local)

    def _write(self, spec: SampleSpec, image, local_image) -> None:
        quality = self.recipe.image.quality
        outputs = {"image": f"images/{spec.key}.{self.ext}"}
        io.write_bytes_atomic(self.out / outputs["image"], encode_image(image, self.ext, quality))
        if local_image is not None:
            outputs["local"] = f"local/{spec.key}.{self.ext}"
            io.write_bytes_atomic(self.out / outputs["local"], encode_image(local_image, self.ext, quality))
        mesh = {"global": spec.frame.mesh_ref}
        if spec.frame.local_ref is not None:
            mesh["local"] = spec.frame.local_ref
        record = {
            "key": spec.key, "index": spec.index, "frame": spec.frame.key, "variant": spec.variant,
            "hands": spec.frame.hands, "prompt": spec.prompt.text, "hand_words": spec.prompt.hand_words,
            "hand_spans": [list(s) for s in spec.prompt.hand_spans], "hand_token_indices": spec.token_indices,
            "seed": spec.seed, "local_seed": spec.local_seed if local_image is not None else None,
            "mesh": mesh, "outputs": outputs,
        }
        io.write_json_atomic(sample_path(self.out, spec.key), record)


def run(recipe, inputs: Inputs, pipe, *, out: Path, start: int, count: int, batch_size: int, device: str,
        precision: str, model: dict[str, Any], resuming: bool, prints: dict[str, str],
        command: list[str] | None = None) -> Summary:
    """Generate samples ``[start, start + count)`` into ``out`` (checked with :func:`check_out_dir`)."""
    started = time.perf_counter()
    plan = Plan(recipe, inputs.frames, pipe.tokenizer)
    out = io.ensure_writable_dir(out)
    if resuming:
        _remove_stray_temporaries(out)
    manifest = {
        "recipe": {"path": str(recipe.path.resolve()) if recipe.path else None,
                   "sha256": io.sha256_file(recipe.path) if recipe.path else None,
                   "resolved": recipe.model_dump(mode="json")},
        "inputs": {"kind": inputs.kind, **inputs.record},
        "model": model, "precision": precision, "device": device, "seeds": SEED_RULE, "fingerprint": prints,
        "batch_size": batch_size, "range": {"start": start, "count": count},
        "layout": {"images": f"images/<key>.{recipe.image.format}", "local": f"local/<key>.{recipe.image.format}",
                   "samples": "samples/<key>.json"},
    }
    indices = range(start, start + count)
    pending = [i for i in indices if not is_complete(out, plan, i, recipe.image.format)]
    skipped = count - len(pending)
    io.write_json_atomic(out / io.MANIFEST, io.new_manifest(
        STAGE, command, status="running", counts={"requested": count, "skipped": skipped}, **manifest))

    runner = Runner(recipe, pipe, out, device)
    with progress("images") as bar:
        task = bar.add_task("generate", total=len(pending))
        for b in range(0, len(pending), batch_size):
            specs = [plan(i) for i in pending[b:b + batch_size]]
            runner.generate(specs)
            bar.advance(task, len(specs))

    elapsed = time.perf_counter() - started
    complete = sum(1 for p in (out / "samples").glob("*.json"))
    counts = {"requested": count, "done": len(pending), "skipped": skipped, "samples_in_out": complete}
    io.write_json_atomic(out / io.MANIFEST, io.new_manifest(
        STAGE, command, status="complete", counts=counts, elapsed_s=round(elapsed, 3), **manifest))
    return Summary(out=out, requested=count, done=len(pending), skipped=skipped, elapsed_s=elapsed)

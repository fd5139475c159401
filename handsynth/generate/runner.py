"""The per-worker runner: generates batches of a plan into a run directory, overlapping I/O with the model.

The run directory's layout is :mod:`handsynth.generate.layout`; :mod:`handsynth.generate.driver` owns the
run directory (lock, manifest, stray temporaries) and hands batches to one or more workers, each with its
own :class:`Runner` (one loaded pipeline per worker). Every file is written atomically; a finished file is
never rewritten.

Batches lie on a fixed grid (:class:`Job`): batch k holds the indices ``[start + k*B, start + (k+1)*B)``
(B the batch size, the last batch shorter). A worker skips batches whose samples are all complete
(sample file parses, images match their recorded sha256) and generates every other batch WHOLE, writing
only its missing or damaged samples. What a sample is - frame, prompt, hand tokens, noise seeds -
depends on (recipe, sample index) only; its pixels can still differ by float rounding with the batch it
shares (kernels round per batch shape), and the grid makes that batch the same in every run with the
same ``--start`` and ``--batch-size``, whichever worker runs it: an interrupted and resumed run, or a run
on any number of workers, gives the same bytes as an uninterrupted single-worker one.

Overlap (:meth:`Runner.run`): while the model works on batch k, a reader thread checks which samples
of batch k+1 are complete and reads, decodes and resamples its mesh images, and a writer pool encodes
and writes the images of batch k-1 (each sample's images first, its sample file last).
"""

from __future__ import annotations

import hashlib
import io as _io
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from handsynth import io
from handsynth.errors import InputError
from handsynth.generate import layout
from handsynth.generate.frame import SampleFrames, resample, sample_frames
from handsynth.generate.plan import Inputs, Plan, SampleSpec


@dataclass(frozen=True)
class Job:
    """What every worker of a run needs to know (picklable: sent to worker processes and Ray actors):
    the recipe, inputs, run directory, index range on the batch grid, precision and model record."""

    recipe: Any
    inputs: Inputs
    out: Path
    start: int
    count: int
    batch_size: int
    precision: str

    @property
    def batches(self) -> int:
        """The number of batches of the grid."""
        return -(-self.count // self.batch_size)

    def batch(self, k: int) -> range:
        """The sample indices of grid batch ``k``."""
        first = self.start + k * self.batch_size
        return range(first, min(first + self.batch_size, self.start + self.count))


@dataclass(frozen=True)
class BatchResult:
    """What a worker reports for one grid batch: how many samples it generated and how many were done, and
    the images among them (one per sample, two for a sample with a local image)."""

    batch: int
    done: int
    skipped: int
    images_done: int = 0
    images_skipped: int = 0


def load_pipeline(job: Job, device: str):
    """The job's pipeline on ``device``, checked against the recipe's TAS resolution."""
    from handsynth.attentionhand.loading import load_pipeline as load
    from handsynth.attentionhand.tas import cross_attention_resolutions
    from handsynth.prompts.recipe import check_tas_resolution

    model = job.recipe.model
    pipe = load(model.base, model.guidance, dtype=job.precision, device=device, scheduler=job.recipe.sampler.scheduler)
    check_tas_resolution(job.recipe, pipe.vae_scale_factor, cross_attention_resolutions(
        pipe.unet, job.recipe.image.size // pipe.vae_scale_factor))
    return pipe


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
    return io.open_rgb(path, what="mesh image",
                       fix="rerun the stage that wrote it (e.g. `handsynth render` into a new --out)")


@dataclass
class _Prepared:
    """One sample ready for the pipeline: its frames and its mesh images cut to them."""

    spec: SampleSpec
    frames: SampleFrames
    mesh: Any
    local_mesh: Any | None


@dataclass
class _Batch:
    """A grid batch on its way through :meth:`Runner.run`: its specs, the samples to write (``todo``), the
    reader's future (``todo`` and prepared samples) and the writer's futures."""

    k: int
    specs: list[SampleSpec]
    ready: Future | None = None
    todo: set[int] | None = None
    writes: list[Future] | None = None


def default_writers() -> int:
    """Writer threads per worker: enough to encode one batch's images while the next one runs."""
    return max(2, min(8, (os.cpu_count() or 2) // 2))


class Runner:
    """One worker: generates grid batches of a :class:`Job` with one loaded pipeline (see the module docstring).

    ``pipe``: an already loaded pipeline (the single-worker path and tests); without it the pipeline is
    loaded here, once, on ``device``."""

    def __init__(self, job: Job, device: str, pipe=None, *, writers: int | None = None):
        from handsynth.attentionhand.tas import TASConfig

        if pipe is None:
            pipe = load_pipeline(job, device)
        self.job, self.recipe, self.pipe, self.out, self.device = job, job.recipe, pipe, Path(job.out), device
        self.plan = Plan(job.recipe, job.inputs.frames, pipe.tokenizer)
        self.tas = TASConfig(**job.recipe.tas.model_dump())
        self.ext = job.recipe.image.format
        self.writers = writers or default_writers()
        self._writer: ThreadPoolExecutor | None = None

    # -- the worker loop --

    def run(self, batches: Iterable[int]) -> Iterator[BatchResult]:
        """Generate the grid batches ``batches`` (claimed lazily, one ahead of the model), yielding each
        one's result once all its files are written. The next batch is checked and its mesh images read
        while the model runs; the previous batch's images are encoded and written meanwhile."""
        with ThreadPoolExecutor(1, thread_name_prefix="handsynth-read") as reader, \
                ThreadPoolExecutor(self.writers, thread_name_prefix="handsynth-write") as writer:
            self._writer = writer
            try:
                claims = iter(batches)
                pending: deque[_Batch] = deque()
                upcoming = self._claim(claims, reader)
                while upcoming is not None:
                    current, upcoming = upcoming, None
                    todo, prepared = current.ready.result()
                    upcoming = self._claim(claims, reader)        # read the next batch while this one runs
                    current.todo = todo
                    current.writes = self.generate(current.specs, todo, prepared=prepared) if todo else []
                    pending.append(current)
                    while len(pending) > 1:                        # the batch before: its writes had a model run
                        yield self._finished(pending.popleft())
                while pending:
                    yield self._finished(pending.popleft())
            finally:
                self._writer = None

    def _claim(self, claims: Iterator[int], reader: ThreadPoolExecutor) -> _Batch | None:
        k = next(claims, None)
        if k is None:
            return None
        specs = [self.plan(i) for i in self.job.batch(k)]   # tokenizer: on this thread only (not thread-safe)
        batch = _Batch(k, specs)
        batch.ready = reader.submit(self._read, specs)
        return batch

    def _read(self, specs: list[SampleSpec]) -> tuple[set[int], list[_Prepared] | None]:
        """The samples of a batch still to write and, when there are any, the whole batch prepared."""
        todo = {s.index for s in specs if not is_complete(self.out, self.plan, s.index)}
        return todo, [self._prepare(s) for s in specs] if todo else None

    @staticmethod
    def _finished(batch: _Batch) -> BatchResult:
        for future in batch.writes or ():
            future.result()                                         # a write error stops the worker here
        todo = batch.todo or set()
        images = {spec.index: 1 + (spec.frame.local is not None) for spec in batch.specs}
        images_done = sum(images[i] for i in todo)
        return BatchResult(batch.k, len(todo), len(batch.specs) - len(todo), images_done,
                           sum(images.values()) - images_done)

    # -- one batch --

    def generate(self, specs: list[SampleSpec], write: set[int] | None = None, *,
                 prepared: list[_Prepared] | None = None) -> list[Future]:
        """Generate one batch, then write the samples whose index is in ``write`` (default: all). Samples
        run together when they share the generated size and whether they have a local image (frames of
        other aspects run apart). Inside :meth:`run` the writes go to the writer pool and their futures
        are returned; otherwise they are done before this returns (and the list is empty)."""
        groups: dict[tuple[bool, tuple[int, int]], list[_Prepared]] = {}
        for item in prepared if prepared is not None else [self._prepare(spec) for spec in specs]:
            groups.setdefault((item.local_mesh is not None, item.frames.image.size), []).append(item)
        writes: list[Future] = []
        for (has_local, size), group in groups.items():
            writes += self._generate_group(group, has_local, size, write)
        return writes

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
                        write: set[int] | None) -> list[Future]:
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
        writes = []
        for n, item in enumerate(items):
            if write is None or item.spec.index in write:
                local = locals_[n] if has_local else None
                if self._writer is None:
                    self._write(item, images[n], local)
                else:
                    writes.append(self._writer.submit(self._write, item, images[n], local))
        return writes

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


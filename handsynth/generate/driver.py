"""The generate driver: one run directory, one manifest, any number of workers.

:func:`generate_run` is ``handsynth generate`` below its command line. The driver alone owns the run
directory (:mod:`handsynth.rundir`): it takes the lock, removes the temporaries an earlier, killed run
left (before any worker starts, so never a file a worker is still writing), writes the manifest
``running`` and, at the end, ``complete`` with the counts the workers reported. Workers only write
sample files (:mod:`handsynth.generate.layout`), each with its own :class:`~handsynth.generate.runner.Runner`
(one pipeline load per worker), and claim disjoint batches of the fixed grid
(:class:`~handsynth.generate.runner.Job`), so the result is the same files whatever the number of workers.

Backends:

- ``local`` with one worker: in this process;
- ``local`` with N workers: N spawned processes (one per visible GPU by default, ``cuda:0``..``cuda:N-1``;
  with ``--device cpu`` N CPU processes, for tiny test models), claiming batches from a shared counter.
  A worker dies with the driver (``PR_SET_PDEATHSIG``), so no orphan writes into a folder nobody locks;
- ``ray``: Ray Data over the grid's batch numbers, ``map_batches`` with an actor per worker (one GPU
  each on CUDA), in the local Ray instance or the cluster at ``--address``. Actors write into the run
  directory, which must be a path every node sees (a shared filesystem).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import signal
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from handsynth import errors, io, rundir
from handsynth.console import progress
from handsynth.errors import InputError, MissingResourceError
from handsynth.generate import layout
from handsynth.generate.plan import SEED_RULE, Inputs, Plan
from handsynth.generate.runner import BatchResult, Job, Runner, load_pipeline

STAGE = layout.STAGE
BACKENDS = ("local", "ray")
RAY_BATCHES = 4         # grid batches per Ray Data call: the actor's runner overlaps I/O across them
# Recipe fields that do not change any sample (left out of the fingerprint).
NOT_FINGERPRINTED = {"output", "batch_size", "inputs"}


@dataclass
class Summary:
    """Samples requested / written / already done, and the images among them (one per sample, two for a
    sample with a local image)."""

    out: Path
    requested: int
    done: int
    skipped: int
    elapsed_s: float
    workers: int = 1
    images_done: int = 0
    images_skipped: int = 0


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


def model_record(recipe) -> dict[str, Any]:
    """The model as the manifest records it (and the fingerprint hashes it)."""
    return {"base": recipe.model.base, "guidance": recipe.model.guidance,
            "guidance_files_sha256": guidance_files(recipe.model.guidance), "scheduler": recipe.sampler.scheduler}


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


def worker_devices(device: str, workers: int | None) -> list[str]:
    """The device of each worker: ``workers`` (default: one per visible GPU for a bare ``cuda``, else 1)
    spread over ``cuda:0``..``cuda:N-1`` for a bare ``cuda``, all on ``device`` otherwise."""
    import torch

    gpus = torch.cuda.device_count() if device == "cuda" else 0
    n = workers if workers is not None else max(1, gpus)
    if device == "cuda" and gpus > 1:
        return [f"cuda:{w % gpus}" for w in range(n)]
    return [device] * n


def generate_run(recipe, inputs: Inputs, *, out: Path, start: int, count: int, batch_size: int, device: str,
                 precision: str, workers: int | None = None, backend: str = "local", address: str | None = None,
                 command: list[str] | None = None) -> Summary:
    """Generate samples ``[start, start + count)`` of ``recipe`` from ``inputs`` into the run directory ``out``
    (see the module docstring); returns the counts. ``workers``: see :func:`worker_devices` (Ray: actors,
    default one per GPU of the cluster, or 1 on CPU). Resumes an earlier run of the same plan; refuses
    (InputError) a folder of another plan before any model is loaded."""
    if backend not in BACKENDS:
        raise InputError(f"--backend '{backend}' is not a backend", where="--backend", fix="use local or ray")
    started = time.perf_counter()
    model = model_record(recipe)
    prints = fingerprint(recipe, inputs, model, precision)
    check_out_dir(Path(out), prints)                 # before the slow model load; nothing is created yet
    job = Job(recipe, inputs, Path(out), start, count, batch_size, precision)
    if backend == "ray":
        ray = _init_ray(address)
        n = workers or _ray_gpus(ray, device) or 1
        devices = [device] * n
    else:
        devices = worker_devices(device, workers)
    pipe = None
    if backend == "local" and len(devices) == 1:     # one worker: in this process, model loaded before the run
        pipe = load_pipeline(job, devices[0])
    manifest = {
        "recipe": {"path": str(recipe.path.resolve()) if recipe.path else None,
                   "sha256": io.sha256_file(recipe.path) if recipe.path else None,
                   "resolved": recipe.model_dump(mode="json")},
        "inputs": {"kind": inputs.kind, **inputs.record},
        "model": model, "precision": precision, "device": device, "seeds": SEED_RULE,
        "batch_size": batch_size, "batch_grid": "batch k = sample indices [start + k*batch_size, "
                                                "start + (k+1)*batch_size)",
        "range": {"start": start, "count": count},
        "workers": {"backend": backend, "count": len(devices), "devices": sorted(set(devices)),
                    **({"address": address} if address else {})},
        "layout": {"images": layout.output_ref("image", "<key>", recipe.image.format),
                   "local": layout.output_ref("local", "<key>", recipe.image.format),
                   "samples": "samples/<key>.json"},
    }
    done = skipped = images_done = images_skipped = 0
    images_requested = Plan(recipe, inputs.frames, None).images(start, count)
    with run_dir(Path(out), prints, command).open(counts={"requested": count, "images_requested": images_requested},
                                                  **manifest) as run:
        with progress("images") as bar:
            task = bar.add_task("generate", total=images_requested)
            if pipe is not None:
                results = Runner(job, devices[0], pipe).run(range(job.batches))
            elif backend == "ray":
                results = _ray_results(job, devices, device)
            else:
                results = _process_results(job, devices)
            with contextlib.closing(results):        # on any error: stop the workers before the manifest says so
                for result in results:
                    done, skipped = done + result.done, skipped + result.skipped
                    images_done += result.images_done
                    images_skipped += result.images_skipped
                    bar.advance(task, result.images_done + result.images_skipped)
        elapsed = time.perf_counter() - started
        complete = sum(1 for _ in (run.out / "samples").glob("*.json"))
        run.finish(counts={"requested": count, "done": done, "skipped": skipped, "samples_in_out": complete,
                           "images_requested": images_requested, "images_done": images_done,
                           "images_skipped": images_skipped}, elapsed_s=round(elapsed, 3))
    return Summary(out=run.out, requested=count, done=done, skipped=skipped, elapsed_s=elapsed,
                   workers=len(devices), images_done=images_done, images_skipped=images_skipped)


# --- local worker processes ----------------------------------------------------------------------

def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the process that started it dies (no orphan writers)."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _claims(counter, batches: int, parent: int) -> Iterator[int]:
    """Grid batch numbers claimed from the shared ``counter``, each by exactly one worker."""
    while os.getppid() == parent:                # the driver is gone: stop claiming
        with counter.get_lock():
            k = counter.value
            if k >= batches:
                return
            counter.value = k + 1
        yield k


def _worker_main(job: Job, device: str, counter, results, parent: int) -> None:
    """A local worker process: load the pipeline once, generate claimed batches, report each one."""
    _die_with_parent()
    try:
        for result in Runner(job, device).run(_claims(counter, job.batches, parent)):
            results.put(("batch", result))
        results.put(("end",))
    except KeyboardInterrupt:                    # Ctrl-C reaches the whole process group; the driver reports it
        pass
    except errors.HandsynthError as exc:
        results.put(("error", type(exc).__name__, exc.what, exc.where, exc.fix))
    except BaseException:
        results.put(("crash", device, traceback.format_exc()))


def _worker_error(message: tuple) -> BaseException:
    if message[0] == "error":
        kind = getattr(errors, message[1], errors.HandsynthError)
        return kind(message[2], where=message[3], fix=message[4])
    return RuntimeError(f"a generate worker on {message[1]} failed:\n{message[2]}")


def _process_results(job: Job, devices: list[str]) -> Iterator[BatchResult]:
    """Run one spawned worker process per device; yield the batch results as they come."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    counter, results = ctx.Value("q", 0), ctx.Queue()
    procs = [ctx.Process(target=_worker_main, args=(job, device, counter, results, os.getpid()), daemon=True,
                         name=f"handsynth-generate-{n}") for n, device in enumerate(devices)]
    for proc in procs:
        proc.start()
    try:
        ended = 0
        while ended < len(procs):
            try:
                message = results.get(timeout=0.5)
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"generate worker {dead[0].name} (pid {dead[0].pid}) stopped with exit code "
                                       f"{dead[0].exitcode} without reporting an error (killed? out of memory?)")
                continue
            if message[0] == "batch":
                yield message[1]
            elif message[0] == "end":
                ended += 1
            else:
                raise _worker_error(message)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join()


# --- Ray --------------------------------------------------------------------------------------------

def _init_ray(address: str | None):
    try:
        import ray
    except ImportError:
        raise MissingResourceError("--backend ray needs Ray Data, which is not installed", where="--backend",
                                   fix="pip install 'handsynth[ray]' (or use --backend local)") from None
    import logging

    logging.getLogger("ray").setLevel(logging.WARNING)       # handsynth shows its own progress
    if not ray.is_initialized():
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray


def _ray_gpus(ray, device: str) -> int:
    return int(ray.cluster_resources().get("GPU", 0)) if device.startswith("cuda") else 0


class RayWorker:
    """A Ray Data actor: one :class:`Runner` (one pipeline load), fed the grid batch numbers in ``id``."""

    def __init__(self, job: Job, device: str):
        self.runner = Runner(job, device)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        results = list(self.runner.run(int(k) for k in batch["id"]))
        return {"batch": np.array([r.batch for r in results], dtype=np.int64),
                "done": np.array([r.done for r in results], dtype=np.int64),
                "skipped": np.array([r.skipped for r in results], dtype=np.int64),
                "images_done": np.array([r.images_done for r in results], dtype=np.int64),
                "images_skipped": np.array([r.images_skipped for r in results], dtype=np.int64)}


def _ray_results(job: Job, devices: list[str], device: str) -> Iterator[BatchResult]:
    """Ray Data over the grid: ``range(batches)`` -> ``map_batches(RayWorker)`` with one actor per worker."""
    import ray

    gpu = device.startswith("cuda")
    # A GPU actor takes a GPU (and Ray's default CPU); a CPU actor (tiny test models) half a CPU, so that Ray
    # Data's own read task still fits beside two actors on a two-core machine.
    data = ray.data.range(job.batches).map_batches(
        RayWorker, fn_constructor_args=(job, "cuda" if gpu else "cpu"), batch_size=RAY_BATCHES,
        concurrency=len(devices), **({"num_gpus": 1} if gpu else {"num_cpus": 0.5}))
    for row in data.iter_rows():
        yield BatchResult(*(int(row[name]) for name in ("batch", "done", "skipped", "images_done", "images_skipped")))

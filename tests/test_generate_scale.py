"""handsynth generate on several workers: same files as one worker, one run directory, kill-safe, counts right.

Tiny random models on the CPU. Worker processes are spawned (``--workers 2 --device cpu``); the
SIGKILL cases run the command in a child process group and kill it while it writes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from handsynth.cli import main
from handsynth.generate import layout
from tests.fixtures.generate import write_gen_recipe

REPO = Path(__file__).resolve().parents[1]
COUNT = 10          # 4 frames: 2.5 variants each; batch size 2 -> 5 grid batches


def gen(capsys, recipe: Path, *args: str) -> tuple[int, str]:
    code = main(["generate", "--recipe", str(recipe), "--device", "cpu", *args])
    captured = capsys.readouterr()
    return code, " ".join((captured.out + captured.err).split())


def files(folder: Path) -> dict[str, bytes]:
    """{relative path: bytes} of every file under ``folder`` but the manifest and the lock."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in ("manifest.json", ".handsynth.lock")}


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """Every run in this module - in this process, in subprocesses and in spawned workers - on one torch CPU
    thread: CPU kernels may sum in another order with another thread count, and the runs are compared byte
    for byte (OMP_NUM_THREADS reaches the workers, set_num_threads this process)."""
    import torch

    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def single(tiny_sd_dir, tiny_guidance_dir, small_render_run, tmp_path_factory):
    """COUNT samples, batch size 2, one worker in this process: the reference for every other run."""
    folder = tmp_path_factory.mktemp("gen-single")
    recipe = write_gen_recipe(folder, tiny_sd_dir, tiny_guidance_dir,
                              extra=f"inputs:\n  run: {small_render_run}\nbranches: [global, local]\n")
    out = folder / "out"
    assert main(["generate", "--recipe", str(recipe), "--device", "cpu", "--count", str(COUNT),
                 "--batch-size", "2", "--out", str(out)]) == 0
    reference = files(out)
    assert len([n for n in reference if n.startswith("samples/")]) == COUNT
    return {"recipe": recipe, "out": out, "files": reference}


def test_two_workers_write_the_same_run_as_one(single, tmp_path, capsys):
    """Two spawned worker processes claim disjoint batches of the same grid: every file (images, sample
    files with prompts, seeds and hashes) equals the one-worker run's byte for byte; the driver alone
    writes the manifest, with the right counts; export reads the run in one go."""
    out = tmp_path / "two"
    code, text = gen(capsys, single["recipe"], "--count", str(COUNT), "--batch-size", "2", "--workers", "2",
                     "--out", str(out))
    assert code == 0, text
    assert f"generated {2 * COUNT} image(s) ({COUNT} sample(s) x global + local), 0 already done" in text and "on 2 workers" in text
    assert files(out) == single["files"]
    record = manifest(out)
    assert record["status"] == "complete" and record["workers"] == {"backend": "local", "count": 2,
                                                                   "devices": ["cpu"]}
    assert record["counts"] == {"requested": COUNT, "done": COUNT, "skipped": 0, "samples_in_out": COUNT,
                                "images_requested": 2 * COUNT, "images_done": 2 * COUNT, "images_skipped": 0}
    assert record["fingerprint"] == manifest(single["out"])["fingerprint"]
    assert not list(out.rglob(".*.tmp")) and not (out / ".handsynth.lock").exists()

    shards = tmp_path / "shards"
    assert main(["export", "--run", str(out), "--out", str(shards)]) == 0
    capsys.readouterr()
    index = json.loads((shards / "index.json").read_text())
    run = layout.read_run(out)
    assert [k for shard in index["shards"] for k in shard["keys"]] == [s.key for s in run.samples]
    assert [s.index for s in run.samples] == list(range(COUNT)) and run.incomplete == 0


def test_the_ray_actor_writes_the_claimed_batches(single, tmp_path):
    """The Ray Data actor (called here as Ray Data calls it: a batch of grid batch numbers in ``id``) writes
    exactly those batches, with the one-worker run's bytes, and reports each batch's counts."""
    import numpy as np

    from handsynth.generate.driver import RayWorker
    from handsynth.generate.plan import read_render_run
    from handsynth.generate.runner import Job
    from handsynth.prompts.recipe import load_recipe

    recipe = load_recipe(single["recipe"])
    out = tmp_path / "actor"
    out.mkdir()
    actor = RayWorker(Job(recipe, read_render_run(recipe.inputs.run), out, 0, COUNT, 2, "fp32"), "cpu")
    got = actor({"id": np.array([3, 1])})
    assert {k: v.tolist() for k, v in got.items()} == {"batch": [3, 1], "done": [2, 2], "skipped": [0, 0],
                                                        "images_done": [4, 4], "images_skipped": [0, 0]}
    want = {n: d for n, d in single["files"].items() if json.loads(single["files"][
        "samples/" + Path(n).stem + ".json"])["index"] in (2, 3, 6, 7)}
    assert files(out) == want and len(want) == 4 * 3
    assert {k: v.tolist() for k, v in actor({"id": np.array([1])}).items()} == {
        "batch": [1], "done": [0], "skipped": [2], "images_done": [0], "images_skipped": [4]}


@pytest.mark.slow
def test_ray_backend_writes_the_same_run_as_one_worker(single, tmp_path, capsys):
    """Ray Data with two CPU actors (a local Ray instance) over the same grid: the same files as the
    one-worker run, one manifest with the right counts. Needs the `ray` extra; slow (Ray starts its
    processes: a minute or more on two busy cores)."""
    pytest.importorskip("ray.data")
    import ray

    out = tmp_path / "ray"
    try:
        code, text = gen(capsys, single["recipe"], "--count", str(COUNT), "--batch-size", "2", "--backend", "ray",
                         "--workers", "2", "--out", str(out))
    finally:
        ray.shutdown()
    assert code == 0, text
    assert f"generated {2 * COUNT} image(s) ({COUNT} sample(s) x global + local), 0 already done" in text and "on 2 workers" in text
    assert files(out) == single["files"]
    record = manifest(out)
    assert record["workers"] == {"backend": "ray", "count": 2, "devices": ["cpu"]}
    assert record["counts"] == {"requested": COUNT, "done": COUNT, "skipped": 0, "samples_in_out": COUNT,
                                "images_requested": 2 * COUNT, "images_done": 2 * COUNT, "images_skipped": 0}


def test_a_worker_error_reaches_the_user(single, tmp_path, capsys, tiny_guidance_dir, small_render_run):
    """A model that cannot load in the worker processes: one paragraph with the exit code of its kind, no
    traceback, and no run folder left behind (the failed start is undone)."""
    recipe = write_gen_recipe(tmp_path, tmp_path / "no-such-model", tiny_guidance_dir,
                              extra=f"inputs:\n  run: {small_render_run}\n")
    out = tmp_path / "out"
    code, text = gen(capsys, recipe, "--count", "4", "--workers", "2", "--out", str(out))
    assert code == 3, text
    assert "no-such-model" in text and "Traceback" not in text
    assert not out.exists()


def test_a_write_error_in_the_writer_pool_stops_the_run(single, tmp_path, capsys, monkeypatch):
    """The writer threads' errors are not lost: a full disk while writing sample 2's image ends the run with
    exit code 4 and the manifest says failed; sample 2 has no sample file, and every sample file present
    (at most the batches in flight besides sample 2's) is complete."""
    from handsynth import io
    from handsynth.errors import OutputError

    victim = next(json.loads(data)["key"] for name, data in single["files"].items()
                  if name.startswith("samples/") and json.loads(data)["index"] == 2)
    real = io.write_bytes_atomic

    def failing(path, data):
        if Path(path).name == f"{victim}.png" and Path(path).parent.name == "images":
            raise OutputError("cannot write the file: No space left on device", where=path, fix="free disk space")
        real(path, data)

    monkeypatch.setattr(io, "write_bytes_atomic", failing)
    out = tmp_path / "full"
    code, text = gen(capsys, single["recipe"], "--count", str(COUNT), "--batch-size", "2", "--out", str(out))
    assert code == 4 and "No space left on device" in text and victim in text, text
    record = manifest(out)
    assert record["status"] == "failed" and "No space left" in record["error"]
    samples = {p.stem for p in (out / "samples").glob("*.json")}
    assert victim not in samples and 2 <= len(samples) <= 5      # batch [0, 1] done; batch [4, 5] in flight
    for key in samples:
        assert layout.sample_complete(out, key, local=True)
        assert (out / "samples" / f"{key}.json").read_bytes() == single["files"][f"samples/{key}.json"]


# --- SIGKILL -------------------------------------------------------------------------------------------

def _start(recipe: Path, out: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "handsynth.cli", "generate", "--recipe", str(recipe), "--device",
                             "cpu", "--count", str(COUNT), "--batch-size", "2", "--out", str(out), *args],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def _kill_after(proc: subprocess.Popen, out: Path, samples: int, *, group: bool) -> int:
    """SIGKILL the run (the driver alone, or its whole process group) once ``samples`` sample files exist;
    returns how many there were."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        found = len(list((out / "samples").glob("*.json"))) if (out / "samples").is_dir() else 0
        if found >= samples:
            assert proc.poll() is None, "the run ended before it could be killed"
            os.killpg(proc.pid, signal.SIGKILL) if group else proc.kill()
            proc.wait()
            return found
        if proc.poll() is not None:
            pytest.fail(f"the run ended early: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("no samples appeared in time")


def _state(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def test_sigkill_at_several_points_then_resume_equals_an_uninterrupted_run(single, tmp_path, capsys):
    """Killed twice: first the driver of a two-worker run alone (its workers must die with it: nothing is
    written after), then a one-worker run with its whole process group. After each kill every sample file
    present is complete (what export reads is never half-written) and the manifest says 'running' with
    nobody holding the lock; the resumed run ends with the same bytes as the uninterrupted run, redoing
    exactly the missing samples (counts)."""
    out = tmp_path / "killed"
    proc = _start(single["recipe"], out, "--workers", "2")
    _kill_after(proc, out, 1, group=False)
    time.sleep(1.0)                                         # orphaned workers would keep writing meanwhile
    before = _state(out)
    time.sleep(1.5)
    assert _state(out) == before, "worker processes kept writing after the driver was killed"
    seen = []
    for stage in ("after the driver's kill", "after the group's kill"):
        samples = list((out / "samples").glob("*.json"))
        assert all(layout.sample_complete(out, p.stem, local=True) for p in samples), stage
        assert manifest(out)["status"] == "running", stage
        seen.append(len(samples))
        if stage.startswith("after the driver"):
            proc = _start(single["recipe"], out)
            _kill_after(proc, out, len(samples) + 3, group=True)
    assert seen[0] < COUNT and seen[1] < COUNT and seen[1] > seen[0]
    code, text = gen(capsys, single["recipe"], "--count", str(COUNT), "--batch-size", "2", "--out", str(out))
    assert code == 0 and "left 'running' by a process that stopped without finishing" in text, text
    assert files(out) == single["files"]                   # stray temporaries removed, nothing half-written
    record = manifest(out)
    assert record["status"] == "complete" and record["previous_status"] == "running"
    assert record["counts"]["done"] + record["counts"]["skipped"] == COUNT
    assert record["counts"] == {"requested": COUNT, "done": COUNT - seen[1], "skipped": seen[1],
                                "samples_in_out": COUNT, "images_requested": 2 * COUNT,
                                "images_done": 2 * (COUNT - seen[1]), "images_skipped": 2 * seen[1]}

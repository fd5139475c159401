"""The generate run directory: where generate writes each file, and how export reads a run.

Run directory::

    <run>/manifest.json          stage "generate": command, recipe (path, sha256, resolved), inputs, model,
                                 precision, device, seed rule, fingerprint, counts, status
    <run>/images/<skey>.<ext>    generated global image (recipe image.format / quality) in the frame that
                                 recipe image.fit chose (see handsynth.generate.frame)
    <run>/local/<skey>.<ext>     generated local (hand crop) image, when the recipe's ``branches`` include
                                 ``local`` and the frame has a local mesh image
    <run>/samples/<skey>.json    per sample, written LAST: lists its images (``outputs``) and their sha256
                                 (``outputs_sha256``), and holds each image's labels in its own pixel frame
                                 (``image``, ``local_image``); a sample is complete when this file parses
                                 and every listed image matches its hash

Export reads a generate run only through :func:`read_run` and :func:`read_output`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from handsynth import io, rundir
from handsynth.errors import InputError
from handsynth.keys import is_valid_key
from handsynth.render import layout as render_layout

STAGE = "generate"
SUBDIRS = ("images", "local", "samples")
IMAGE_EXTS = ("jpg", "png")
REDO = "rerun the same `handsynth generate` command: it redoes samples whose images are damaged or missing"


def sample_path(run: Path, key: str) -> Path:
    return Path(run) / "samples" / f"{key}.json"


def output_ref(name: str, key: str, ext: str) -> str:
    """The run-relative path of a sample's output ``name`` ("image" or "local")."""
    return f"{'images' if name == 'image' else 'local'}/{key}.{ext}"


def sample_complete(run: Path, key: str, *, local: bool) -> bool:
    """Whether sample ``key`` is finished in ``run``: its sample file parses and lists the global image (and
    the local one when ``local``), each decoding and matching its recorded sha256."""
    try:
        record = json.loads(sample_path(run, key).read_text(encoding="utf-8"))
        outputs, digests = record["outputs"], record.get("outputs_sha256", {})
        if "image" not in outputs or (local and "local" not in outputs):
            return False
        return all(rundir.intact(Path(run) / rel, digests.get(name)) for name, rel in outputs.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


@dataclass(frozen=True)
class Sample:
    """One complete generated sample: its key, plan index, frame key, sample file and images (with the
    sha256 recorded for each, None for runs of older versions)."""

    key: str
    index: int
    frame: str
    record_path: Path
    image: Path
    local: Path | None
    sha256: dict[str, str | None]


@dataclass
class GenerateRun:
    """A generate run directory as export reads it."""

    path: Path
    manifest: dict[str, Any]
    render_run: Path
    samples: list[Sample]
    incomplete: int


def read_run(run: Path) -> GenerateRun:
    """The complete samples of a generate run in index order; InputError when ``run`` is not one."""
    run = Path(run)
    manifest = rundir.read_manifest(run, stage=STAGE)
    render_run = _render_run_of(run, manifest)
    samples = [_read_sample(run, path) for path in sorted((run / "samples").glob("*.json"))]
    keys_seen = {s.key for s in samples}
    samples.sort(key=lambda s: s.index)
    incomplete = len({p.stem for p in (run / "images").glob("*.*")
                      if p.suffix[1:] in IMAGE_EXTS} - keys_seen)
    return GenerateRun(run, manifest, render_run, samples, incomplete)


def read_output(sample: Sample, name: str) -> bytes:
    """The bytes of the sample's output ``name`` ("image" or "local"), checked against the sha256 its
    sample file recorded; InputError naming the file when it is unreadable or damaged (a run of an
    older version, without hashes: when it does not decode)."""
    path = sample.image if name == "image" else sample.local
    assert path is not None
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"the generated image cannot be read: {exc.strerror or exc}", where=path, fix=REDO) from None
    digest = sample.sha256.get(name)
    if digest is None and not rundir.intact(path, None):
        raise InputError("the generated image does not decode", where=path, fix=REDO)
    return rundir.check_digest(path, data, digest, fix=REDO)


def _render_run_of(run: Path, manifest: dict[str, Any]) -> Path:
    inputs = manifest.get("inputs") or {}
    if not isinstance(inputs, dict) or not inputs.get("run"):
        raise InputError("this generate run was not made from a render run (no inputs.run in its manifest), so "
                         "there are no 3D labels to pair its images with", where=f"{run / rundir.MANIFEST}, field "
                         "'inputs'", fix="export a run generated from `handsynth render` output")
    render_run = Path(inputs["run"])
    if not render_run.is_absolute() and not render_run.is_dir():
        render_run = run / render_run
    render_layout.read_manifest(render_run)
    return render_run


def _read_sample(run: Path, path: Path) -> Sample:
    """A sample file (``samples/<key>.json``) as a :class:`Sample`; InputError naming the field that does
    not follow the generate contract, or the listed output that is missing."""
    record = io.read_json(path, what="sample file")
    key, redo = path.stem, "rerun `handsynth generate` into a new --out"
    if not isinstance(record, dict):
        raise InputError("the sample file is not a JSON object", where=path, fix=redo)
    if not is_valid_key(key) or record.get("key") != key:
        raise InputError(f"the sample file's name '{key}' is not its valid sample key {record.get('key')!r}",
                         where=f"{path}, field 'key'", fix="do not rename files inside a generate run")
    index, frame, outputs = record.get("index"), record.get("frame"), record.get("outputs")
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise InputError("the sample file has no sample index (an integer >= 0)", where=f"{path}, field 'index'",
                         fix=redo)
    if not isinstance(frame, str) or not is_valid_key(frame):
        raise InputError("the sample file names no frame key", where=f"{path}, field 'frame'", fix=redo)
    if not isinstance(outputs, dict) or not isinstance(outputs.get("image"), str):
        raise InputError("the sample file lists no generated image", where=f"{path}, field 'outputs.image'",
                         fix=redo)
    digests = record.get("outputs_sha256") or {}
    if not isinstance(digests, dict):
        raise InputError("the sample file's image hashes are not a mapping", where=f"{path}, field 'outputs_sha256'",
                         fix=redo)
    found = {}
    for name in ("image", "local"):
        rel = outputs.get(name)
        if rel is None:
            continue
        file = run / str(rel)
        if not (file.suffix[1:] in IMAGE_EXTS and file.resolve().is_relative_to(run.resolve())):
            raise InputError(f"the sample file lists '{rel}', which is no jpg/png image inside the run",
                             where=f"{path}, field 'outputs.{name}'", fix=redo)
        if not file.is_file():
            raise InputError(f"the sample file lists the generated image '{rel}', which does not exist",
                             where=f"{path}, field 'outputs.{name}'", fix=REDO)
        found[name] = file
    return Sample(key, index, frame, path, found["image"], found.get("local"),
                  {name: digests.get(name) for name in found})

"""Export a generate run as WebDataset shards pairing each generated image with its ORIGINAL 3D labels.

Shards are ``<out>/<name>-000000.tar``, ``-000001.tar``, ... (``name``: the generate run's folder
name) holding the run's complete samples (those with ``samples/<key>.json``) in sample-index order,
``shard_size`` per shard. Members of sample ``<key>`` (keys have no dots, as WebDataset needs):

- layout ``handsynth`` (default): ``<key>.jpg|png`` the generated image (bytes as generated),
  ``<key>.mesh.png`` the render run's global mesh image, ``<key>.local.jpg|png`` /
  ``<key>.local_mesh.png`` the generated local image and its mesh image when present, and
  ``<key>.json``: the render label file (original annotation + derived joints/boxes, units and
  joint order named) with a ``generation`` block added (the sample file's fields, the generated
  image size, the recipe sha256 and the model ids from the generate manifest).
- layout ``hamer``: ``<key>.jpg|png``, ``<key>.data.pyd`` (see :mod:`handsynth.export.hamer`) and
  ``<key>.json`` as above.

Writes are atomic: each shard goes to a temporary name and is renamed when complete; ``index.json``
(shards, keys, sha256, counts) is rewritten after every shard and marked complete last. Tar members
have fixed owner, mode and mtime, so reruns give byte-identical shards. A rerun skips shards whose
file still matches the index and rewrites the rest; an index made from other inputs or settings is
refused unless ``overwrite``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from handsynth import io
from handsynth.console import progress
from handsynth.errors import InputError, MissingResourceError
from handsynth.keys import is_valid_key, sanitize

FORMATS = ("webdataset",)
LAYOUTS = ("handsynth", "hamer")
GENERATE_STAGE = "generate"
INDEX = "index.json"
IMAGE_EXTS = ("jpg", "png")
TAR_MTIME = 946684800            # 2000-01-01T00:00:00Z for every member: reruns are byte-identical
TAR_OWNER = "handsynth"
TAR_MODE = 0o444


@dataclass(frozen=True)
class Sample:
    """One complete generated sample: its key, plan index, frame key, sample file and images."""

    key: str
    index: int
    frame: str
    record_path: Path
    image: Path
    local: Path | None


@dataclass
class GenerateRun:
    """A generate run directory as export reads it."""

    path: Path
    manifest: dict[str, Any]
    render_run: Path
    samples: list[Sample]
    incomplete: int


@dataclass
class ExportSummary:
    out: Path
    shards: int
    written: int
    kept: int
    samples: int
    incomplete: int
    bytes: int
    elapsed_s: float
    verified: "VerifySummary | None" = None


@dataclass
class VerifySummary:
    out: Path
    shards: int
    samples: int
    bytes: int
    elapsed_s: float
    problems: list[str] = field(default_factory=list)


# --- reading a generate run -----------------------------------------------------------------

def read_generate_run(run: Path) -> GenerateRun:
    """The complete samples of a generate run in index order; InputError when ``run`` is not one."""
    run = Path(run)
    manifest = io.read_manifest(run, stage=GENERATE_STAGE)
    render_run = _render_run_of(run, manifest)
    samples = [_read_sample(run, path) for path in sorted((run / "samples").glob("*.json"))]
    keys_seen = {s.key for s in samples}
    samples.sort(key=lambda s: s.index)
    incomplete = len({p.stem for p in (run / "images").glob("*.*")
                      if p.suffix[1:] in IMAGE_EXTS} - keys_seen)
    return GenerateRun(run, manifest, render_run, samples, incomplete)


def _render_run_of(run: Path, manifest: dict[str, Any]) -> Path:
    inputs = manifest.get("inputs") or {}
    if not isinstance(inputs, dict) or not inputs.get("run"):
        raise InputError("this generate run was not made from a render run (no inputs.run in its manifest), so "
                         "there are no 3D labels to pair its images with", where=f"{run / io.MANIFEST}, field "
                         "'inputs'", fix="export a run generated from `handsynth render` output")
    render_run = Path(inputs["run"])
    if not render_run.is_absolute() and not render_run.is_dir():
        render_run = run / render_run
    io.read_manifest(render_run, stage="render")
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
                             where=f"{path}, field 'outputs.{name}'",
                             fix="rerun the same `handsynth generate` command: it redoes samples whose images "
                                 "are missing")
        found[name] = file
    return Sample(key, index, frame, path, found["image"], found.get("local"))


# --- one sample -----------------------------------------------------------------------------

class RecordBuilder:
    """Builds the tar members (field name -> bytes) of a sample in the chosen layout."""

    def __init__(self, source: GenerateRun, layout: str, mano_dir: Path | None = None):
        self.source, self.layout = source, layout
        manifest = source.manifest
        recipe = manifest.get("recipe") if isinstance(manifest.get("recipe"), dict) else {}
        self.extra = {"generate_run": source.path.name, "recipe_sha256": recipe.get("sha256"),
                      "model": manifest.get("model")}
        self.hands_mean = _hands_mean(source.render_run, mano_dir) if layout == "hamer" else None

    def label_bytes(self, sample: Sample) -> bytes:
        path = self.source.render_run / "labels" / f"{sample.frame}.json"
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise InputError(f"sample {sample.key} needs the label of frame {sample.frame}, which the render run "
                             "does not have", where=path,
                             fix="export the generate run together with the render run it was made from") from None

    def __call__(self, sample: Sample) -> dict[str, bytes]:
        from PIL import Image

        label_path = self.source.render_run / "labels" / f"{sample.frame}.json"
        label = io.read_json(label_path, what="render label")
        try:
            with Image.open(sample.image) as img:
                size = img.size
        except OSError as exc:
            raise InputError(f"the generated image cannot be read: {exc}", where=sample.image,
                             fix="delete it and rerun the same `handsynth generate` command (it redoes samples "
                                 "whose images are missing)") from None
        try:
            return self._members(sample, label, size)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise InputError(f"the render label of frame {sample.frame} lacks a field export needs or has a "
                             f"malformed one ({type(exc).__name__}: {exc})", where=label_path,
                             fix="rerun `handsynth render` into a new --out and generate from it") from None

    def _members(self, sample: Sample, label: dict[str, Any], size: tuple[int, int]) -> dict[str, bytes]:
        render = self.source.render_run
        generation = {**io.read_json(sample.record_path, what="sample file"), **self.extra,
                      "image_size": list(size)}
        members = {sample.image.suffix[1:]: sample.image.read_bytes(),
                   "json": json.dumps({**label, "generation": generation}, allow_nan=False).encode()}
        if self.layout == "hamer":
            from handsynth.export.hamer import encode_pyd, hamer_hands

            members["data.pyd"] = encode_pyd(hamer_hands(label, size, self.hands_mean))
            return members
        members["mesh.png"] = _read(render / label["images"]["global"], sample)
        if label["images"].get("local") and (render / label["images"]["local"]).is_file():
            members["local_mesh.png"] = _read(render / label["images"]["local"], sample)
        if sample.local is not None:
            members[f"local{sample.local.suffix}"] = sample.local.read_bytes()
        return members


def _read(path: Path, sample: Sample) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"sample {sample.key} needs a file the render run does not have", where=path,
                         fix="export the generate run together with the complete render run it was made from") from None


def _hands_mean(render_run: Path, mano_dir: Path | None) -> dict[str, Any]:
    """MANO's (45,) mean finger pose per side, from ``mano_dir`` or the render run's MANO folder."""
    from handsynth.hand_model import load_mano_arrays, resolve_mano_dir

    manifest = io.read_manifest(render_run)
    folder = mano_dir or Path(manifest.get("mano", {}).get("dir", ""))
    expected = manifest.get("mano", {}).get("files", {})
    if not mano_dir and not folder.is_dir():
        raise MissingResourceError(
            "the hamer layout needs the MANO files the render run used (for MANO's mean hand pose), and "
            f"their folder {folder} is gone", where=f"{render_run / io.MANIFEST}, field 'mano.dir'",
            fix="pass --mano-dir with MANO_RIGHT.pkl / MANO_LEFT.pkl")
    root = resolve_mano_dir(folder)
    for name, digest in expected.items():
        if (root / name).is_file() and io.sha256_file(root / name) != digest:
            raise InputError(f"{name} differs from the file the render run used", where=root / name,
                             fix="pass --mano-dir with the MANO files the render run used")
    return {side: load_mano_arrays(root, side)["hands_mean"] for side in ("right", "left")}


# --- shards ---------------------------------------------------------------------------------

class _HashingFile:
    """A write-only file wrapper counting bytes and hashing them as they pass."""

    def __init__(self, fh):
        self.fh, self.sha256, self.size = fh, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()


def write_shard(path: Path, records: list[tuple[str, dict[str, bytes]]]) -> dict[str, Any]:
    """Write ``(key, members)`` records to the shard ``path`` atomically; returns sha256 and size."""
    import webdataset as wds

    with io.atomic_path(path) as tmp, open(tmp, "wb") as fh:
        hashing = _HashingFile(fh)
        with wds.TarWriter(hashing, encoder=False, user=TAR_OWNER, group=TAR_OWNER, mode=TAR_MODE,
                           mtime=TAR_MTIME, format="PAX_FORMAT") as writer:
            for key, members in records:
                writer.write({"__key__": key, **members})
    return {"sha256": hashing.sha256.hexdigest(), "bytes": hashing.size}


def shard_name(name: str, number: int) -> str:
    return f"{name}-{number:06d}.tar"


def export_run(run: Path, out: Path, *, format: str = "webdataset", shard_size: int = 1000,
               layout: str = "handsynth", overwrite: bool = False, verify: bool = True,
               mano_dir: Path | None = None) -> ExportSummary:
    """Export the generate run ``run`` as WebDataset shards in ``out`` (see the module docstring).

    Raises InputError on bad options, a run that is not a generate run, missing render-run files,
    or an ``out`` holding an export of other inputs (unless ``overwrite``); OutputError when ``out``
    cannot be written.
    """
    started = time.perf_counter()
    _check_options(format, shard_size, layout)
    source = read_generate_run(run)
    if not source.samples:
        raise InputError("the generate run has no complete sample (no samples/<key>.json yet)", where=run,
                         fix="let `handsynth generate` finish some samples first")
    name = sanitize(source.path.resolve().name)
    builder = RecordBuilder(source, layout, mano_dir)
    chunks = [source.samples[i:i + shard_size] for i in range(0, len(source.samples), shard_size)]
    digests = [_chunk_digest(builder, chunk) for chunk in chunks]
    identity = {"format": format, "layout": layout, "shard_size": shard_size, "name": name,
                "generate_run": str(source.path.resolve()),
                "recipe_sha256": builder.extra["recipe_sha256"], "inputs": source.manifest.get("inputs")}
    out = io.ensure_writable_dir(out)
    earlier = _earlier_index(out, identity, chunks, digests, overwrite)
    _remove_stray_temporaries(out, name)

    entries: list[dict[str, Any]] = []
    written = kept = 0
    with progress("samples") as bar:
        task = bar.add_task("export", total=len(source.samples))
        for number, (chunk, digest) in enumerate(zip(chunks, digests)):
            entry = {"name": shard_name(name, number), "count": len(chunk),
                     "keys": [s.key for s in chunk], "inputs_sha256": digest}
            old = earlier.get(entry["name"])
            if old is not None and not overwrite and _still_complete(out, old, entry):
                entries.append(old)
                kept += 1
                bar.advance(task, len(chunk))
            else:
                records = []
                for sample in chunk:
                    records.append((sample.key, builder(sample)))
                    bar.advance(task)
                entry.update(write_shard(out / entry["name"], records))
                entries.append(entry)
                written += 1
            _write_index(out, identity, entries, source, status="partial")
    _write_index(out, identity, entries, source, status="complete")
    for stale in sorted(set(earlier) - {e["name"] for e in entries}):
        (out / stale).unlink(missing_ok=True)
    summary = ExportSummary(out=out, shards=len(entries), written=written, kept=kept,
                            samples=len(source.samples), incomplete=source.incomplete,
                            bytes=sum(e["bytes"] for e in entries), elapsed_s=time.perf_counter() - started)
    if verify:
        summary.verified = verify_shards(out)
    return summary


def _check_options(format: str, shard_size: int, layout: str) -> None:
    if format not in FORMATS:
        raise InputError(f"unknown export format '{format}'", where="--format",
                         fix=f"use one of: {', '.join(FORMATS)}")
    if layout not in LAYOUTS:
        raise InputError(f"unknown shard layout '{layout}'", where="--layout", fix=f"use one of: {', '.join(LAYOUTS)}")
    if shard_size < 1:
        raise InputError(f"shard size must be >= 1, got {shard_size}", where="--shard-size",
                         fix="pass the number of samples per shard (HaMeR uses about 1000)")


def _chunk_digest(builder: RecordBuilder, chunk: list[Sample]) -> str:
    """sha256 over a shard's sample files and label files: what decides its content besides images."""
    digest = hashlib.sha256()
    for sample in chunk:
        digest.update(sample.key.encode() + b"\0" + sample.record_path.read_bytes() + b"\0"
                      + builder.label_bytes(sample) + b"\0")
    return digest.hexdigest()


def _earlier_index(out: Path, identity: dict[str, Any], chunks: list[list[Sample]], digests: list[str],
                   overwrite: bool) -> dict[str, dict[str, Any]]:
    """Shard entries of an earlier export in ``out`` by name; refuses one of other inputs unless ``overwrite``."""
    path = out / INDEX
    if not path.exists():
        return {}
    index = io.read_json(path, what="shard index")
    shards = {e["name"]: e for e in index.get("shards", []) if isinstance(e, dict) and "name" in e}
    if overwrite:
        return shards
    if index.get("identity") != identity:
        raise InputError(f"{out} holds shards exported from another run or with other settings", where=path,
                         fix="choose another --out, or pass --overwrite to replace them")
    for number, (chunk, digest) in enumerate(zip(chunks, digests)):
        old = shards.get(shard_name(identity["name"], number))
        if old is not None and old.get("keys") == [s.key for s in chunk] and old.get("inputs_sha256") != digest:
            raise InputError(f"the samples or labels of shard {old['name']} changed since it was exported",
                             where=path, fix="choose another --out, or pass --overwrite to replace the shards")
    return shards


def _still_complete(out: Path, old: dict[str, Any], entry: dict[str, Any]) -> bool:
    path = out / old["name"]
    return (old.get("keys") == entry["keys"] and old.get("inputs_sha256") == entry["inputs_sha256"]
            and path.is_file() and path.stat().st_size == old.get("bytes")
            and io.sha256_file(path) == old.get("sha256"))


def _remove_stray_temporaries(out: Path, name: str) -> None:
    """Delete shard temporaries an interrupted export left (only names this writer makes)."""
    for path in out.glob(f".{name}-[0-9][0-9][0-9][0-9][0-9][0-9].tar.*.tmp"):
        path.unlink(missing_ok=True)


def _write_index(out: Path, identity: dict[str, Any], entries: list[dict[str, Any]], source: GenerateRun,
                 status: str) -> None:
    io.write_json_atomic(out / INDEX, {
        "status": status, "identity": identity, "samples": sum(e["count"] for e in entries),
        "incomplete_samples_skipped": source.incomplete, "shards": entries})


# --- verification ---------------------------------------------------------------------------

def _decode_pyd(key: str, data: bytes):
    """WebDataset decoder for ``.pyd`` members: numpy-only unpickling (no code from the file runs)."""
    if key.endswith("pyd"):
        from handsynth.export.hamer import load_pyd

        return load_pyd(data)
    return None


def verify_shards(out: Path) -> VerifySummary:
    """Read every shard listed in ``out/index.json`` back with webdataset and check it.

    Checks per shard: the file's sha256 and size, the sample keys and their order, the count; per
    sample: the json parses and has hands, the generated image decodes, the layout's fields exist.
    Raises InputError listing the problems found.
    """
    import webdataset as wds

    started = time.perf_counter()
    out = Path(out)
    index_path = out / INDEX
    if not index_path.is_file():
        raise InputError(f"{out} holds no shard index ({INDEX})", where=out,
                         fix="point --out to a folder written by `handsynth export`")
    index = io.read_json(index_path, what="shard index")
    layout = index.get("identity", {}).get("layout", "handsynth")
    required = {"json"} | ({"data.pyd"} if layout == "hamer" else {"mesh.png"})
    problems: list[str] = []
    if index.get("status") != "complete":
        problems.append("the index is not complete (the export was interrupted; rerun it)")
    samples = size = 0
    with progress("samples") as bar:
        task = bar.add_task("verify", total=index.get("samples"))
        for entry in index.get("shards", []):
            path = out / entry["name"]
            if not path.is_file():
                problems.append(f"{entry['name']} is missing")
                continue
            size += path.stat().st_size
            if io.sha256_file(path) != entry.get("sha256"):
                problems.append(f"{entry['name']} does not match its sha256 in the index")
                continue
            keys = []
            dataset = wds.WebDataset(str(path), shardshuffle=False, empty_check=False).decode(_decode_pyd, "pil")
            try:
                for sample in dataset:
                    keys.append(sample["__key__"])
                    problems.extend(f"{entry['name']}: {sample['__key__']}: {p}"
                                    for p in _check_sample(sample, required))
                    bar.advance(task)
            except Exception as exc:     # any reader or decoder failure is a finding, not a crash
                problems.append(f"{entry['name']} cannot be read: {type(exc).__name__}: {exc}")
                continue
            if keys != entry.get("keys") or len(keys) != entry.get("count"):
                problems.append(f"{entry['name']} holds {len(keys)} samples with other keys than its index lists")
            samples += len(keys)
    summary = VerifySummary(out=out, shards=len(index.get("shards", [])), samples=samples, bytes=size,
                            elapsed_s=time.perf_counter() - started, problems=problems)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise InputError(f"shard verification found {len(problems)} problem(s): {shown}", where=out,
                         fix="rerun the same `handsynth export` command to rewrite damaged shards")
    return summary


def _check_sample(sample: dict[str, Any], required: set[str]) -> list[str]:
    from PIL import Image

    problems = [f"no '{name}' member" for name in sorted(required - set(sample))]
    images = [sample[ext] for ext in IMAGE_EXTS if ext in sample]
    if len(images) != 1 or not isinstance(images[0], Image.Image):
        problems.append("no decodable generated image (jpg or png)")
    label = sample.get("json")
    if not isinstance(label, dict) or not label.get("hands") or "generation" not in label:
        problems.append("the json member is not a label with hands and a generation block")
    hands = sample.get("data.pyd")
    if "data.pyd" in required and not (isinstance(hands, list) and hands):
        problems.append("data.pyd is not a list of hands")
    return problems

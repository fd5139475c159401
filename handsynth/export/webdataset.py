"""Export a generate run as WebDataset shards pairing each generated image with its ORIGINAL 3D labels.

Shards are ``<out>/<name>-000000.tar``, ``-000001.tar``, ... (``name``: the generate run's folder
name) holding the run's complete samples (those with ``samples/<key>.json``) in sample-index order,
``shard_size`` per shard. Members of sample ``<key>`` (keys have no dots, as WebDataset needs):

- layout ``handsynth`` (default): ``<key>.jpg|png`` the generated image (bytes as generated),
  ``<key>.mesh.png`` the mesh image the model was conditioned on (the render run's global mesh image
  cut and resampled to the generated image's frame), ``<key>.local.jpg|png`` /
  ``<key>.local_mesh.png`` the generated local image and its mesh image (in the local image's frame)
  when present, ``<key>.depth.png`` / ``<key>.local_depth.png`` the depth images likewise when the
  render run has them (``--style depth`` or ``mesh,depth``; a depth-only run has no ``mesh.png``), and
  ``<key>.json``: the render label file (original annotation + derived joints/boxes in SOURCE pixels,
  units and joint order named) with blocks added: ``generation`` (the sample file's fields, the recipe
  sha256 and the model ids from the generate manifest), ``image`` and, with a local image,
  ``local_image`` - each image's labels in its own pixel frame (size, K, from_source, hands'
  joints_2d and boxes), copied from the sample file (see :mod:`handsynth.generate.frame`).
- layout ``hamer``: ``<key>.jpg|png``, ``<key>.data.pyd`` (see :mod:`handsynth.export.hamer`) and
  ``<key>.json`` as above; the local image is a sample of its own, ``<key>-local``, with its own
  ``data.pyd`` and the same ``json``.

Writes are atomic: each shard goes to a temporary name and is renamed when complete; ``index.json``
(the folder's run manifest, see :mod:`handsynth.rundir`: shards, keys, sha256, counts, status) is
rewritten after every shard and marked complete last. Every input is checked against the sha256
its stage recorded before it goes into a shard, so a damaged image stops the export (naming the
file and the command that repairs it) and never lands in a shard. Tar members have fixed owner,
mode and mtime, so reruns give byte-identical shards. A rerun skips shards whose file still matches
the index and rewrites the rest; an index made from other inputs or settings is refused unless
``overwrite``, which replaces only a folder holding an export (an index.json, shards, temporaries).
"""

from __future__ import annotations

import hashlib
import io as _io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from handsynth import io, rundir
from handsynth.console import progress
from handsynth.errors import InputError, MissingResourceError, OutputError
from handsynth.generate import layout as generate_layout
from handsynth.generate.layout import GenerateRun, Sample
from handsynth.keys import sanitize
from handsynth.render import layout as render_layout

STAGE = "export"
FORMATS = ("webdataset",)
LAYOUTS = ("handsynth", "hamer")
GENERATE_STAGE = generate_layout.STAGE
INDEX = "index.json"
IMAGE_EXTS = generate_layout.IMAGE_EXTS
#: Render images (label ``images`` names) -> sample members, when the render run has them.
CONDITION_MEMBERS = {"global": "mesh.png", "local": "local_mesh.png", "depth_global": "depth.png",
                     "depth_local": "local_depth.png"}
TAR_MTIME = 946684800            # 2000-01-01T00:00:00Z for every member: reruns are byte-identical
TAR_OWNER = "handsynth"
TAR_MODE = 0o444
LOCAL_SUFFIX = "-local"          # hamer layout: the key of a sample's local image


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
    filtered: dict[str, Any] | None = None      # the quality gate's record, when one was applied


@dataclass
class VerifySummary:
    out: Path
    shards: int
    samples: int
    bytes: int
    elapsed_s: float
    problems: list[str] = field(default_factory=list)
    full: bool = False                          # every image decoded (else headers only)


# --- one sample -----------------------------------------------------------------------------

class RecordBuilder:
    """Builds the tar records (key, field name -> bytes) of a sample in the chosen layout."""

    def __init__(self, source: GenerateRun, layout: str, mano_dir: Path | None = None,
                 hamer_margin: float | None = None):
        from handsynth.export.hamer import HAMER_MARGIN

        self.source, self.layout = source, layout
        self.hamer_margin = HAMER_MARGIN if hamer_margin is None else hamer_margin
        manifest = source.manifest
        recipe = manifest.get("recipe") if isinstance(manifest.get("recipe"), dict) else {}
        self.extra = {"generate_run": source.path.name, "recipe_sha256": recipe.get("sha256"),
                      "model": manifest.get("model")}
        self.hands_mean = _hands_mean(source.render_run, mano_dir) if layout == "hamer" else None

    def keys(self, sample: Sample) -> list[str]:
        """The tar keys ``sample`` becomes: its key, and ``<key>-local`` for its local image (hamer layout)."""
        if self.layout == "hamer" and sample.local is not None:
            return [sample.key, sample.key + LOCAL_SUFFIX]
        return [sample.key]

    def __call__(self, sample: Sample, digest=None) -> list[tuple[str, dict[str, bytes]]]:
        """The records of ``sample``; its sample file and render label are read once, and fed to ``digest``
        (a hashlib object: the shard's input digest, see :func:`_chunk_digest`) when given."""
        render = self.source.render_run
        record_bytes = io.read_input(sample.record_path, what="sample file")
        label_bytes = render_layout.label_bytes(render, sample.frame)
        if digest is not None:
            _digest_sample(digest, sample, record_bytes, label_bytes)
        label = render_layout.read_label(render, sample.frame, data=label_bytes)
        record = io.parse_json(record_bytes, sample.record_path, what="sample file")
        image = generate_layout.read_output(sample, "image")
        local = generate_layout.read_output(sample, "local") if sample.local is not None else None
        blocks = {"image": _frame_block(sample, record, "image", image, sample.image)}
        if local is not None:
            blocks["local_image"] = _frame_block(sample, record, "local_image", local, sample.local)
        try:
            return self._records(sample, label, record, blocks, image, local)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise InputError(f"the render label of frame {sample.frame} lacks a field export needs or has a "
                             f"malformed one ({type(exc).__name__}: {exc})",
                             where=render_layout.label_path(render, sample.frame),
                             fix="rerun `handsynth render` into a new --out and generate from it") from None

    def _records(self, sample: Sample, label: dict[str, Any], record: dict[str, Any],
                 blocks: dict[str, dict[str, Any]], image: bytes,
                 local: bytes | None) -> list[tuple[str, dict[str, bytes]]]:
        render = self.source.render_run
        generation = {**{k: v for k, v in record.items() if k not in blocks}, **self.extra}
        document = json.dumps({**label, "generation": generation, **blocks}, allow_nan=False).encode()
        images = {sample.image.suffix[1:]: image}
        if self.layout == "hamer":
            from handsynth.export.hamer import encode_pyd, hamer_hands

            def pyd(block: dict[str, Any]) -> bytes:
                return encode_pyd(hamer_hands(label, block, self.hands_mean, self.hamer_margin))

            records = [(sample.key, {**images, "data.pyd": pyd(blocks["image"]), "json": document})]
            if local is not None:
                records.append((sample.key + LOCAL_SUFFIX, {sample.local.suffix[1:]: local,
                                                            "data.pyd": pyd(blocks["local_image"]),
                                                            "json": document}))
            return records
        members = {**images, "json": document}
        for name, member in CONDITION_MEMBERS.items():
            is_local = name.endswith("local")
            rel = label["images"].get(name)
            if rel is None or (is_local and (local is None or not (render / rel).is_file())):
                continue
            members[member] = _condition_in_frame(render_layout.read_image(render, label, name),
                                                  blocks["local_image" if is_local else "image"], is_local)
        if local is not None:
            members[f"local{sample.local.suffix}"] = local
        return [(sample.key, members)]


def _frame_block(sample: Sample, record: dict[str, Any], name: str, data: bytes, image: Path) -> dict[str, Any]:
    """The sample file's ``name`` block (an image's labels in its own frame), checked against the image."""
    from PIL import Image

    from handsynth.generate.frame import frame_of

    block = record.get(name)
    if not isinstance(block, dict):
        raise InputError(f"the sample file has no '{name}' block (labels in the image's own pixel frame); it was "
                         "written by an older handsynth", where=f"{sample.record_path}, field '{name}'",
                         fix="rerun `handsynth generate` into a new --out with this version")
    try:
        frame_of(block)
        if not isinstance(block["hands"], list):
            raise TypeError("'hands' is not a list")
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise InputError(f"the sample file's '{name}' block is malformed ({type(exc).__name__}: {exc})",
                         where=f"{sample.record_path}, field '{name}'",
                         fix="rerun `handsynth generate` into a new --out") from None
    try:
        with Image.open(_io.BytesIO(data)) as img:
            size = list(img.size)
    except OSError as exc:
        raise InputError(f"the generated image cannot be read: {exc}", where=image,
                         fix=generate_layout.REDO) from None
    if size != block["size"]:
        raise InputError(f"the image is {size[0]}x{size[1]} but the sample file records {block['size']}",
                         where=f"{sample.record_path}, field '{name}.size'",
                         fix="rerun `handsynth generate` into a new --out")
    return block


def _condition_in_frame(data: bytes, block: dict[str, Any], local: bool) -> bytes:
    """PNG of a render condition image (mesh or depth) cut and resampled onto an image's frame, as generate
    conditioned on it: a global image (source frame) through ``from_source``; a local one (render's crop)
    resized to the local image."""
    import numpy as np
    from PIL import Image

    from handsynth.generate.frame import frame_of, resample, resize_map
    from handsynth.render.png import encode_png

    with Image.open(_io.BytesIO(data)) as img:
        condition = img.convert("RGB") if img.mode not in ("L", "RGB") else img
        frame = resize_map(condition.size, block["size"]) if local else frame_of(block)
        return encode_png(np.asarray(resample(condition, frame).convert("RGB")))


def _hands_mean(render_run: Path, mano_dir: Path | None) -> dict[str, Any]:
    """MANO's (45,) mean finger pose per side, from ``mano_dir`` or the render run's MANO folder."""
    from handsynth.hand_model import load_mano_arrays, resolve_mano_dir

    used_dir, expected = render_layout.mano_files(render_run)
    folder = mano_dir or used_dir
    if not mano_dir and not folder.is_dir():
        raise MissingResourceError(
            "the hamer layout needs the MANO files the render run used (for MANO's mean hand pose), and "
            f"their folder {folder} is gone", where=f"{render_run / rundir.MANIFEST}, field 'mano.dir'",
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


def write_shard(path: Path, records: Iterable[tuple[str, dict[str, bytes]]]) -> dict[str, Any]:
    """Write ``(key, members)`` records to the shard ``path`` atomically as they come; returns the sha256 and
    size of the bytes written (hashed as they pass, no second read).

    OutputError when the shard cannot be written (e.g. a full disk); any error (a damaged input found while
    ``records`` are made included) removes its temporary file, so no truncated shard is left behind."""
    import webdataset as wds

    try:
        with io.atomic_file(path) as fh:
            hashing = _HashingFile(fh)
            with wds.TarWriter(hashing, encoder=False, user=TAR_OWNER, group=TAR_OWNER, mode=TAR_MODE,
                               mtime=TAR_MTIME, format="PAX_FORMAT") as writer:
                for key, members in records:
                    writer.write({"__key__": key, **members})
    except OSError as exc:
        raise OutputError(f"cannot write the shard: {exc.strerror or exc}", where=path,
                          fix="free disk space (or choose another --out) and rerun the same command: complete "
                              "shards are kept, this one is written again") from None
    return {"sha256": hashing.sha256.hexdigest(), "bytes": hashing.size}


def shard_name(name: str, number: int) -> str:
    return f"{name}-{number:06d}.tar"


def holds_only_an_export(out: Path) -> bool:
    """Whether ``out`` holds an index.json and otherwise only what export writes (shards, temporaries,
    the lock): the only kind of folder ``--overwrite`` replaces when its index cannot be read."""
    if not (out / INDEX).is_file():
        return False
    return all(p.is_file() and (p.name in (INDEX, rundir.LOCK) or p.suffix in (".tar", ".tmp"))
               for p in out.iterdir())


def export_run(run: Path, out: Path, *, format: str = "webdataset", shard_size: int = 1000,
               layout: str = "handsynth", overwrite: bool = False, verify: bool | str = True,
               mano_dir: Path | None = None, command: list[str] | None = None, gate=None,
               hamer_margin: float | None = None) -> ExportSummary:
    """Export the generate run ``run`` as WebDataset shards in ``out`` (see the module docstring).

    ``gate`` (a :class:`handsynth.evaluate.gate.Gate`) keeps only the samples whose evaluation scores
    pass; index.json then records the thresholds and what was dropped and why. ``verify``: check the shards
    afterwards (:func:`verify_shards`): ``True`` / ``"fast"``, ``"full"`` (decode every image) or ``False``.

    Raises InputError on bad options, a run that is not a generate run, missing or damaged input
    files, or an ``out`` holding an export of other inputs (unless ``overwrite``) or anything but an
    export; OutputError when ``out`` cannot be written (a full disk included) or another process
    writes to it.
    """
    started = time.perf_counter()
    _check_options(format, shard_size, layout, hamer_margin)
    verify = "fast" if verify is True else verify
    if verify and verify not in VERIFY_MODES:
        raise InputError(f"unknown verification '{verify}'", where="--verify",
                         fix=f"use --verify fast (default: sha256, keys, JSON, image headers), --verify full "
                             "(also decodes every image) or --no-verify")
    source = generate_layout.read_run(run)
    if not source.samples:
        raise InputError("the generate run has no complete sample (no samples/<key>.json yet)", where=run,
                         fix="let `handsynth generate` finish some samples first")
    filtered = None
    if gate is not None:
        from handsynth.evaluate.gate import apply

        source.samples, filtered = apply(gate, source.path, source.samples)
        if not source.samples:
            raise InputError(f"the quality gate dropped every sample ({filtered['dropped']})", where=run,
                             fix="lower --min-hand-score or raise --max-keypoint-error")
    name = sanitize(source.path.resolve().name)
    builder = RecordBuilder(source, layout, mano_dir, hamer_margin)
    chunks = [source.samples[i:i + shard_size] for i in range(0, len(source.samples), shard_size)]
    identity = {"format": format, "layout": layout, "shard_size": shard_size, "name": name,
                **({"hamer_margin": builder.hamer_margin} if layout == "hamer" else {}),
                "generate_run": str(source.path.resolve()),
                "recipe_sha256": builder.extra["recipe_sha256"], "inputs": source.manifest.get("inputs")}
    if gate is not None:
        identity["filter"] = gate.identity()
    target = rundir.RunDir(out, STAGE, fingerprint=identity, command=command, manifest=INDEX, replace=overwrite,
                           recognise=holds_only_an_export, what="export run")
    # An earlier export in ``out``: every shard's input digest first (to refuse changed inputs and to keep
    # complete shards). Otherwise each digest is computed while its shard is built, from the same reads.
    digests: list[str | None] = [None] * len(chunks)
    if target.check() and not overwrite:
        digests = [_chunk_digest(source, chunk) for chunk in chunks]
        _check_unchanged(target, chunks, digests)

    entries: list[dict[str, Any]] = []
    written = kept = 0
    with target.open(samples=0, incomplete_samples_skipped=source.incomplete,
                     **({"filter": filtered} if filtered else {}), shards=[]):
        out = target.out
        earlier = _earlier_shards(target)
        with progress("samples") as bar:
            task = bar.add_task("export", total=len(source.samples))
            for number, (chunk, digest) in enumerate(zip(chunks, digests)):
                keys = [key for s in chunk for key in builder.keys(s)]
                entry = {"name": shard_name(name, number), "count": len(keys), "keys": keys,
                         "inputs_sha256": digest}
                old = earlier.get(entry["name"])
                if old is not None and not overwrite and _still_complete(out, old, entry):
                    entries.append(old)
                    kept += 1
                    bar.advance(task, len(chunk))
                else:
                    computed = hashlib.sha256() if digest is None else None

                    def records(chunk=chunk, computed=computed):
                        for sample in chunk:
                            yield from builder(sample, computed)
                            bar.advance(task)

                    entry.update(write_shard(out / entry["name"], records()))
                    if computed is not None:
                        entry["inputs_sha256"] = computed.hexdigest()
                    entries.append(entry)
                    written += 1
                target.update(samples=sum(e["count"] for e in entries), shards=entries)
        _remove_stale_shards(target, earlier, {e["name"] for e in entries})
        target.finish(samples=sum(e["count"] for e in entries), shards=entries)
    summary = ExportSummary(out=out, shards=len(entries), written=written, kept=kept,
                            samples=len(source.samples), incomplete=source.incomplete,
                            bytes=sum(e["bytes"] for e in entries), elapsed_s=time.perf_counter() - started,
                            filtered=filtered)
    if verify:
        summary.verified = verify_shards(out, full=verify == "full")
    return summary


def _check_options(format: str, shard_size: int, layout: str, hamer_margin: float | None) -> None:
    if format not in FORMATS:
        raise InputError(f"unknown export format '{format}'", where="--format",
                         fix=f"use one of: {', '.join(FORMATS)}")
    if layout not in LAYOUTS:
        raise InputError(f"unknown shard layout '{layout}'", where="--layout", fix=f"use one of: {', '.join(LAYOUTS)}")
    if shard_size < 1:
        raise InputError(f"shard size must be >= 1, got {shard_size}", where="--shard-size",
                         fix="pass the number of samples per shard (HaMeR uses about 1000)")
    if hamer_margin is not None and not (layout == "hamer" and 1.0 <= hamer_margin <= 10.0):
        raise InputError(f"--hamer-margin {hamer_margin} is not usable with layout '{layout}'",
                         where="--hamer-margin", fix="use it with --layout hamer, between 1.0 and 10.0 (default 2.2)")


def _chunk_digest(source: GenerateRun, chunk: list[Sample]) -> str:
    """sha256 over a shard's sample files and label files: what decides its content besides images (the
    same digest :class:`RecordBuilder` computes while it builds the shard)."""
    digest = hashlib.sha256()
    for sample in chunk:
        _digest_sample(digest, sample, io.read_input(sample.record_path, what="sample file"),
                       render_layout.label_bytes(source.render_run, sample.frame))
    return digest.hexdigest()


def _digest_sample(digest, sample: Sample, record_bytes: bytes, label_bytes: bytes) -> None:
    digest.update(sample.key.encode() + b"\0" + record_bytes + b"\0" + label_bytes + b"\0")


def _earlier_shards(target: rundir.RunDir) -> dict[str, dict[str, Any]]:
    """Shard entries of the earlier export in the folder, by name ({} when there is none or it is replaced
    without a readable index)."""
    shards = (target.earlier or {}).get("shards")
    if not isinstance(shards, list):
        return {}
    return {e["name"]: e for e in shards if isinstance(e, dict) and isinstance(e.get("name"), str)}


def _check_unchanged(target: rundir.RunDir, chunks: list[list[Sample]], digests: list[str]) -> None:
    """Refuse to resume an export whose shards' samples or labels changed since (``--overwrite`` replaces it)."""
    shards = _earlier_shards(target)
    for number, (chunk, digest) in enumerate(zip(chunks, digests)):
        old = shards.get(shard_name(target.fingerprint["name"], number))
        if old is not None and old.get("keys") == [s.key for s in chunk] and old.get("inputs_sha256") != digest:
            raise InputError(f"the samples or labels of shard {old['name']} changed since it was exported",
                             where=target.manifest_path,
                             fix="choose another --out, or pass --overwrite to replace the shards")


def _still_complete(out: Path, old: dict[str, Any], entry: dict[str, Any]) -> bool:
    path = out / old["name"]
    return (old.get("keys") == entry["keys"] and old.get("inputs_sha256") == entry["inputs_sha256"]
            and path.is_file() and path.stat().st_size == old.get("bytes")
            and io.sha256_file(path) == old.get("sha256"))


def _remove_stale_shards(target: rundir.RunDir, earlier: dict[str, dict[str, Any]], current: set[str]) -> None:
    """Delete shards of the earlier export that this one does not have; when replacing a folder whose index
    could not be read, every shard file not written now."""
    stale = set(earlier)
    if target.replacing and not earlier:
        stale |= {p.name for p in target.out.glob("*.tar")}
    for name in sorted(stale - current):
        (target.out / name).unlink(missing_ok=True)


# --- verification ---------------------------------------------------------------------------

VERIFY_MODES = ("fast", "full")


class _HashingReader:
    """A read-only file wrapper hashing the bytes as they are read (one pass: parse and hash)."""

    def __init__(self, fh, digest):
        self.fh, self.digest = fh, digest

    def read(self, size: int = -1) -> bytes:
        data = self.fh.read(size)
        self.digest.update(data)
        return data

    def drain(self) -> None:
        """Read (and hash) the rest of the file."""
        while self.read(1 << 20):
            pass


def verify_shards(out: Path, *, full: bool = False, workers: int | None = None) -> VerifySummary:
    """Read every shard listed in ``out/index.json`` back and check it, shards in parallel (``workers``
    threads; default: one per CPU, at most 8).

    Checks: the export finished; no ``.tar`` file in ``out`` is missing from the index; per shard, read once
    through webdataset's tar reader while hashed: the file's sha256 and size, the sample keys and their
    order, the count; per sample: the layout's members exist, the json parses and has hands and a
    generation block, every image member's header names its format and the generated image's size is the
    one its json block records, data.pyd (hamer) loads. ``full``: every image is also decoded to its last
    pixel. Raises InputError listing the problems found.
    """
    from concurrent.futures import ThreadPoolExecutor

    started = time.perf_counter()
    out = Path(out)
    index_path = out / INDEX
    if not index_path.is_file():
        raise InputError(f"{out} holds no shard index ({INDEX})", where=out,
                         fix="point --out to a folder written by `handsynth export`")
    index = io.read_json(index_path, what="shard index")
    shards = index.get("shards") if isinstance(index, dict) else None
    if not isinstance(shards, list) or not all(isinstance(e, dict) and isinstance(e.get("name"), str)
                                               for e in shards):
        raise InputError("the shard index does not list shards", where=f"{index_path}, field 'shards'",
                         fix="rerun the `handsynth export` command that wrote it, with --overwrite")
    fingerprint = index.get("fingerprint") or {}
    layout = fingerprint.get("layout", "handsynth") if isinstance(fingerprint, dict) else "handsynth"
    required = {"json"} | ({"data.pyd"} if layout == "hamer" else set())
    problems: list[str] = []
    if index.get("status") != rundir.COMPLETE:
        problems.append(f"the export did not finish (it {rundir.describe_status(out, index)}; rerun it)")
    unlisted = sorted(p.name for p in out.glob("*.tar") if p.name not in {e["name"] for e in shards})
    problems.extend(f"{name} is not listed in {INDEX} (not part of this export)" for name in unlisted)
    workers = workers or min(8, os.cpu_count() or 1)
    with progress("samples") as bar:
        task = bar.add_task("verify", total=index.get("samples"))
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(shards)))) as pool:
            results = list(pool.map(lambda entry: _verify_shard(out / entry["name"], entry, required, full,
                                                                lambda: bar.advance(task)), shards))
    samples = size = 0
    for n, nbytes, found in results:
        samples, size = samples + n, size + nbytes
        problems.extend(found)
    summary = VerifySummary(out=out, shards=len(shards), samples=samples, bytes=size,
                            elapsed_s=time.perf_counter() - started, problems=problems, full=full)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        fix = "rerun the same `handsynth export` command to rewrite damaged shards"
        if unlisted:
            fix = (f"move the .tar files {INDEX} does not list out of {out} (a reader globbing *.tar would take "
                   "them for part of the dataset), then " + fix)
        raise InputError(f"shard verification found {len(problems)} problem(s): {shown}", where=out, fix=fix)
    return summary


def _verify_shard(path: Path, entry: dict[str, Any], required: set[str], full: bool,
                  advance) -> tuple[int, int, list[str]]:
    """(samples, bytes, problems) of one shard, read once (see :func:`verify_shards`)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    name = entry["name"]
    if not path.is_file():
        return 0, 0, [f"{name} is missing"]
    digest, keys, problems, failure = hashlib.sha256(), [], [], None
    with open(path, "rb") as fh:
        reader = _HashingReader(fh, digest)
        try:
            for sample in group_by_keys(tar_file_expander([{"url": str(path), "stream": reader}], eof_value=None)):
                keys.append(sample["__key__"])
                problems.extend(f"{name}: {sample['__key__']}: {p}" for p in _check_sample(sample, required, full))
                advance()
        except Exception as exc:     # any reader or decoder failure is a finding, not a crash
            failure = f"{name} cannot be read: {type(exc).__name__}: {exc.args[0] if exc.args else exc}"
        reader.drain()
    size = path.stat().st_size
    if digest.hexdigest() != entry.get("sha256"):
        return 0, size, [f"{name} does not match its sha256 in the index"]
    if failure is not None:
        return 0, size, [failure]
    if keys != entry.get("keys") or len(keys) != entry.get("count"):
        problems.append(f"{name} holds {len(keys)} samples with other keys than its index lists")
    return len(keys), size, problems


def _check_sample(sample: dict[str, Any], required: set[str], full: bool) -> list[str]:
    """Problems of one sample's raw members (see :func:`verify_shards`)."""
    problems = [f"no '{name}' member" for name in sorted(required - set(sample))]
    if "data.pyd" not in required and not {"mesh.png", "depth.png"} & set(sample):
        problems.append("no condition image member (mesh.png or depth.png)")
    sizes = {}
    for member, data in sample.items():
        ext = member.rsplit(".", 1)[-1]
        if ext in IMAGE_EXTS and isinstance(data, bytes):
            sizes[member] = _image_size(data, ext, full)
            if sizes[member] is None:
                problems.append(f"{member} is no {'decodable ' if full else ''}{ext} image")
    generated = [ext for ext in IMAGE_EXTS if ext in sample]
    if len(generated) != 1:
        problems.append("no generated image (jpg or png)")
    try:
        label = json.loads(sample["json"]) if isinstance(sample.get("json"), bytes) else None
    except ValueError:
        label = None
    if not isinstance(label, dict) or not label.get("hands") or "generation" not in label:
        problems.append("the json member is not a label with hands and a generation block")
    elif len(generated) == 1 and sizes[generated[0]] is not None:
        frame = "local_image" if sample["__key__"].endswith(LOCAL_SUFFIX) and "local_image" in label else "image"
        block = label.get(frame)
        if isinstance(block, dict) and list(sizes[generated[0]]) != block.get("size"):
            problems.append(f"the generated image is {sizes[generated[0]]} but the json's {frame} block says "
                            f"{block.get('size')}")
    if "data.pyd" in required and "data.pyd" in sample:
        from handsynth.export.hamer import load_pyd

        try:
            hands = load_pyd(sample["data.pyd"])
        except Exception:        # a malformed or unsafe pickle is a finding
            hands = None
        if not isinstance(hands, list):
            problems.append("data.pyd is not a list of hands")
    return problems


def _image_size(data: bytes, ext: str, full: bool) -> tuple[int, int] | None:
    """(width, height) from the image's header (``full``: after decoding every pixel); None when the
    header is not a ``ext`` image or (``full``) the pixels do not decode."""
    from PIL import Image

    try:
        with Image.open(_io.BytesIO(data)) as img:
            if img.format != {"jpg": "JPEG", "png": "PNG"}[ext]:
                return None
            if full:
                img.load()
            return img.size
    except Exception:            # any decoder failure: not an image
        return None

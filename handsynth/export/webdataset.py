"""Export a generate run as WebDataset shards pairing each generated image with its ORIGINAL 3D labels.

Shards are ``<out>/<name>-000000.tar``, ``-000001.tar``, ... (``name``: the generate run's folder
name) holding the run's complete samples (those with ``samples/<key>.json``) in sample-index order,
``shard_size`` per shard. Members of sample ``<key>`` (keys have no dots, as WebDataset needs):

- layout ``handsynth`` (default): ``<key>.jpg|png`` the generated image (bytes as generated),
  ``<key>.mesh.png`` the render run's global mesh image, ``<key>.local.jpg|png`` /
  ``<key>.local_mesh.png`` the generated local image and its mesh image when present,
  ``<key>.depth.png`` / ``<key>.local_depth.png`` the depth images when the render run has them
  (``--style depth`` or ``mesh,depth``; a depth-only run has no ``mesh.png``), and
  ``<key>.json``: the render label file (original annotation + derived joints/boxes, units and
  joint order named) with a ``generation`` block added (the sample file's fields, the generated
  image size, the recipe sha256 and the model ids from the generate manifest).
- layout ``hamer``: ``<key>.jpg|png``, ``<key>.data.pyd`` (see :mod:`handsynth.export.hamer`) and
  ``<key>.json`` as above.

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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

    def __call__(self, sample: Sample) -> dict[str, bytes]:
        from PIL import Image

        render = self.source.render_run
        label = render_layout.read_label(render, sample.frame, needed_by=f"sample {sample.key}")
        image = generate_layout.read_output(sample, "image")
        try:
            with Image.open(_io.BytesIO(image)) as img:
                size = img.size
        except OSError as exc:
            raise InputError(f"the generated image cannot be read: {exc}", where=sample.image,
                             fix=generate_layout.REDO) from None
        try:
            return self._members(sample, label, image, size)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise InputError(f"the render label of frame {sample.frame} lacks a field export needs or has a "
                             f"malformed one ({type(exc).__name__}: {exc})",
                             where=render_layout.label_path(render, sample.frame),
                             fix="rerun `handsynth render` into a new --out and generate from it") from None

    def _members(self, sample: Sample, label: dict[str, Any], image: bytes,
                 size: tuple[int, int]) -> dict[str, bytes]:
        render = self.source.render_run
        generation = {**io.read_json(sample.record_path, what="sample file"), **self.extra,
                      "image_size": list(size)}
        members = {sample.image.suffix[1:]: image,
                   "json": json.dumps({**label, "generation": generation}, allow_nan=False).encode()}
        if self.layout == "hamer":
            from handsynth.export.hamer import encode_pyd, hamer_hands

            members["data.pyd"] = encode_pyd(hamer_hands(label, size, self.hands_mean))
            return members
        for name, member in CONDITION_MEMBERS.items():
            rel = label["images"].get(name)
            if rel is None or (name.endswith("local") and not (render / rel).is_file()):
                continue
            members[member] = render_layout.read_image(render, label, name)
        if sample.local is not None:
            members[f"local{sample.local.suffix}"] = generate_layout.read_output(sample, "local")
        return members


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


def write_shard(path: Path, records: list[tuple[str, dict[str, bytes]]]) -> dict[str, Any]:
    """Write ``(key, members)`` records to the shard ``path`` atomically; returns sha256 and size.

    OutputError when the shard cannot be written (e.g. a full disk): its temporary file is removed, so
    no truncated shard is left behind."""
    import webdataset as wds

    try:
        with io.atomic_path(path) as tmp, open(tmp, "wb") as fh:
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
               layout: str = "handsynth", overwrite: bool = False, verify: bool = True,
               mano_dir: Path | None = None, command: list[str] | None = None, gate=None) -> ExportSummary:
    """Export the generate run ``run`` as WebDataset shards in ``out`` (see the module docstring).

    ``gate`` (a :class:`handsynth.evaluate.gate.Gate`) keeps only the samples whose evaluation scores
    pass; index.json then records the thresholds and what was dropped and why.

    Raises InputError on bad options, a run that is not a generate run, missing or damaged input
    files, or an ``out`` holding an export of other inputs (unless ``overwrite``) or anything but an
    export; OutputError when ``out`` cannot be written (a full disk included) or another process
    writes to it.
    """
    started = time.perf_counter()
    _check_options(format, shard_size, layout)
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
    builder = RecordBuilder(source, layout, mano_dir)
    chunks = [source.samples[i:i + shard_size] for i in range(0, len(source.samples), shard_size)]
    digests = [_chunk_digest(source, chunk) for chunk in chunks]
    identity = {"format": format, "layout": layout, "shard_size": shard_size, "name": name,
                "generate_run": str(source.path.resolve()),
                "recipe_sha256": builder.extra["recipe_sha256"], "inputs": source.manifest.get("inputs")}
    if gate is not None:
        identity["filter"] = gate.identity()
    target = rundir.RunDir(out, STAGE, fingerprint=identity, command=command, manifest=INDEX, replace=overwrite,
                           recognise=holds_only_an_export, what="export run")
    if target.check():
        _check_unchanged(target, chunks, digests, overwrite)

    entries: list[dict[str, Any]] = []
    written = kept = 0
    with target.open(samples=0, incomplete_samples_skipped=source.incomplete,
                     **({"filter": filtered} if filtered else {}), shards=[]):
        out = target.out
        earlier = _earlier_shards(target)
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
                target.update(samples=sum(e["count"] for e in entries), shards=entries)
        _remove_stale_shards(target, earlier, {e["name"] for e in entries})
        target.finish(samples=sum(e["count"] for e in entries), shards=entries)
    summary = ExportSummary(out=out, shards=len(entries), written=written, kept=kept,
                            samples=len(source.samples), incomplete=source.incomplete,
                            bytes=sum(e["bytes"] for e in entries), elapsed_s=time.perf_counter() - started,
                            filtered=filtered)
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


def _chunk_digest(source: GenerateRun, chunk: list[Sample]) -> str:
    """sha256 over a shard's sample files and label files: what decides its content besides images."""
    digest = hashlib.sha256()
    for sample in chunk:
        digest.update(sample.key.encode() + b"\0" + sample.record_path.read_bytes() + b"\0"
                      + render_layout.label_bytes(source.render_run, sample.frame) + b"\0")
    return digest.hexdigest()


def _earlier_shards(target: rundir.RunDir) -> dict[str, dict[str, Any]]:
    """Shard entries of the earlier export in the folder, by name ({} when there is none or it is replaced
    without a readable index)."""
    shards = (target.earlier or {}).get("shards")
    if not isinstance(shards, list):
        return {}
    return {e["name"]: e for e in shards if isinstance(e, dict) and isinstance(e.get("name"), str)}


def _check_unchanged(target: rundir.RunDir, chunks: list[list[Sample]], digests: list[str], overwrite: bool) -> None:
    """Refuse (unless ``overwrite``) to resume an export whose shards' samples or labels changed since."""
    if overwrite:
        return
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

def _decode_pyd(key: str, data: bytes):
    """WebDataset decoder for ``.pyd`` members: numpy-only unpickling (no code from the file runs)."""
    if key.endswith("pyd"):
        from handsynth.export.hamer import load_pyd

        return load_pyd(data)
    return None


def verify_shards(out: Path) -> VerifySummary:
    """Read every shard listed in ``out/index.json`` back with webdataset and check it.

    Checks: the export finished; no ``.tar`` file in ``out`` is missing from the index; per shard: the
    file's sha256 and size, the sample keys and their order, the count; per sample: the json parses and
    has hands, the generated image decodes, the layout's fields exist. Raises InputError listing the
    problems found.
    """
    import webdataset as wds

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
    samples = size = 0
    with progress("samples") as bar:
        task = bar.add_task("verify", total=index.get("samples"))
        for entry in shards:
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
    summary = VerifySummary(out=out, shards=len(shards), samples=samples, bytes=size,
                            elapsed_s=time.perf_counter() - started, problems=problems)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        fix = "rerun the same `handsynth export` command to rewrite damaged shards"
        if unlisted:
            fix = (f"move the .tar files {INDEX} does not list out of {out} (a reader globbing *.tar would take "
                   "them for part of the dataset), then " + fix)
        raise InputError(f"shard verification found {len(problems)} problem(s): {shown}", where=out, fix=fix)
    return summary


def _check_sample(sample: dict[str, Any], required: set[str]) -> list[str]:
    from PIL import Image

    problems = [f"no '{name}' member" for name in sorted(required - set(sample))]
    if "data.pyd" not in required and not {"mesh.png", "depth.png"} & set(sample):
        problems.append("no condition image member (mesh.png or depth.png)")
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

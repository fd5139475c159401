"""The evaluate stage: a generate run (and a real set) -> summary.json, samples.jsonl, report.html.

Output folder (default ``<run>/evaluation``)::

    summary.json     every figure for the generated and the real set, the paper's Table 1 row, the protocol
                     (models and their sha256, crop rule, resize, thresholds, sample counts), what was skipped
    samples.jsonl    one line per generated sample: per hand score, 2D/3D errors, PCK, handedness agreement,
                     and the two numbers export's gate reads (hand_score, keypoint_error)
    report.html      self-contained: histograms and contact sheets of the best and worst samples
    cache/           per-chunk results (Inception features, keypoint scores) reused by a rerun

Images are streamed in chunks of ``CHUNK`` (never all in memory); a chunk whose inputs (image bytes,
labels) and protocol (model hashes, crop rule) are unchanged is read back from ``cache/`` instead of
recomputed. Every file is written atomically.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from handsynth import io, rundir
from handsynth.console import console, progress
from handsynth.errors import InputError
from handsynth.evaluate import hands as hands_mod
from handsynth.evaluate.distribution import KID_SEED, KID_SUBSET_SIZE, KID_SUBSETS, extract, fid_kid
from handsynth.evaluate.inputs import Item

STAGE = "evaluate"
CHUNK = 64
SUMMARY, SAMPLES, REPORT, CACHE = "summary.json", "samples.jsonl", "report.html", "cache"
PAPER_TABLE1 = {   # AttentionHand w/ TAS, paper Table 1 (MSCOCO); its detector and units are not published
    "method": "AttentionHand w/ TAS (paper Table 1, MSCOCO)", "fid": 20.71, "kid": 0.00301, "fid_h": 27.09,
    "kid_h": 0.01287, "hand_conf": 0.965, "mse_2d": 1.026, "mse_3d": 1.986}


@dataclass
class SetResult:
    """Features and per-item records of one image set."""

    name: str
    items: list[Item]
    full: np.ndarray | None = None          # (N, F) whole-image features
    hand: np.ndarray | None = None          # (M, F) hand-crop features
    records: list[dict[str, Any]] = field(default_factory=list)
    reused_chunks: int = 0


class Evaluator:
    """Computes one chunk of items: features (when an extractor is given) and keypoint scores (when a
    landmarker is given)."""

    def __init__(self, extractor=None, landmarker=None, *, crop_scale: float = hands_mod.CROP_SCALE,
                 device: str = "cpu"):
        self.extractor, self.landmarker = extractor, landmarker
        self.crop_scale, self.device = crop_scale, device

    def __call__(self, items: list[Item]) -> tuple[np.ndarray | None, np.ndarray | None, list[dict[str, Any]]]:
        from PIL import Image

        full_images, crops, records = [], [], []
        for item in items:
            try:
                with Image.open(item.image) as img:
                    rgb = img.convert("RGB")
            except (OSError, Image.DecompressionBombError) as exc:
                raise InputError(f"cannot read the image: {exc}", where=item.image,
                                 fix="delete it and rerun the stage that wrote it") from None
            pixels = np.asarray(rgb)
            record: dict[str, Any] = {"key": item.key, **item.info}
            if self.landmarker is not None and item.hands:
                record.update(hands_mod.score_sample(item.hands, self.landmarker.detect(pixels)))
            records.append(record)
            if self.extractor is not None:
                full_images.append(pixels)
                crops.extend(hands_mod.hand_crops(rgb, item.hands, self.crop_scale))
        if self.extractor is None:
            return None, None, records
        full = extract(self.extractor, full_images, self.device)
        hand = extract(self.extractor, crops, self.device) if crops else \
            np.zeros((0, full.shape[1]), dtype=np.float32)
        return full, hand, records


def _without_paths(value: Any) -> Any:
    """``value`` less its "file" entries: a model file that moved but kept its sha256 is the same model."""
    if isinstance(value, dict):
        return {k: _without_paths(v) for k, v in value.items() if k != "file"}
    return value


def _chunk_digest(protocol: dict[str, Any], items: list[Item]) -> str:
    digest = hashlib.sha256(json.dumps(_without_paths(protocol), sort_keys=True).encode())
    for item in items:
        digest.update(item.key.encode() + b"\0" + io.sha256_file(item.image).encode() + b"\0")
        for h in item.hands:
            digest.update(json.dumps([h.side, h.joints_2d.tolist(), h.box.tolist(),
                                      None if h.joints_cam is None else h.joints_cam.tolist()]).encode())
    return digest.hexdigest()


def _load_chunk(path: Path, items: list[Item]):
    try:
        with np.load(path, allow_pickle=False) as data:
            if list(data["keys"]) != [i.key for i in items]:
                return None
            records = [json.loads(r) for r in data["records"]]
            full = data["full"] if "full" in data else None
            hand = data["hand"] if "hand" in data else None
    except (OSError, ValueError, KeyError):
        return None     # a damaged cache file is recomputed
    return full, hand, records


def _save_chunk(path: Path, items: list[Item], full, hand, records) -> None:
    arrays = {"keys": np.array([i.key for i in items]), "records": np.array([json.dumps(r) for r in records])}
    if full is not None:
        arrays.update(full=full, hand=hand)
    with io.atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def evaluate_set(name: str, items: list[Item], evaluator: Evaluator, cache: Path,
                 protocol: dict[str, Any]) -> SetResult:
    """Run ``evaluator`` over ``items`` chunk by chunk, reusing cached chunks; removes stale cache files."""
    result = SetResult(name, items)
    fulls, hands_, used = [], [], set()
    with progress("images") as bar:
        task = bar.add_task(f"evaluate {name}", total=len(items))
        for start in range(0, len(items), CHUNK):
            chunk = items[start:start + CHUNK]
            path = cache / f"{name}-{_chunk_digest(protocol, chunk)[:32]}.npz"
            used.add(path.name)
            loaded = _load_chunk(path, chunk) if path.is_file() else None
            if loaded is None:
                loaded = evaluator(chunk)
                _save_chunk(path, chunk, *loaded)
            else:
                result.reused_chunks += 1
            full, hand, records = loaded
            if full is not None:
                fulls.append(full)
                hands_.append(hand)
            result.records.extend(records)
            bar.advance(task, len(chunk))
    for stale in cache.glob(f"{name}-*.npz"):
        if stale.name not in used:
            stale.unlink(missing_ok=True)
    if fulls:
        result.full, result.hand = np.concatenate(fulls), np.concatenate(hands_)
    return result


def distribution_figures(real: SetResult, fake: SetResult) -> dict[str, Any]:
    """FID/KID on whole images and FID-H/KID-H on hand crops, or the reason each was skipped."""
    out: dict[str, Any] = {}
    for suffix, a, b in (("", real.full, fake.full), ("_h", real.hand, fake.hand)):
        try:
            if a is None or b is None:
                raise ValueError("no features")
            figures = fid_kid(a, b)
            if not all(np.isfinite(figures[k]) for k in ("fid", "kid", "kid_std")):
                raise ValueError(f"the features gave a non-finite value ({figures})")
        except ValueError as exc:
            out[f"fid{suffix}"] = out[f"kid{suffix}"] = None
            out[f"skipped{suffix}"] = str(exc)
            continue
        out[f"fid{suffix}"], out[f"kid{suffix}"] = figures.pop("fid"), figures.pop("kid")
        out[f"kid{suffix}_std"] = figures.pop("kid_std")
        out[f"counts{suffix}"] = figures
    return out


def write_samples(out: Path, records: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in records)
    io.write_bytes_atomic(out / SAMPLES, text.encode())


def protocol_record(*, inception: dict[str, Any] | None, hand_model: dict[str, Any] | None,
                    crop_scale: float, landmarker_settings: dict[str, Any] | None) -> dict[str, Any]:
    from handsynth.evaluate.inception import RESIZE

    return {
        "inception": inception, "hand_model": hand_model, "landmarker": landmarker_settings,
        "resize": RESIZE if inception else None,
        "crop": {"rule": "each labelled hand's tight mesh box, squared about its centre and enlarged "
                         f"{crop_scale}x, in the image's own pixel frame; cut at {hands_mod.CROP_SIZE}x"
                         f"{hands_mod.CROP_SIZE} with bicubic resampling, black beyond the image border",
                 "scale": crop_scale, "size": hands_mod.CROP_SIZE},
        "kid": {"subsets": KID_SUBSETS, "subset_size": KID_SUBSET_SIZE, "degree": 3, "seed": KID_SEED},
        "matching": f"detections match labelled hands by IoU >= {hands_mod.MATCH_IOU} of their keypoint boxes "
                    f"squared and enlarged {hands_mod.MATCH_SCALE}x, one to one (Hungarian)",
        "handedness": "MediaPipe labels hands as in a mirrored image; its label is swapped before comparing",
        "pck_thresholds": list(hands_mod.PCK_THRESHOLDS), "units": hands_mod.UNITS,
    }


def run_evaluation(generated: list[Item], real: list[Item] | None, out: Path, *, extractor=None,
                   landmarker=None, protocol: dict[str, Any], skipped: dict[str, str], inputs: dict[str, Any],
                   device: str = "cpu", command: list[str] | None = None,
                   shared: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate ``generated`` against ``real`` into ``out``; returns the summary written to summary.json.
    ``shared``: a dict kept across the evaluations of several runs against the same ``real`` items and
    protocol; the real set is then computed for the first of them only."""
    from handsynth.evaluate.report import write_report

    started = time.perf_counter()
    out = io.ensure_writable_dir(out)
    lock = rundir.Lock(out / rundir.LOCK)     # one evaluation at a time writes ``out``
    if not lock.acquire(command if command is not None else sys.argv):
        raise rundir.busy(out, lock)
    with lock:
        cache = out / CACHE
        cache.mkdir(exist_ok=True)
        evaluator = Evaluator(extractor, landmarker, crop_scale=protocol["crop"]["scale"], device=device)
        fake = evaluate_set("generated", generated, evaluator, cache, protocol)
        sets = {"generated": fake}
        figures: dict[str, Any] = {"generated": {}, "real": {}}
        if real:
            if shared is not None and "real" in shared:
                sets["real"] = shared["real"]
            else:
                sets["real"] = evaluate_set("real", real, evaluator, cache, protocol)
                if shared is not None:
                    shared["real"] = sets["real"]
            if extractor is not None:
                figures["generated"].update(distribution_figures(sets["real"], fake))
                # the real set against itself split in two halves: how low FID/KID go for real images
                halves = _halves(sets["real"])
                figures["real"].update(distribution_figures(*halves))
                figures["real"]["note"] = ("FID/KID of the real set's first half against its second half (the floor "
                                           "for this set size)")
        if landmarker is not None:
            for name, result in sets.items():
                figures[name].update(hands_mod.aggregate([r for r in result.records if "hands" in r]))
        write_samples(out, fake.records)
        summary = rundir.new_manifest(
            STAGE, command, status="complete", inputs=inputs, protocol=protocol, skipped=skipped,
            counts={name: {"images": len(r.items), "hands": sum(len(i.hands) for i in r.items),
                           "reused_chunks": r.reused_chunks} for name, r in sets.items()},
            figures=figures, paper=PAPER_TABLE1, elapsed_s=round(time.perf_counter() - started, 3))
        write_report(out, summary, fake)
        io.write_json_atomic(out / SUMMARY, summary)
        return summary


def _halves(result: SetResult) -> tuple[SetResult, SetResult]:
    """The set split into even and odd positions (features only)."""
    a, b = SetResult(result.name, result.items[0::2]), SetResult(result.name, result.items[1::2])
    if result.full is not None:
        a.full, b.full = result.full[0::2], result.full[1::2]
        a.hand, b.hand = result.hand[0::2], result.hand[1::2]
    return a, b


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {message}", soft_wrap=True)

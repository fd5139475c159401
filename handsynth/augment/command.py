"""``handsynth augment``: a label set -> new, exactly labelled hand configurations as handsynth JSON Lines."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from handsynth.console import console, print_defaults, progress, stdout
from handsynth.errors import InputError, OutputError

if TYPE_CHECKING:
    from handsynth.augment.recipe import AugmentRecipe


def summary_path(out: Path) -> Path:
    """The summary JSON beside the output: new.jsonl -> new.summary.json."""
    return out.with_name(f"{out.stem if out.suffix == '.jsonl' else out.name}.summary.json")


def augment(
    labels: Annotated[Path, typer.Option(
        help="Source labels: any label file `handsynth render` reads (InterHand2.6M, MSCOCO NeuralAnnot, "
             "handsynth JSON Lines).", show_default=False)],
    count: Annotated[int, typer.Option("--count", "-n", min=1, help="Number of new frames (indices 0..N-1).",
                                       show_default=False)],
    out: Annotated[Path, typer.Option(
        help="Output handsynth JSON Lines file (render reads it as is); the summary goes beside it as "
             "<name>.summary.json.", show_default=False)],
    recipe: Annotated[Optional[Path], typer.Option(
        "--recipe", "-r", help="Augmentation recipe YAML (default: the built-in defaults, the same as the "
                               "commented shipped recipe: handsynth recipes copy augment).")] = None,
    format: Annotated[Optional[str], typer.Option(
        "--format", help="Label format, when detection from the content should be overridden: "
                         "interhand26m, coco-neuralannot or handsynth-jsonl.")] = None,
    mano_dir: Annotated[Optional[Path], typer.Option(
        envvar="HANDSYNTH_MANO_DIR",
        help="Folder with MANO_RIGHT.pkl and MANO_LEFT.pkl (or a mano/ subfolder holding them).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out file (and its summary).")] = False,
) -> None:
    """Make new, exactly labelled hand frames: new viewpoints, poses, shapes and two-hand placements.

    Frame i is a pure function of the recipe seed and i, records its source frame and every change applied, and is written as handsynth JSON Lines that `handsynth render --labels OUT` reads.

    A summary (distance of the new poses to the source poses, viewpoint coverage, rejections) is printed and written beside the output. An existing --out is kept unless --overwrite.
    """
    from handsynth.augment.recipe import AugmentRecipe, load_augment_recipe

    if recipe is None:
        loaded, defaults = AugmentRecipe(), {}
        print_defaults({"--recipe": "built-in defaults (as in the shipped augment recipe)"})
    else:
        loaded, defaults = load_augment_recipe(recipe)
        if defaults:
            console.print(f"[dim]using recipe defaults: {', '.join(f'{k}={v!r}' for k, v in defaults.items())}[/dim]")
    summary = augment_labels(labels, loaded, count=count, out=out, format=format, mano_dir=mano_dir,
                             overwrite=overwrite, recipe_path=recipe)
    stdout.print(format_summary(summary), soft_wrap=True)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.is_dir():
        raise OutputError("--out is a folder; augment writes one JSON Lines file", where=out,
                          fix="name a file such as new.jsonl")
    if out.exists() and not overwrite:
        raise OutputError("the output file exists and would be replaced", where=out,
                          fix="pass --overwrite to replace it, or choose another --out")


def augment_labels(labels: Path, recipe: AugmentRecipe, *, count: int, out: Path, format: str | None = None,
                   mano_dir: Path | None = None, overwrite: bool = False,
                   recipe_path: Path | None = None) -> dict[str, Any]:
    """Generate frames 0..count-1, write ``out`` and its summary atomically; returns the summary."""
    import numpy as np
    import torch

    from handsynth import io
    from handsynth.augment import summary as stats
    from handsynth.augment.sample import Augmenter
    from handsynth.hand_model import HandModel
    from handsynth.labels import read_labels

    started = time.perf_counter()
    out = Path(out)
    _check_out(out, overwrite)
    label_set = read_labels(Path(labels), format)
    model = HandModel(mano_dir, dtype=torch.float64)
    try:
        augmenter = Augmenter(recipe, label_set.frames, model)
    except ValueError:
        raise InputError("no frame of the label file has a valid hand to start from", where=labels,
                         fix="check the labels (hands marked invalid, or all frames skipped: "
                             f"{label_set.skipped or 'none'})") from None
    io.ensure_writable_dir(out.parent)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # MANO on one or two hands: the thread pool costs more than it saves
    results = []
    try:
        with progress("frames") as bar:
            task = bar.add_task("augment", total=count)
            for index in range(count):
                results.append(augmenter.frame(index))
                bar.advance(task)
    finally:
        torch.set_num_threads(threads)

    accepted = [r.candidate for r in results if r.candidate is not None]
    lines = [json.dumps(c.record, allow_nan=False) for c in accepted]
    rejections = sum((r.rejections for r in results), Counter())
    rejected_sources = sum((r.rejected_sources for r in results), Counter())
    used = Counter(c.record["augment"]["source"]["key"] for c in accepted)

    distances: dict[str, Any] = {}
    for side in ("right", "left"):
        new = np.array([p for c in accepted for s, p in c.hands if s == side]).reshape(-1, 48)
        src = np.array([h.pose for _, h in augmenter.pool[side]]).reshape(-1, 48)
        if not len(new) or not len(src):
            continue
        new_rot, src_rot = (np.stack([augmenter.total_rotations(side, p) for p in poses]) for poses in (new, src))
        distances[side] = stats.pose_distances(new_rot, stats.canonical_joints(model.forward, side, new),
                                               src_rot, stats.canonical_joints(model.forward, side, src))
    views = [(c.azimuth_deg, c.elevation_deg) for c in accepted if c.azimuth_deg is not None]
    summary = {
        "output": str(out), "labels": str(labels), "format": label_set.format,
        "recipe": str(recipe_path) if recipe_path else None, "settings": recipe.model_dump(mode="json"),
        "mano": {"dir": str(model.root), "files": model.file_hashes()},
        "requested": count, "written": len(lines), "failed_frames": [r.index for r in results if r.candidate is None],
        "source_frames": len(augmenter.sources),
        "source_hands": {side: len(augmenter.pool[side]) for side in ("right", "left")},
        "rejections": {"total": int(sum(rejections.values())), **dict(sorted(rejections.items()))},
        "rejections_by_source": dict(rejected_sources.most_common(20)),      # the 20 most rejected source frames
        "frames_by_source": {"sources_used": len(used), "most_used": dict(used.most_common(20))},
        "attempts_per_frame": {"max": recipe.max_attempts,
                               "mean": float(np.mean([sum(r.rejections.values()) + (r.candidate is not None)
                                                      for r in results]))},
        "joints_clipped_to_limits": int(sum(c.clipped_joints for c in accepted)),
        "pose_distance": distances,
        "viewpoint_coverage": stats.coverage([a for a, _ in views], [e for _, e in views]) if views else None,
        "elapsed_s": round(time.perf_counter() - started, 3),
    }
    io.write_bytes_atomic(out, ("\n".join(lines) + "\n" if lines else "").encode())
    io.write_json_atomic(summary_path(out), summary)
    if summary["failed_frames"]:
        console.print(f"[yellow]warning:[/yellow] {len(summary['failed_frames'])} frame(s) had every one of "
                      f"their {recipe.max_attempts} candidates rejected and were left out (see rejections)")
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a few lines of text for the terminal."""
    rej = ", ".join(f"{n} {k}" for k, n in summary["rejections"].items() if k != "total") or "none"
    lines = [f"wrote {summary['written']}/{summary['requested']} frames to {summary['output']} "
             f"(summary: {summary_path(Path(summary['output']))}) in {summary['elapsed_s']:.1f} s from "
             f"{summary['source_frames']} source frames; rejected candidates: {rej}; joints clipped to "
             f"the anatomical limits: {summary['joints_clipped_to_limits']}"]
    if summary["rejections_by_source"]:
        key, n = next(iter(summary["rejections_by_source"].items()))
        lines[0] += f" (most rejected source frame: {key}, {n} times)"
    for side, d in summary["pose_distance"].items():
        for name, unit in (("angle_deg", "deg mean joint angle"), ("joints_mm", "mm root-aligned joints")):
            near, own = d[name]["new_to_nearest_source"], d[name]["source_spacing"]
            spacing = (f"source spacing median {own['median']:.2f} (mean {own['mean']:.2f})" if own
                       else f"source spacing n/a ({d['source_poses']} distinct source pose)")
            lines.append(f"  {side} ({d['new_poses']} new, {d['source_poses']} distinct source poses), {unit}: "
                         f"new-to-nearest-source median {near['median']:.2f} (mean {near['mean']:.2f}, "
                         f"min {near['min']:.2f}); {spacing}")
    cov = summary["viewpoint_coverage"]
    if cov:
        lines.append(f"  viewpoints: {cov['cells_filled']}/{cov['cells']} azimuth x elevation cells (30 deg) "
                     f"filled; azimuth counts {cov['azimuth_counts']}; elevation counts {cov['elevation_counts']}")
    return "\n".join(lines)

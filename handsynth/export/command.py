"""``handsynth export``: a generate run -> WebDataset shards pairing each image with its original labels."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from handsynth.console import console, print_defaults, stdout
from handsynth.errors import InputError

DEFAULT_SHARD_SIZE = 1000   # HaMeR's shards hold about 1000 samples


def export(
    format: Annotated[str, typer.Option(
        "--format", help="Output format; 'webdataset' (tar shards) is the only one.")] = "webdataset",
    run: Annotated[Optional[Path], typer.Option(
        help="Generate run directory to export (default: the newest generate run under ./runs/).")] = None,
    out: Annotated[Optional[Path], typer.Option(
        help="Folder for the shards and index.json (default: shards/<run name>). Rerunning the same command "
             "keeps complete shards and rewrites the rest.")] = None,
    shard_size: Annotated[Optional[int], typer.Option(
        help="Samples per shard (default: 1000).", show_default=False)] = None,
    layout: Annotated[Optional[str], typer.Option(
        help="'handsynth' (default): image + mesh images + label JSON (safe to read). 'hamer': image + data.pyd "
             "as HaMeR's tar loader expects, plus the label JSON; data.pyd is a pickle - never read pickles "
             "from strangers.", show_default=False)] = None,
    verify: Annotated[str, typer.Option(
        "--verify", metavar="fast|full",
        help="How to check every shard after writing it (read back once, shards in parallel): 'fast' - sha256, "
             "keys, JSON, image headers and sizes; 'full' - also decode every image.")] = "fast",
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip the check after writing.")] = False,
    verify_only: Annotated[bool, typer.Option(
        "--verify-only", help="Only check the shards already in --out (needs --out; --verify full decodes every "
                              "image).")] = False,
    overwrite: Annotated[bool, typer.Option(
        help="Replace an earlier export in --out made from other inputs or with other settings (only a folder "
             "holding an export: index.json, shards; anything else is refused).")] = False,
    mano_dir: Annotated[Optional[Path], typer.Option(
        envvar="HANDSYNTH_MANO_DIR",
        help="MANO files (hamer layout only; default: the folder the render run used).")] = None,
    min_hand_score: Annotated[Optional[float], typer.Option(
        help="Quality gate: keep only samples whose every hand was detected with at least this score (from "
             "`handsynth evaluate`; the run must have been evaluated).", show_default=False)] = None,
    max_keypoint_error: Annotated[Optional[float], typer.Option(
        help="Quality gate: keep only samples whose 2D keypoint error (hand sizes) is at most this.",
        show_default=False)] = None,
    evaluation: Annotated[Optional[Path], typer.Option(
        help="Evaluation folder the gate reads (default: <run>/evaluation).", show_default=False)] = None,
    hamer_margin: Annotated[Optional[float], typer.Option(
        help="hamer layout: HaMeR's crop (scale * 200) as a multiple of the hand box's longer side (default: "
             "2.2, which keeps every joint in the crop under HaMeR's default training augmentation).",
        show_default=False)] = None,
) -> None:
    """Export generated images with their ORIGINAL 3D labels as WebDataset tar shards.

    Each sample holds the generated image, its mesh image(s) and a JSON label: the source annotation unchanged, the joints and boxes render derived (units and joint order named), each image's labels in its own pixel frame (size, K, 2D joints, boxes), and the prompt, seed and model that made the image. Shards are written atomically and reproducibly; index.json lists them with sha256 and keys.
    """
    from handsynth.export.hamer import HAMER_MARGIN
    from handsynth.export.webdataset import GENERATE_STAGE, VERIFY_MODES, export_run, verify_shards
    from handsynth.rundir import newest_run

    if verify not in VERIFY_MODES:
        raise InputError(f"--verify '{verify}' is not a verification mode", where="--verify",
                         fix="use --verify fast (default), --verify full (decode every image) or --no-verify")
    if verify_only:
        if out is None:
            raise InputError("--verify-only needs the shard folder", where="--out", fix="pass --out shards/<name>")
        _print_verified(verify_shards(out, full=verify == "full"))
        return
    defaults: dict[str, object] = {}
    if run is None:
        run = newest_run(GENERATE_STAGE)
        if run is None:
            raise InputError("no generate run given and ./runs/ holds none", where="--run",
                             fix="pass --run <generate run directory>, or run `handsynth generate` first")
        defaults["--run"] = run
    if out is None:
        out = defaults["--out"] = Path("shards") / run.name
    if shard_size is None:
        shard_size = defaults["--shard-size"] = DEFAULT_SHARD_SIZE
    if layout is None:
        layout = defaults["--layout"] = "handsynth"
    if layout == "hamer" and hamer_margin is None:
        hamer_margin = defaults["--hamer-margin"] = HAMER_MARGIN
    gate = None
    if min_hand_score is not None or max_keypoint_error is not None:
        from handsynth.evaluate.gate import EVALUATION, Gate

        gate = Gate(min_hand_score, max_keypoint_error, evaluation)
        if evaluation is None:
            defaults["--evaluation"] = run / EVALUATION
    print_defaults(defaults)
    summary = export_run(run, out, format=format, shard_size=shard_size, layout=layout, overwrite=overwrite,
                         verify=False if no_verify else verify, mano_dir=mano_dir, gate=gate,
                         hamer_margin=hamer_margin)
    stdout.print(
        f"exported {summary.samples} samples into {summary.shards} shards in {summary.out} "
        f"({summary.written} written, {summary.kept} already complete; {summary.bytes / 1e6:.1f} MB) in "
        f"{summary.elapsed_s:.1f} s; incomplete samples skipped: {summary.incomplete}", soft_wrap=True)
    if summary.filtered is not None:
        f = summary.filtered
        stdout.print(f"quality gate kept {f['kept']} sample(s), dropped {sum(f['dropped'].values())}: "
                     f"{f['dropped'] or 'none'}", soft_wrap=True)
    if summary.verified is not None:
        _print_verified(summary.verified)


def _print_verified(summary) -> None:
    rate = summary.samples / summary.elapsed_s if summary.elapsed_s else 0.0
    stdout.print(f"verified {summary.shards} shards, {summary.samples} samples, {summary.bytes / 1e6:.1f} MB "
                 f"in {summary.elapsed_s:.1f} s ({rate:.0f} samples/s, "
                 f"{'every image decoded' if summary.full else 'image headers'}): ok", soft_wrap=True)
    if not summary.samples:
        console.print("[yellow]warning:[/yellow] the shard folder holds no samples")

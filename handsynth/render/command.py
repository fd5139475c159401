"""``handsynth render``: labels -> mesh images, local crops and derived labels in a run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from handsynth.console import console, print_defaults, stdout
from handsynth.keys import sanitize


def default_out(labels: Path) -> Path:
    """runs/<labels file stem, sanitized>, e.g. runs/interhand2-6m_test_data for InterHand2.6M_test_data.json."""
    return Path("runs") / sanitize(labels.stem)


def render(
    labels: Annotated[Path, typer.Option(
        help="Label file: InterHand2.6M (any file of the _data/_camera/_MANO_NeuralAnnot set, or a data file "
             "X.json with X_camera.json, X_MANO_NeuralAnnot.json, X_joint_3d.json beside it), MSCOCO "
             "NeuralAnnot MANO fits, handsynth JSON Lines, or a render run's labels.jsonl.", show_default=False)],
    out: Annotated[Optional[Path], typer.Option(
        help="Run directory to write (default: runs/<labels file name>). Rerunning the same command "
             "into it resumes: finished frames are kept, the rest are rendered.")] = None,
    format: Annotated[Optional[str], typer.Option(
        "--format", help="Label format, when detection from the content should be overridden: "
                         "interhand26m, coco-neuralannot or handsynth-jsonl.")] = None,
    mano_dir: Annotated[Optional[Path], typer.Option(
        envvar="HANDSYNTH_MANO_DIR",
        help="Folder with MANO_RIGHT.pkl and MANO_LEFT.pkl (or a mano/ subfolder holding them); "
             "from mano.is.tue.mpg.de.")] = None,
    camera: Annotated[Optional[Path], typer.Option(
        "--camera", help="InterHand2.6M camera file, when its name does not follow the data file's "
                         "(default: found beside --labels).", show_default=False)] = None,
    mano_params: Annotated[Optional[Path], typer.Option(
        "--mano-params", help="InterHand2.6M MANO_NeuralAnnot file, when its name does not follow the data "
                              "file's (default: found beside --labels).", show_default=False)] = None,
    joints_3d: Annotated[Optional[Path], typer.Option(
        "--joints-3d", help="InterHand2.6M joint_3d file (optional), when its name does not follow the data "
                            "file's (default: found beside --labels).", show_default=False)] = None,
    limit: Annotated[Optional[int], typer.Option(min=0, help="Render only the first N frames.")] = None,
    workers: Annotated[int, typer.Option(
        min=1, help="Worker processes, each with its own renderer; output does not depend on it.")] = 1,
    style: Annotated[str, typer.Option(
        help="Condition image style(s): 'mesh' (AttentionHand's near-white shaded mesh on black, global/ and "
             "local/), 'depth' (depth-ControlNet convention: relative inverse depth, near bright, far dark, "
             "background black, normalised per image; depth_global/ and depth_local/), or 'mesh,depth' for "
             "both from one render with one set of labels.")] = "mesh",
    local_size: Annotated[int, typer.Option(
        help="Side in pixels of the local (hand crop) images.")] = 512,
) -> None:
    """Render MANO hand labels into AttentionHand mesh images.

    Per frame: a global mesh image at the source image size, a 512x512 local mesh image of a square crop around the hands, the same crop of the source photo when it exists, and a label file holding the original annotation plus camera-space joints, 2D joints and boxes.

    Hands behind the camera or outside the image are skipped and counted. Rerunning the same command resumes an interrupted run.
    """
    from handsynth.render.stage import render_run

    if out is None:
        out = default_out(labels)
        print_defaults({"--out": out})
    summary = render_run(labels, out, format=format, mano_dir=mano_dir, limit=limit, workers=workers,
                         style=style, local_size=local_size,
                         companions={"camera": camera, "mano": mano_params, "joint_3d": joints_3d})
    skipped = ", ".join(f"{n} {reason}" for reason, n in summary.skipped.items()) or "none"
    hands = ", ".join(f"{n} {reason}" for reason, n in summary.skipped_hands.items())
    stdout.print(
        f"rendered {summary.rendered}/{summary.frames} frames ({summary.already_done} already done) "
        f"into {summary.out} in {summary.elapsed_s:.1f} s; skipped frames: {skipped}"
        + (f"; skipped hands: {hands}" if hands else ""), soft_wrap=True)
    if summary.frames and not summary.rendered:
        console.print("[yellow]warning:[/yellow] no frame could be rendered; see the skip reasons above")


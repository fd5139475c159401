"""``handsynth evaluate``: FID/KID, FID-H/KID-H, hand confidence and keypoint errors of a generate run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from handsynth.console import console, print_defaults, stdout
from handsynth.errors import InputError


def _device(requested: Optional[str]) -> str:
    import torch

    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device asks for cuda, but torch sees no CUDA GPU", where="--device",
                         fix="pass --device cpu, or run on a GPU machine with a CUDA build of torch")
    return requested


def _has(module: str) -> bool:
    from importlib.util import find_spec

    return find_spec(module) is not None


def evaluate(
    run: Annotated[Optional[list[Path]], typer.Option(
        metavar="<path>",
        help="Generate run to evaluate (default: the newest generate run under ./runs/). Repeat it to compare "
             "runs (e.g. guidance none / a depth ControlNet / AttentionHand): each is evaluated into "
             "<run>/evaluation against one real set and a table in the shape of the paper's Table 1 is printed "
             "and written to --comparison.")] = None,
    real: Annotated[Optional[Path], typer.Option(
        help="Real set: a render run (its source images and labels) or a folder of images (whole-image FID/KID "
             "only). Default: the render run the generate run was made from, when its source images exist.")] = None,
    out: Annotated[Optional[Path], typer.Option(
        help="Folder for summary.json, samples.jsonl and report.html (default: <run>/evaluation; one --run "
             "only). A rerun reuses the per-sample results in its cache/ whose inputs and models are "
             "unchanged.")] = None,
    comparison: Annotated[Optional[Path], typer.Option(
        help="With several --run: folder for comparison.json and comparison.md (default: "
             "comparison-<run>-vs-<run> beside the first run).")] = None,
    inception: Annotated[Optional[Path], typer.Option(
        help="InceptionV3 weights for FID/KID (weights-inception-2015-12-05-6726825d.pth; default: torch hub's "
             "cache). Without them FID/KID are skipped and the rest is computed.")] = None,
    hand_model: Annotated[Optional[Path], typer.Option(
        help="MediaPipe hand landmarker .task file (default: ~/.cache/handsynth/hand_landmarker.task, "
             "$HANDSYNTH_CACHE moves it). Build it with --build-hand-model.")] = None,
    build_hand_model: Annotated[bool, typer.Option(
        "--build-hand-model", help="Build the hand model file (from the mediapipe 0.10.21 wheel, fetched with pip "
                                   "download or given with --hand-wheel) and exit.")] = False,
    hand_wheel: Annotated[Optional[Path], typer.Option(
        help="A mediapipe 0.10.21 wheel to build the hand model from (with --build-hand-model).")] = None,
    crop_scale: Annotated[float, typer.Option(
        help="Hand crops for FID-H/KID-H: each hand's box squared and enlarged by this factor.")] = 1.5,
    device: Annotated[Optional[str], typer.Option(
        help="torch device for the Inception features (default: cuda when available, else cpu).")] = None,
) -> None:
    """Score a generate run: FID/KID on whole images, FID-H/KID-H on hand crops (against the real set), and
    per hand MediaPipe's confidence, 2D/3D keypoint errors against the labels, PCK and handedness. Several --run:
    each is scored against one real set and the runs are compared in a table (the paper's Table 1).

    Writes summary.json, samples.jsonl (per-sample scores that `handsynth export --min-hand-score --max-keypoint-error` filters on) and report.html. Missing Inception weights or hand model skip those figures (and say how to get them); everything else is still computed.
    """
    from handsynth.evaluate import compare
    from handsynth.evaluate import inception as inc
    from handsynth.evaluate import landmarker as lm
    from handsynth.evaluate.inputs import generated_set, real_set
    from handsynth.evaluate.stage import protocol_record, run_evaluation, warn
    from handsynth.io import sha256_file
    from handsynth.rundir import newest_run

    if build_hand_model:
        path = lm.build_hand_model(hand_model, hand_wheel)
        stdout.print(f"wrote the hand model {path} (sha256 {sha256_file(path)[:16]}...)")
        return
    if not 1.0 <= crop_scale <= 10.0:
        raise InputError(f"crop scale {crop_scale} is out of range", where="--crop-scale",
                         fix="use a factor between 1.0 and 10.0 (default 1.5)")
    defaults: dict[str, object] = {}
    runs = list(run or [])
    if not runs:
        newest = newest_run("generate")
        if newest is None:
            raise InputError("no generate run given and ./runs/ holds none", where="--run",
                             fix="pass --run <generate run directory>, or run `handsynth generate` first")
        runs = [newest]
        defaults["--run"] = newest
    if len({r.resolve() for r in runs}) < len(runs):
        raise InputError("the same generate run is given twice", where="--run", fix="give each run once")
    if len(runs) > 1 and out is not None:
        raise InputError("--out names the evaluation folder of ONE run; with several --run each run is evaluated "
                         "into <run>/evaluation", where="--out",
                         fix="leave --out away, and name the comparison's folder with --comparison")
    generated = [generated_set(r) for r in runs]
    for g in generated:
        if not g.items:
            raise InputError("the generate run has no complete sample", where=g.run,
                             fix="let `handsynth generate` finish some samples first")
    skipped: dict[str, str] = {}
    if real is None:
        render_runs = sorted({str(g.render_run.resolve()) for g in generated})
        if len(render_runs) > 1:
            raise InputError(f"the runs were made from different render runs ({', '.join(render_runs)}), so they "
                             "have no common real set to be compared against", where="--run",
                             fix="pass --real with the real set to score them all against, or compare runs of "
                                 "the same render run")
        defaults["--real"] = generated[0].render_run
        try:
            real_items, real_kind = real_set(generated[0].render_run)
        except InputError as exc:
            real_items, real_kind = None, None
            skipped["real set"] = exc.message
            warn(f"no real set, so no FID/KID and no real-image ceiling: {exc.message}")
    else:
        real_items, real_kind = real_set(real)
    if out is None:
        outs = [g.run / "evaluation" for g in generated]
        defaults["--out"] = outs[0] if len(outs) == 1 else "<run>/evaluation"
    else:
        outs = [out]
    if len(runs) > 1:
        if comparison is None:
            comparison = defaults["--comparison"] = compare.default_folder([g.run for g in generated])
        if len({tuple((i.info["index"], i.info["frame"]) for i in g.items) for g in generated}) > 1:
            warn("the runs hold different samples (other frames, counts or indices): their figures compare image "
                 "distributions, not the same conditions")
    if device is None:
        device = defaults["--device"] = _device(None)
    else:
        device = _device(device)
    defaults["--crop-scale"] = crop_scale
    print_defaults(defaults)

    extractor, inception_record = None, None
    weights = inc.find_weights(inception)
    if weights is None:
        skipped["fid/kid"] = f"no InceptionV3 weights: {inc.weights_hint()}"
        warn(f"FID, KID, FID-H and KID-H skipped: {inc.weights_hint()}")
    elif not _has("torchmetrics"):
        skipped["fid/kid"] = "torchmetrics is not installed: pip install 'handsynth[eval]'"
        warn(f"FID, KID, FID-H and KID-H skipped: {skipped['fid/kid']}")
    elif real_items is not None:
        extractor = inc.load_inception(weights, device)
        inception_record = {"file": str(weights), "sha256": sha256_file(weights), "network": "FID InceptionV3 "
                            "(TF 2015-12-05), pool3 2048 features"}
    landmarker, hand_record = None, None
    task = lm.find_hand_model(hand_model)
    if task is None or lm.mediapipe_version() is None:
        why = "MediaPipe is not installed (pip install 'handsynth[eval]')" if lm.mediapipe_version() is None \
            else f"no hand model file: {lm.build_hint()}"
        skipped["keypoints"] = why
        warn(f"hand confidence, MSE-2D/3D, PCK and handedness skipped: {why}")
    else:
        landmarker = lm.HandLandmarker(task)
        hand_record = {"file": str(task), "sha256": sha256_file(task), "mediapipe": lm.mediapipe_version(),
                       "models": lm.TASK_MEMBERS, "from": lm.MEDIAPIPE_WHEEL}
    protocol = protocol_record(inception=inception_record, hand_model=hand_record, crop_scale=crop_scale,
                               landmarker_settings=landmarker.settings if landmarker else None)
    real_path = real.resolve() if real else generated[0].render_run.resolve() if real_items else None
    shared: dict[str, Any] = {}            # the real set's results, computed for the first run only
    summaries = []
    try:
        for g, folder in zip(generated, outs):
            inputs = {"generated": str(g.run.resolve()), "render_run": str(g.render_run.resolve()),
                      "real": str(real_path) if real_path else None, "real_kind": real_kind}
            summaries.append(run_evaluation(g.items, real_items, Path(folder), extractor=extractor,
                                            landmarker=landmarker, protocol=protocol, skipped=dict(skipped),
                                            inputs=inputs, device=device, shared=shared))
    finally:
        if landmarker is not None:
            landmarker.close()
    if len(runs) == 1:
        _print_summary(summaries[0], Path(outs[0]))
        return
    record = compare.comparison([g.run for g in generated], [compare.method_of(g.manifest) for g in generated],
                                outs, summaries)
    compare.write(Path(comparison), record)
    _print_comparison(record, Path(comparison))


def _print_summary(summary: dict[str, Any], out: Path) -> None:
    from rich.table import Table

    from handsynth.evaluate.compare import COLUMNS, cell

    gen, real, paper = summary["figures"]["generated"], summary["figures"]["real"], summary["paper"]
    table = Table(title="handsynth evaluate")
    for name in ("figure", "generated", "real (ceiling)", "paper: AttentionHand w/ TAS"):
        table.add_column(name)
    for name, key, _ in COLUMNS:
        table.add_row(name, cell(gen.get(key)), cell(real.get(key)), cell(paper.get(key)))
    stdout.print(table)
    counts = summary["counts"]
    stdout.print(f"evaluated {counts['generated']['images']} generated image(s)"
                 + (f" against {counts['real']['images']} real image(s)" if "real" in counts else "")
                 + f" in {summary['elapsed_s']:.1f} s; wrote {out}/summary.json, samples.jsonl, report.html",
                 soft_wrap=True)
    for what, why in summary["skipped"].items():
        console.print(f"[yellow]skipped {what}:[/yellow] {why}", soft_wrap=True)


def _print_comparison(record: dict[str, Any], folder: Path) -> None:
    """The comparison with one column per run (the terminal is narrower than Table 1's rows of figures)."""
    from rich.markup import escape
    from rich.table import Table

    from handsynth.evaluate.compare import COLUMNS, JSON, MARKDOWN, best, cell

    winners = best(record)
    table = Table(title="handsynth evaluate: comparison (best run per figure in bold)")
    for name in ("figure", *(run["name"] for run in record["runs"]), "real (ceiling)", "paper"):
        table.add_column(escape(name))
    for title, key, _ in COLUMNS:
        runs = [cell(run["figures"].get(key)) for run in record["runs"]]
        runs = [f"[bold]{c}[/bold]" if winners.get(key) == i else c for i, c in enumerate(runs)]
        table.add_row(title, *runs, cell(record["real"]["figures"].get(key)), cell(record["paper"].get(key)))
    table.add_row("images", *(str(run["images"]) for run in record["runs"]), cell(record["real"]["images"]), "-")
    stdout.print(table)
    for run in record["runs"]:
        stdout.print(f"{escape(run['name'])}: {escape(run['method'])} ({escape(run['run'])})", soft_wrap=True)
    stdout.print(f"paper: {record['paper']['method']}; wrote {folder}/{JSON}, {MARKDOWN}; each run's summary.json, "
                 "samples.jsonl and report.html are in its evaluation folder", soft_wrap=True)
    for what, why in record["skipped"].items():
        console.print(f"[yellow]skipped {what}:[/yellow] {why}", soft_wrap=True)

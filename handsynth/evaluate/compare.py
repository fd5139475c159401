"""Several generate runs side by side, in the shape of the AttentionHand paper's Table 1.

``handsynth evaluate --run a --run b ...`` evaluates each run into its own ``<run>/evaluation`` against ONE
real set, then writes the comparison (one row per run, the real-image ceiling and the paper's row) into a
folder of its own::

    comparison.json   per run: its folder, the method (guidance and TAS from its manifest), sample count and
                      figures; the real set's figures; the paper's row; the protocol every run was scored with
    comparison.md     the same table in Markdown, the best run in each column in bold
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from handsynth import io

JSON, MARKDOWN = "comparison.json", "comparison.md"
# (column title, summary key, True when lower is better)
COLUMNS = (("FID", "fid", True), ("KID", "kid", True), ("FID-H", "fid_h", True), ("KID-H", "kid_h", True),
           ("Hand conf.", "hand_conf", False), ("MSE-2D", "mse_2d", True), ("MSE-3D (cm^2)", "mse_3d", True),
           ("detection rate", "detection_rate", False),
           ("handedness disagreement", "handedness_disagreement", True))


def method_of(manifest: dict[str, Any]) -> str:
    """What made a generate run, from its manifest: the guidance module and whether TAS ran."""
    guidance = (manifest.get("model") or {}).get("guidance") or "none"
    tas = (((manifest.get("recipe") or {}).get("resolved") or {}).get("tas") or {}).get("enabled")
    method = "Stable Diffusion alone (guidance none)" if guidance == "none" else f"guidance {guidance}"
    return method if tas is None else f"{method}, TAS {'on' if tas else 'off'}"


def default_folder(runs: list[Path]) -> Path:
    """``comparison-<run>-vs-<run>...`` beside the first run."""
    return runs[0].parent / ("comparison-" + "-vs-".join(run.name for run in runs))


def comparison(runs: list[Path], methods: list[str], outs: list[Path],
               summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """The comparison record of runs evaluated against one real set into ``outs`` (``summaries``: what
    run_evaluation returned for each)."""
    first = summaries[0]
    return {
        "runs": [{"name": run.name, "run": str(run.resolve()), "method": method,
                  "images": summary["counts"]["generated"]["images"], "figures": summary["figures"]["generated"],
                  "evaluation": str(out.resolve())}
                 for run, method, out, summary in zip(runs, methods, outs, summaries)],
        "real": {"images": first["counts"].get("real", {}).get("images"), "figures": first["figures"]["real"],
                 "set": first["inputs"].get("real")},
        "paper": first["paper"], "protocol": first["protocol"],
        "skipped": {what: why for summary in summaries for what, why in summary["skipped"].items()},
    }


def best(record: dict[str, Any]) -> dict[str, int]:
    """Per summary key, the index of the run with the best value (runs only; ties: the first)."""
    out = {}
    for _, key, lower in COLUMNS:
        values = [(run["figures"].get(key), i) for i, run in enumerate(record["runs"])]
        values = [(v if lower else -v, i) for v, i in values if v is not None]
        if len(values) > 1:
            out[key] = min(values)[1]
    return out


def cell(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown(record: dict[str, Any]) -> str:
    """The comparison as a Markdown table (a row per run, then the real images and the paper; the best run of
    each column in bold) and its notes."""
    winners = best(record)
    header = ["run", "method", "images", *(title for title, _, _ in COLUMNS)]
    table = []
    for i, run in enumerate(record["runs"]):
        cells = [cell(run["figures"].get(key)) for _, key, _ in COLUMNS]
        cells = [f"**{c}**" if winners.get(key) == i else c for c, (_, key, _) in zip(cells, COLUMNS)]
        table.append([run["name"], run["method"], str(run["images"]), *cells])
    real, paper = record["real"], record["paper"]
    table.append(["real images (ceiling)", str(real["set"] or "-"), cell(real["images"]),
                  *(cell(real["figures"].get(key)) for _, key, _ in COLUMNS)])
    table.append(["paper", paper["method"], "-", *(cell(paper.get(key)) for _, key, _ in COLUMNS)])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in table]
    lines += ["", "Lower is better for FID, KID, FID-H, KID-H, MSE-2D, MSE-3D and handedness disagreement; higher "
              "for hand confidence and detection rate. The real row scores the real images themselves (FID/KID: "
              "one half against the other). The paper's row was measured on MSCOCO with a protocol it does not "
              "publish: a reference, not a like-for-like comparison."]
    lines += [f"- skipped {what}: {why}" for what, why in record["skipped"].items()]
    return "\n".join(lines) + "\n"


def write(folder: Path, record: dict[str, Any]) -> None:
    """comparison.json and comparison.md into ``folder`` (atomically)."""
    io.ensure_writable_dir(folder, what="comparison folder")
    io.write_json_atomic(folder / JSON, record)
    io.write_bytes_atomic(folder / MARKDOWN, markdown(record).encode())

"""report.html: one self-contained page (images inlined as data URIs, charts as inline SVG).

Contents: the figures next to the paper's Table 1 row, histograms of the per-sample hand score and
keypoint error, and contact sheets of the best and worst samples: the generated image with the labels'
joints (green) and the detected joints (red) drawn on it, beside its mesh image.
"""

from __future__ import annotations

import base64
import html
import io as _io
from pathlib import Path
from typing import Any

import numpy as np

from handsynth import io

SHEET = 8              # samples per contact sheet
THUMB = 256            # longer side of a drawn sample, px
BINS = 20
# openpose21 bones: wrist to each finger base, then along each finger
BONES = [(0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11), (11, 12),
         (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20)]


def _data_uri(image) -> str:
    buf = _io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _histogram(values: list[float], title: str, lo: float, hi: float) -> str:
    """An inline SVG histogram of ``values`` over [lo, hi] (values outside go to the end bins)."""
    w, h, pad = 360, 140, 24
    if not values:
        return f"<p>{html.escape(title)}: no values</p>"
    counts, _ = np.histogram(np.clip(values, lo, hi), bins=BINS, range=(lo, hi))
    top = max(int(counts.max()), 1)
    bw = (w - 2 * pad) / BINS
    bars = "".join(
        f'<rect x="{pad + i * bw:.1f}" y="{h - pad - (h - 2 * pad) * c / top:.1f}" width="{bw - 1:.1f}" '
        f'height="{(h - 2 * pad) * c / top:.1f}" fill="#4a7"><title>{c}</title></rect>' for i, c in enumerate(counts))
    return (f'<figure><svg width="{w}" height="{h}" xmlns="http://www.w3.org/2000/svg">{bars}'
            f'<text x="{pad}" y="{h - 6}" font-size="11">{lo:g}</text>'
            f'<text x="{w - pad}" y="{h - 6}" font-size="11" text-anchor="end">{hi:g}</text>'
            f'<text x="{w - pad}" y="14" font-size="11" text-anchor="end">max {top}</text></svg>'
            f'<figcaption>{html.escape(title)} ({len(values)} samples)</figcaption></figure>')


def _draw(item, record: dict[str, Any]):
    """The generated image with label joints (green) and detected joints (red), beside the mesh image."""
    from PIL import Image, ImageDraw

    with Image.open(item.image) as img:
        image = img.convert("RGB")
    draw = ImageDraw.Draw(image)
    r = max(1.0, max(image.size) / 150)
    for i, hand in enumerate(item.hands):
        sets = [(hand.joints_2d, (40, 220, 60))]
        scored = record.get("hands") or []
        if i < len(scored) and scored[i].get("joints_2d"):
            sets.append((np.asarray(scored[i]["joints_2d"]), (230, 40, 40)))
        for joints, colour in sets:
            for a, b in BONES:
                draw.line([tuple(map(float, joints[a])), tuple(map(float, joints[b]))], fill=colour, width=max(1, int(r / 2)))
            for x, y in joints:
                draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    panels = [image]
    if item.mesh is not None and Path(item.mesh).is_file():
        with Image.open(item.mesh) as mesh:
            panels.append(mesh.convert("RGB").resize(image.size))
    scale = THUMB / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    sheet = Image.new("RGB", (size[0] * len(panels), size[1]))
    for k, panel in enumerate(panels):
        sheet.paste(panel.resize(size), (k * size[0], 0))
    return sheet


def _card(item, record: dict[str, Any]) -> str:
    score, err = record.get("hand_score"), record.get("keypoint_error")
    text = (f"{html.escape(item.key)}<br>hand score {score:.3f}" if score is not None else html.escape(item.key))
    text += f", keypoint error {err:.3f}" if err is not None else ", keypoint error n/a"
    return f'<figure class="card"><img src="{_data_uri(_draw(item, record))}" alt="{html.escape(item.key)}">' \
           f"<figcaption>{text}</figcaption></figure>"


def _table(summary: dict[str, Any]) -> str:
    gen, real, paper = summary["figures"].get("generated", {}), summary["figures"].get("real", {}), summary["paper"]
    rows = [("FID", "fid"), ("KID", "kid"), ("FID-H", "fid_h"), ("KID-H", "kid_h"), ("Hand conf.", "hand_conf"),
            ("MSE-2D", "mse_2d"), ("MSE-3D", "mse_3d"), ("detection rate", "detection_rate"),
            ("PCK@0.1", None), ("handedness disagreement", "handedness_disagreement")]

    def cell(d, key):
        v = d.get("pck", {}).get("0.1") if key is None else d.get(key)
        return "-" if v is None else f"{v:.4g}"

    body = "".join(f"<tr><td>{name}</td><td>{cell(gen, k)}</td><td>{cell(real, k)}</td>"
                   f"<td>{'-' if k not in paper else paper[k]}</td></tr>" for name, k in rows)
    return ("<table><tr><th>figure</th><th>generated</th><th>real (ceiling)</th>"
            f"<th>{html.escape(paper['method'])}</th></tr>{body}</table>")


def write_report(out: Path, summary: dict[str, Any], result) -> None:
    """Write ``out/report.html`` for the generated set ``result`` (a stage.SetResult)."""
    records = {r["key"]: r for r in result.records}
    scored = [(i, records[i.key]) for i in result.items if "hand_score" in records.get(i.key, {})]
    # worst first: a hand not detected, then the largest keypoint error, then the lowest hand score
    scored.sort(key=lambda p: (-np.inf if p[1]["keypoint_error"] is None else -p[1]["keypoint_error"],
                               p[1]["hand_score"]))
    half = min(SHEET, (len(scored) + 1) // 2)
    worst, best = scored[:half], scored[half:][::-1][:SHEET]
    if not scored:      # no keypoint scores: show the first samples
        best = [(i, records.get(i.key, {})) for i in result.items[:SHEET]]
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>handsynth evaluation</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
        "padding:4px 8px}.card{display:inline-block;margin:6px;font-size:12px}figure{display:inline-block}"
        "</style></head><body>",
        f"<h1>Evaluation of {html.escape(str(summary['inputs'].get('generated')))}</h1>",
        _table(summary),
        "<h2>Skipped</h2><ul>" + "".join(f"<li>{html.escape(k)}: {html.escape(v)}</li>"
                                          for k, v in summary["skipped"].items()) + "</ul>"
        if summary["skipped"] else "",
        "<h2>Per-sample scores</h2>",
        _histogram([r["hand_score"] for _, r in scored], "lowest hand score per sample", 0.0, 1.0),
        _histogram([r["keypoint_error"] for _, r in scored if r["keypoint_error"] is not None],
                   "largest 2D keypoint error per sample (hand sizes)", 0.0, 1.0),
        f"<h2>Worst {len(worst)} samples</h2>" if worst else "",
        *[_card(i, r) for i, r in worst],
        f"<h2>{'Best' if scored else 'First'} {len(best)} samples</h2>",
        *[_card(i, r) for i, r in best],
        "<p>Green: the labels' joints; red: MediaPipe's. Left: generated image; right: its mesh image.</p>",
        "</body></html>",
    ]
    io.write_bytes_atomic(out / "report.html", "\n".join(parts).encode())

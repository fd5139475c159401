"""Render-stage throughput against raw pyrender speed, measured in the same run.

    python benchmarks/render.py [--frames 100] [--repeats 5] [--width 640 --height 480] [--workers 1]

Builds the hand-shaped test MANO files and a synthetic handsynth JSONL label set (two hands per
frame, seeded random poses) in a temporary folder, then measures, ``--repeats`` times interleaved (in
alternating order):

  (a) conditions per second through ``render_run``: MANO forward, geometry, the global and the
      local mesh image (PNG) and the label file per frame, written atomically, into a new folder;
  (b) raw pyrender frames per second: the same two 778-vertex hand meshes, material and lights
      rendered by a bare OffscreenRenderer, ``--frames`` times at the global viewport and then as
      many times at the local viewport (no size switching, nothing else). It clears, draws and reads
      every pixel, as a plain pyrender loop does; (a) does so only where the hands can be (same bytes);

A "pair" is one global + one local render - the rendering work one condition needs. Each repeat
gives a ratio (a) / (b pairs per second); the last line is the median of these ratios,
``ratio: X``. Interleaving keeps both sides under the same machine load. Start-up (imports, GL
context, shaders) is excluded from both by a warm-up run. On a machine shared with other jobs the
wall-clock ratio swings with their load; the line before it, ``cpu_ratio: X``, is the same median
computed from the CPU time this process used (all its threads, llvmpipe's rasterisers included),
which the load disturbs far less.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_labels(path: Path, frames: int, width: int, height: int, seed: int = 0) -> Path:
    """A JSONL label set: per frame a right and a left hand about 0.5 m in front of the camera."""
    rng = np.random.default_rng(seed)
    K = [[1.2 * width, 0.0, width / 2], [0.0, 1.2 * width, height / 2], [0.0, 0.0, 1.0]]
    with open(path, "w") as fh:
        for i in range(frames):
            hands = []
            for side, x in (("right", -0.12), ("left", 0.08)):
                pose = rng.normal(0.0, 0.15, 48)
                pose[:3] = rng.normal(0.0, 0.3, 3) + [0.0, 0.0, np.pi / 2]
                hands.append({"side": side, "pose": pose.tolist(), "shape": rng.normal(0, 0.5, 10).tolist(),
                              "trans": [x, -0.05 + 0.02 * rng.normal(), 0.55 + 0.05 * rng.normal()]})
            fh.write(json.dumps({"id": f"bench-{i:06d}", "width": width, "height": height, "K": K,
                                 "hands": hands}) + "\n")
    return path


def raw_pyrender(mano_dir: Path, labels: Path):
    """A bare pyrender OffscreenRenderer and a scene of one frame's two hands (handsynth's material and lights)."""
    from handsynth.hand_model import HandModel
    from handsynth.labels import read_labels
    from handsynth.render import geometry
    from handsynth.render.backend import configure_platform
    from handsynth.render.renderer import AMBIENT, BASE_COLOR, LIGHTS, _light_pose

    configure_platform()
    import pyrender
    import trimesh

    frame = read_labels(labels, limit=1).frames[0]
    model = HandModel(mano_dir)
    scene = pyrender.Scene(bg_color=np.zeros(4), ambient_light=np.array(AMBIENT))
    material = pyrender.MetallicRoughnessMaterial(metallicFactor=0.0, roughnessFactor=0.7, alphaMode="OPAQUE",
                                                  baseColorFactor=BASE_COLOR)
    for hand in frame.hands:
        out = model.forward(hand.side, hand.pose[None], hand.shape[None], hand.trans[None])
        v = geometry.to_camera(frame.camera, out.vertices[0].numpy()) * [1.0, -1.0, -1.0]
        scene.add(pyrender.Mesh.from_trimesh(trimesh.Trimesh(v, model.faces(hand.side), process=False),
                                             material=material, smooth=True))
    for direction, intensity in LIGHTS:
        scene.add(pyrender.DirectionalLight(intensity=intensity), pose=_light_pose(direction))
    # not deleted: pyrender's EGL teardown would terminate the display under handsynth's own context
    return pyrender, pyrender.OffscreenRenderer(64, 64), scene


def raw_pyrender_fps(raw, views, repeats: int) -> list[float]:
    """Frames per second of bare OffscreenRenderer.render calls, ``repeats`` per (K, size) view, one view after the other."""
    pyrender, renderer, scene = raw
    rates = []
    for K, (w, h) in views:
        cam = scene.add(pyrender.IntrinsicsCamera(K[0, 0], K[1, 1], K[0, 2] + 0.5, K[1, 2] + 0.5, znear=0.01,
                                                  zfar=100.0))
        renderer.viewport_width, renderer.viewport_height = w, h
        renderer.render(scene)                                  # warm-up at this size
        start = time.perf_counter()
        for _ in range(repeats):
            renderer.render(scene)
        rates.append(repeats / (time.perf_counter() - start))
        scene.remove_node(cam)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()

    from handsynth.render.backend import configure_platform

    configure_platform()
    from handsynth.render import geometry
    from handsynth.render.stage import render_run
    from tests.fixtures.mano import build_mano_files

    print(f"{args.frames} frames per repeat, {args.width}x{args.height} global + 512x512 local, 2 hands "
          f"(2 x 778 vertices) per frame, workers={args.workers}, {args.repeats} interleaved repeats", flush=True)
    ratios, cpu_ratios = [], []
    with tempfile.TemporaryDirectory(prefix="handsynth-bench-") as tmp:
        tmp = Path(tmp)
        mano_dir = build_mano_files(tmp / "mano")
        labels = write_labels(tmp / "bench.jsonl", args.frames, args.width, args.height)
        render_run(labels, tmp / "warmup", mano_dir=mano_dir, limit=2)       # imports, GL context, shaders
        first = json.loads((tmp / "warmup" / "labels" / "bench-000000.json").read_text())
        K = np.array([[first["camera"]["focal"][0], 0, first["camera"]["princpt"][0]],
                      [0, first["camera"]["focal"][1], first["camera"]["princpt"][1]], [0, 0, 1.0]])
        views = [(K, (args.width, args.height)),
                 (geometry.crop_intrinsics(K, np.array(first["crop_box"]), 512), (512, 512))]
        raw = raw_pyrender(mano_dir, labels)
        for r in range(args.repeats):
            def ours(r=r):
                start, cpu = time.perf_counter(), time.process_time()
                summary = render_run(labels, tmp / f"run{r}", mano_dir=mano_dir, workers=args.workers)
                assert summary.rendered == args.frames, summary
                return (summary.rendered / (time.perf_counter() - start),
                        summary.rendered / (time.process_time() - cpu))

            def reference():
                cpu = time.process_time()
                rates = raw_pyrender_fps(raw, views, repeats=args.frames)
                return rates, args.frames / (time.process_time() - cpu)

            if r % 2 == 0:                  # alternate the order, so that a load drift favours neither side
                (conditions, cpu_conditions), ((fps_global, fps_local), cpu_pairs) = ours(), reference()
            else:
                ((fps_global, fps_local), cpu_pairs), (conditions, cpu_conditions) = reference(), ours()
            pairs = 1.0 / (1.0 / fps_global + 1.0 / fps_local)
            ratios.append(conditions / pairs)
            cpu_ratios.append(cpu_conditions / cpu_pairs)
            print(f"repeat {r + 1}: (a) render_run {conditions:7.2f} conditions/s | (b) raw pyrender "
                  f"{fps_global:7.2f} global fps, {fps_local:7.2f} local fps, {pairs:7.2f} pairs/s | "
                  f"(a)/(b) {ratios[-1]:.3f} | per CPU second: {cpu_conditions:.2f} / {cpu_pairs:.2f} = "
                  f"{cpu_ratios[-1]:.3f}", flush=True)
    print(f"cpu_ratio: {float(np.median(cpu_ratios)):.3f}")
    print(f"ratio: {float(np.median(ratios)):.3f}")


if __name__ == "__main__":
    main()

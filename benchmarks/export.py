"""Export throughput (with its default verification) against plain ``tarfile`` writing the same bytes.

    python benchmarks/export.py [--frames 20] [--samples 400] [--shard-size 100] [--repeats 3] [--local]

Renders ``--frames`` synthetic two-hand frames (640x480, the test MANO files) with ``handsynth render``,
then lays out a generate run of ``--samples`` samples over them as ``handsynth generate`` writes one
(``image.fit: crop``, 512x512 JPEGs at quality 95 of smooth random texture, about as large as generated
photos; ``--local`` adds the local images, as ``branches: [global, local]`` does). It then measures,
``--repeats`` times interleaved (in alternating order), samples per second of:

  (a) ``export_run`` (layout handsynth, ``--shard-size`` samples per shard) with its default ``--verify``,
      into a new folder;
  (b) the same shard bytes written by plain ``tarfile``: per sample it reads the same input files (sample
      file, render label, generated images, render mesh images), makes the same members with the same
      functions (the label JSON document, the mesh images cut to the generated frames) and adds them to a
      tar; no input checks, no index, no verification.

Each repeat gives a ratio (a) / (b); the last line is their median, ``ratio: X``. The two sides write the
same shard contents (checked once: equal member names and bytes).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import runpy
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def texture(rng: np.random.Generator, size: int) -> bytes:
    """A JPEG (quality 95) of smooth random colour texture, about the size of a generated photo."""
    from PIL import Image

    coarse = Image.fromarray(rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8))
    buf = io.BytesIO()
    coarse.resize((size, size), Image.BICUBIC).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def make_generate_run(out: Path, render_run: Path, count: int, local: bool, size: int = 512) -> Path:
    """A generate run over ``render_run`` in the generate layout (sample files written as generate does)."""
    from handsynth.generate.frame import sample_frames
    from handsynth.keys import sample_key

    labels = [json.loads(line) for line in (render_run / "labels.jsonl").read_text().splitlines()]
    rng = np.random.default_rng(0)
    for folder in ("images", "samples") + (("local",) if local else ()):
        (out / folder).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        label = labels[i % len(labels)]
        frames = sample_frames(label, "crop", size, label["image_size"], local=local)
        key = sample_key(label["key"], i // len(labels))
        images = {"image": texture(rng, size)} | ({"local": texture(rng, size)} if local else {})
        outputs = {name: f"{'images' if name == 'image' else 'local'}/{key}.jpg" for name in images}
        for name, data in images.items():
            (out / outputs[name]).write_bytes(data)
        record = {"key": key, "index": i, "frame": label["key"], "variant": i // len(labels), "hands": "both",
                  "prompt": f"a photo of two hands, sample {i}", "hand_words": ["hands"],
                  "hand_spans": [[20, 25]], "hand_token_indices": [6], "seed": 1000 + i,
                  "local_seed": 2000 + i if local else None,
                  "mesh": {"global": label["images"]["global"]} | ({"local": label["images"]["local"]} if local
                                                                    else {}),
                  "outputs": outputs,
                  "outputs_sha256": {name: hashlib.sha256(data).hexdigest() for name, data in images.items()},
                  "image": frames.image_block} | ({"local_image": frames.local_block} if local else {})
        (out / "samples" / f"{key}.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "manifest.json").write_text(json.dumps({
        "stage": "generate", "command": ["handsynth", "generate"], "created": "2026-01-01T00:00:00+00:00",
        "recipe": {"path": "outdoor.yaml", "sha256": "ab" * 32, "resolved": {"seed": 0}},
        "inputs": {"kind": "run", "run": str(render_run.resolve())}, "model": {"base": "b", "guidance": "g"},
        "counts": {"requested": count, "done": count}, "status": "complete"}))
    return out


def plain_tar(run: Path, out: Path, shard_size: int) -> int:
    """The reference: the same shards with ``tarfile`` and nothing else (see the module docstring)."""
    from handsynth.export.webdataset import (CONDITION_MEMBERS, TAR_MODE, TAR_MTIME, TAR_OWNER,
                                             _condition_in_frame)

    out.mkdir(parents=True)
    manifest = json.loads((run / "manifest.json").read_text())
    render = Path(manifest["inputs"]["run"])
    extra = {"generate_run": run.name, "recipe_sha256": manifest["recipe"]["sha256"], "model": manifest["model"]}
    records = sorted((json.loads(p.read_bytes()) for p in (run / "samples").glob("*.json")),
                     key=lambda r: r["index"])
    for number in range(0, len(records), shard_size):
        with tarfile.open(out / f"{run.name}-{number // shard_size:06d}.tar", "w", format=tarfile.PAX_FORMAT) as tar:
            for record in records[number:number + shard_size]:
                label = json.loads((render / "labels" / f"{record['frame']}.json").read_bytes())
                blocks = {k: record[k] for k in ("image", "local_image") if k in record}
                generation = {**{k: v for k, v in record.items() if k not in blocks}, **extra}
                members = {"jpg": (run / record["outputs"]["image"]).read_bytes(),
                           "json": json.dumps({**label, "generation": generation, **blocks},
                                              allow_nan=False).encode()}
                for name, member in CONDITION_MEMBERS.items():
                    local = name.endswith("local")
                    rel = label["images"].get(name)
                    if rel is None or (local and "local" not in record["outputs"]):
                        continue
                    members[member] = _condition_in_frame((render / rel).read_bytes(),
                                                          blocks["local_image" if local else "image"], local)
                if "local" in record["outputs"]:
                    members["local.jpg"] = (run / record["outputs"]["local"]).read_bytes()
                for suffix in sorted(members):
                    info = tarfile.TarInfo(f"{record['key']}.{suffix}")
                    info.size, info.mtime, info.mode = len(members[suffix]), TAR_MTIME, TAR_MODE
                    info.uname = info.gname = TAR_OWNER
                    tar.addfile(info, io.BytesIO(members[suffix]))
    return len(records)


def tar_members(folder: Path) -> dict[str, bytes]:
    found = {}
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            for info in tar.getmembers():
                found[info.name] = tar.extractfile(info).read()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--local", action="store_true", help="samples with a local image too")
    args = parser.parse_args()

    from handsynth.export.webdataset import export_run
    from handsynth.render.stage import render_run
    from tests.fixtures.mano import build_mano_files

    write_labels = runpy.run_path(str(ROOT / "benchmarks" / "render.py"))["write_labels"]    # its label set

    with tempfile.TemporaryDirectory(prefix="handsynth-bench-") as tmp:
        tmp = Path(tmp)
        labels = write_labels(tmp / "bench.jsonl", args.frames, 640, 480)
        render_run(labels, tmp / "render", mano_dir=build_mano_files(tmp / "mano"))
        run = make_generate_run(tmp / "gen", tmp / "render", args.samples, args.local)
        size = sum(p.stat().st_size for p in run.rglob("*.jpg")) / args.samples
        print(f"{args.samples} samples over {args.frames} frames ({size / 1e3:.0f} kB of JPEG per sample, "
              f"{'global + local' if args.local else 'global only'}), {args.shard_size} per shard, "
              f"{args.repeats} interleaved repeats", flush=True)
        export_run(run, tmp / "warm-ours", shard_size=args.shard_size)          # imports, page cache
        plain_tar(run, tmp / "warm-ref", args.shard_size)
        ours_members, ref_members = tar_members(tmp / "warm-ours"), tar_members(tmp / "warm-ref")
        assert ours_members == ref_members, sorted(set(ours_members) ^ set(ref_members))[:5] or "bytes differ"
        ratios = []
        for r in range(args.repeats):
            def ours(r=r):
                start = time.perf_counter()
                summary = export_run(run, tmp / f"ours{r}", shard_size=args.shard_size)
                assert summary.verified is not None and summary.samples == args.samples
                return args.samples / (time.perf_counter() - start)

            def reference(r=r):
                start = time.perf_counter()
                assert plain_tar(run, tmp / f"ref{r}", args.shard_size) == args.samples
                return args.samples / (time.perf_counter() - start)

            if r % 2 == 0:                  # alternate the order, so that a load drift favours neither side
                a, b = ours(), reference()
            else:
                b, a = reference(), ours()
            ratios.append(a / b)
            print(f"repeat {r + 1}: (a) export + verify {a:7.1f} samples/s | (b) plain tarfile {b:7.1f} samples/s "
                  f"| (a)/(b) {ratios[-1]:.3f}", flush=True)
    print(f"ratio: {float(np.median(ratios)):.3f}")


if __name__ == "__main__":
    main()

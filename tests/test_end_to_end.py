"""The design card's three commands, as typed, one after the other in a fresh directory.

    handsynth render --labels <interhand data json>      (+ --mano-dir: the test MANO files)
    handsynth generate --recipe outdoor.yaml --count 5    (+ --device cpu: the tiny test model)
    handsynth export --format webdataset

Defaults connect the stages (newest run under ./runs). The exported labels must equal what render
wrote from the source, and the exported images the generated files, byte for byte; a hamer-layout
export's hand boxes must fall on the mesh silhouette as the pipeline resized it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from handsynth.cli import main
from tests.fixtures.generate import write_gen_recipe


def test_render_generate_export_chain(tmp_path, monkeypatch, interhand_set, mano_dir, tiny_sd_dir,
                                      tiny_guidance_dir):
    monkeypatch.chdir(tmp_path)
    write_gen_recipe(tmp_path, tiny_sd_dir, tiny_guidance_dir, name="outdoor.yaml")
    assert main(["render", "--labels", str(interhand_set), "--mano-dir", str(mano_dir)]) == 0
    assert main(["generate", "--recipe", "outdoor.yaml", "--count", "5", "--device", "cpu"]) == 0
    assert main(["export", "--format", "webdataset"]) == 0

    render_run = Path("runs") / "test_interhand2-6m_data"
    gen_run = Path("runs") / "outdoor-gen"
    shards = sorted(Path("shards").rglob("*.tar"))
    samples = list(wds.WebDataset([str(p) for p in shards], shardshuffle=False))
    assert len(samples) == 5
    frames = [json.loads(line)["key"] for line in (render_run / "labels.jsonl").read_text().splitlines()]
    for index, sample in enumerate(samples):
        record = json.loads(sample["json"])
        generation = record.pop("generation")
        frame = frames[index % len(frames)]
        assert sample["__key__"] == f"{frame}_v{index // len(frames):05d}" and "." not in sample["__key__"]
        assert generation["index"] == index and generation["prompt"]
        assert record == json.loads((render_run / "labels" / f"{frame}.json").read_text())
        assert sample["png"] == (gen_run / "images" / f"{sample['__key__']}.png").read_bytes()
        assert sample["mesh.png"] == (render_run / "global" / f"{frame}.png").read_bytes()

    # the hamer layout's pixel coordinates follow generate's resize of the whole mesh image to the
    # recipe's square size: each hand box lands on the mesh silhouette the pipeline itself conditioned on
    from handsynth.attentionhand.loading import load_pipeline
    from handsynth.export.hamer import load_pyd

    assert main(["export", "--format", "webdataset", "--layout", "hamer", "--out", "hamer"]) == 0
    pipe = load_pipeline(tiny_sd_dir, tiny_guidance_dir)
    samples = list(wds.WebDataset([str(p) for p in sorted(Path("hamer").glob("*.tar"))], shardshuffle=False))
    assert len(samples) == 5
    for sample in samples:
        label = json.loads(sample["json"])
        mesh = Image.open(render_run / label["images"]["global"])
        silhouette = pipe.prepare_mesh_images([mesh], 64, 64)[0].amax(0).numpy() > 0.1
        ys, xs = np.nonzero(silhouette)
        boxes = np.array([np.concatenate([h["center"] - h["scale"] * 100, h["center"] + h["scale"] * 100])
                          for h in load_pyd(sample["data.pyd"])])
        union = np.clip([*boxes[:, :2].min(0), *boxes[:, 2:].max(0)], 0, 63)
        np.testing.assert_allclose(union, [xs.min(), ys.min(), xs.max(), ys.max()], atol=1.0)

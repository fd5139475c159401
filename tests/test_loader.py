"""handsynth.export.loader: shards -> (image, labels in the image's frame), in a DataLoader with workers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from handsynth.export.loader import load_shards
from handsynth.export.webdataset import export_run
from tests.fixtures.export import make_generate_run


@pytest.mark.parametrize("layout", ["handsynth", "hamer"])
def test_dataloader_with_two_workers_yields_images_with_labels_in_their_frames(
        layout, tmp_path, small_render_run, landscape_render_run, mano_dir):
    from torch.utils.data import DataLoader

    urls, expected = [], {}
    for name, render, fit in (("real", small_render_run, "native"), ("land", landscape_render_run, "crop")):
        run = make_generate_run(tmp_path / name, render, 5, ext="png", size=64, fit=fit)
        export_run(run, tmp_path / f"shards-{name}", shard_size=2, layout=layout, mano_dir=mano_dir, verify=False)
        urls += sorted(str(p) for p in (tmp_path / f"shards-{name}").glob("*.tar"))
        for path in (run / "samples").glob("*.json"):
            record = json.loads(path.read_text())
            label = json.loads((render / "labels" / f"{record['frame']}.json").read_text())
            expected[record["key"]] = (record["image"], label)
            expected[record["key"] + "-local"] = (record["local_image"], label)
    assert len(urls) == 6

    items = list(DataLoader(load_shards(urls), batch_size=None, num_workers=2))
    assert sorted(labels["key"] for _, labels in items) == sorted(expected)
    for image, labels in items:
        block, label = expected[labels["key"]]
        image, K = np.asarray(image), np.asarray(labels["K"])
        W, H = block["size"]
        assert image.dtype == np.uint8 and image.shape == (H, W, 3) and labels["size"] == [W, H]
        assert labels["frame"] == ("local_image" if labels["key"].endswith("-local") else "image")
        assert labels["from_source"] == block["from_source"]
        assert K[0, 0] / K[1, 1] == pytest.approx(label["camera"]["focal"][0] / label["camera"]["focal"][1])
        assert [h["side"] for h in labels["hands"]] == [h["side"] for h in label["hands"]]
        for hand, src in zip(labels["hands"], label["hands"]):
            X = np.asarray(hand["joints_cam"])
            np.testing.assert_allclose(X, src["joints_cam"])
            uv = (X @ K.T)[:, :2] / X[:, 2:]
            np.testing.assert_allclose(np.asarray(hand["joints_2d"]), uv, atol=0.05)
            np.testing.assert_allclose(np.asarray(hand["mano"]["pose"]), src["mano"]["pose"])


def test_local_false_and_shuffle(tmp_path, small_render_run):
    run = make_generate_run(tmp_path / "gen", small_render_run, 4, ext="png", size=64)
    export_run(run, tmp_path / "shards", shard_size=2, verify=False)
    urls = sorted(str(p) for p in (tmp_path / "shards").glob("*.tar"))
    records = sorted((json.loads(p.read_text()) for p in (run / "samples").glob("*.json")), key=lambda r: r["index"])
    keys = [labels["key"] for _, labels in load_shards(urls, local=False)]
    assert keys == [r["key"] for r in records]                      # file order, generated images only
    shuffled = [labels["key"] for _, labels in load_shards(urls, shuffle=10)]
    assert sorted(shuffled) == sorted(keys + [k + "-local" for k in keys])

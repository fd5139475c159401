"""The README's demo inputs render as documented (the synthetic set is what users without shared/ get)."""

import json

import numpy as np
from PIL import Image

from handsynth.labels import read_labels
from handsynth.render.stage import render_run
from tests.make_demo import write_synthetic_interhand


def test_synthetic_interhand_demo_renders_every_frame(tmp_path, mano_dir):
    labels = write_synthetic_interhand(tmp_path / "ih")
    label_set = read_labels(labels)
    assert label_set.format == "interhand26m" and len(label_set.frames) == 8
    summary = render_run(labels, tmp_path / "run", mano_dir=mano_dir)
    assert summary.rendered == 8 and not summary.skipped and not summary.skipped_hands
    for frame in label_set.frames:
        label = json.loads((tmp_path / "run" / "labels" / f"{frame.key}.json").read_text())
        image = np.asarray(Image.open(tmp_path / "run" / "global" / f"{frame.key}.png"))
        for hand in label["hands"]:
            u, v = np.rint(np.asarray(hand["joints_2d"])[0]).astype(int)  # the wrist
            assert 0 <= u < 512 and 0 <= v < 512
            assert image[max(v - 2, 0):v + 3, max(u - 2, 0):u + 3].any(), (frame.key, hand["side"])

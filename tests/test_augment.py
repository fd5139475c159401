"""handsynth augment end to end: determinism, geometry of every frame, limits, interpolation,
interpenetration rejection, rendering the output, and the command's files and errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from handsynth.augment import limits
from handsynth.augment.command import augment_labels, summary_path
from handsynth.augment.penetration import penetration_depth
from handsynth.augment.recipe import AugmentRecipe
from handsynth.augment.rotation import geodesic
from handsynth.augment.sample import Augmenter, Rejected
from handsynth.cli import main
from handsynth.hand_model import HandModel
from handsynth.labels import read_labels
from tests.fixtures.labels import build_interhand_set, jsonl_record, mano_rest_arrays, write_jsonl

COUNT = 6


@pytest.fixture(scope="module")
def model(mano_dir):
    return HandModel(mano_dir, dtype=torch.float64)


@pytest.fixture(scope="module")
def excerpt(tmp_path_factory, mano_dir) -> Path:
    """The real InterHand2.6M excerpt with MANO fits on its hands (as tests/make_demo.py builds it)."""
    return build_interhand_set(tmp_path_factory.mktemp("aug-src") / "ih", mano_arrays=mano_rest_arrays(mano_dir))


@pytest.fixture(scope="module")
def run(excerpt, mano_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("aug") / "new.jsonl"
    summary = augment_labels(excerpt, AugmentRecipe(), count=COUNT, out=out, mano_dir=mano_dir)
    return out, summary


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _hand_model_outputs(model, frame):
    for hand in frame.hands:
        out = model.forward(hand.side, hand.pose[None], hand.shape[None], hand.trans[None])
        yield hand, out.vertices[0].numpy(), out.joints[0].numpy()


def test_frames_are_a_pure_function_of_seed_and_index(run, excerpt, mano_dir, tmp_path, model):
    out, _ = run
    again = tmp_path / "again.jsonl"
    augment_labels(excerpt, AugmentRecipe(), count=COUNT, out=again, mano_dir=mano_dir)
    assert again.read_bytes() == out.read_bytes()
    shorter = tmp_path / "shorter.jsonl"
    augment_labels(excerpt, AugmentRecipe(), count=3, out=shorter, mano_dir=mano_dir)
    assert shorter.read_text().splitlines() == out.read_text().splitlines()[:3]
    # frame 4 on its own, straight from the sampler
    frames = read_labels(excerpt).frames
    direct = Augmenter(AugmentRecipe(), frames, model).frame(4).candidate.record
    assert json.dumps(direct) == out.read_text().splitlines()[4]
    other_seed = tmp_path / "seed1.jsonl"
    augment_labels(excerpt, AugmentRecipe(seed=1), count=2, out=other_seed, mano_dir=mano_dir)
    assert _records(other_seed)[0]["hands"] != _records(out)[0]["hands"]


def test_every_frame_records_its_source_and_every_perturbation(run, excerpt):
    out, summary = run
    sources = {f.key: f for f in read_labels(excerpt).frames}
    records = _records(out)
    assert len(records) == COUNT == summary["written"]
    for i, rec in enumerate(records):
        aug = rec["augment"]
        assert aug["index"] == i and aug["seed"] == 0 and rec["id"] == f"aug-s0-{i:07d}"
        src = sources[aug["source"]["key"]]
        assert [h["side"] for h in rec["hands"]] == [h.side for h in src.hands if h.valid]
        for hand, info, src_hand in zip(rec["hands"], aug["pose"], [h for h in src.hands if h.valid]):
            assert info["side"] == hand["side"]
            assert np.asarray(info["perturb_deg"]).shape == (15, 3)
            np.testing.assert_array_equal(hand["pose"][:3], src_hand.pose[:3])   # orientation stays; camera moves
            assert info["interpolate"] is None or info["interpolate"]["with"] in sources
            assert hand["shape"] == aug["shape"]["betas"] and max(map(abs, hand["shape"])) <= 2.5
        view = aug["viewpoint"]
        assert [rec["width"], rec["height"]] == view["size"] and view["size"] in ([512, 512], [640, 480], [480, 640])
        assert -180 <= view["azimuth_deg"] <= 180 and -60 <= view["elevation_deg"] <= 60


def test_every_joint_projects_inside_the_image_with_the_frames_own_camera(run, model):
    out, _ = run
    label_set = read_labels(out)                # the output is handsynth JSON Lines as render reads it
    assert label_set.format == "handsynth-jsonl" and len(label_set.frames) == COUNT
    for frame in label_set.frames:
        w, h = frame.image_size
        K, R, t = frame.camera.K, frame.camera.R, frame.camera.t
        for hand, vertices, joints in _hand_model_outputs(model, frame):
            for points in (joints, vertices):
                x = points @ R.T + t
                assert np.all(x[:, 2] > 0.05)
                u = K[0, 0] * x[:, 0] / x[:, 2] + K[0, 2]
                v = K[1, 1] * x[:, 1] / x[:, 2] + K[1, 2]
                assert np.all((u >= 0) & (u <= w - 1) & (v >= 0) & (v <= h - 1)), frame.key


def test_wrists_stay_put_when_the_shape_changes(run, excerpt, model):
    out, _ = run
    sources = {f.key: f for f in read_labels(excerpt).frames}
    for frame, rec in zip(read_labels(out).frames, _records(out)):
        src = {h.side: h for h in sources[rec["augment"]["source"]["key"]].hands}
        for hand, _, joints in _hand_model_outputs(model, frame):
            s = src[hand.side]
            before = model.forward(hand.side, s.pose[None], s.shape[None], s.trans[None]).joints[0, 0].numpy()
            np.testing.assert_allclose(joints[0], before, atol=1e-9)


def test_joint_angles_stay_within_the_documented_limits(run, model):
    out, summary = run
    for frame in read_labels(out).frames:
        for hand in frame.hands:
            joints, vertices, mean = model.rest(hand.side)
            total = (hand.pose[3:] + mean).reshape(15, 3)
            angles = np.rad2deg(limits.to_anatomical(total, limits.joint_frames(joints, vertices, hand.side)))
            assert np.all(angles >= limits.LIMITS_DEG[..., 0] - 1e-6) and np.all(angles <= limits.LIMITS_DEG[..., 1] + 1e-6)
    assert summary["joints_clipped_to_limits"] >= 0


def _frames_within_limits(model, n: int, seed: int) -> list[dict]:
    """JSONL records of one right hand each, finger poses well inside the limits, all different."""
    joints, vertices, mean = model.rest("right")
    frames = limits.joint_frames(joints, vertices, "right")
    lo, hi = np.deg2rad(limits.LIMITS_DEG[..., 0]), np.deg2rad(limits.LIMITS_DEG[..., 1])
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        angles = (lo + hi) / 2 + rng.uniform(-0.3, 0.3, size=(15, 3)) * (hi - lo)
        pose = np.concatenate([[1.2, -0.3, 0.4], limits.from_anatomical(angles, frames).ravel() - mean])
        records.append(jsonl_record(f"src-{i}", hands=[{"side": "right", "pose": pose.tolist(),
                                                         "shape": [0.0] * 10, "trans": [0.0, 0.0, 0.5]}]))
    return records


def test_interpolated_poses_lie_between_their_two_sources(tmp_path, mano_dir, model):
    labels = write_jsonl(tmp_path / "src.jsonl", _frames_within_limits(model, 5, seed=6))
    recipe = AugmentRecipe.model_validate({"pose": {"interpolate": {"probability": 1.0}, "perturb": {"enabled": False}},
                                           "shape": {"enabled": False}})
    out = tmp_path / "interp.jsonl"
    augment_labels(labels, recipe, count=8, out=out, mano_dir=mano_dir)
    sources = {f.key: f.hands[0] for f in read_labels(labels).frames}
    mean = model.rest("right")[2]
    moved = 0
    for rec in _records(out):
        info = rec["augment"]["pose"][0]
        assert info["source_joints_clipped"] == 0 and info["perturb_deg"] is None
        a = (sources[rec["augment"]["source"]["key"]].pose[3:] + mean).reshape(15, 3)
        b = (sources[info["interpolate"]["with"]].pose[3:] + mean).reshape(15, 3)
        o = (np.asarray(rec["hands"][0]["pose"][3:]) + mean).reshape(15, 3)
        t = info["interpolate"]["t"]
        assert 0.2 <= t <= 0.8
        whole = geodesic(a, b)
        np.testing.assert_allclose(geodesic(a, o), t * whole, atol=1e-7)
        np.testing.assert_allclose(geodesic(o, b), (1 - t) * whole, atol=1e-7)
        moved += whole.max() > 0
    assert moved >= 4


def _two_hands(frame_id: str, left_x: float) -> dict:
    """Two mirror-image hands side by side; left_x = 0 puts them one inside the other."""
    hand = {"pose": [0.0] * 48, "shape": [0.0] * 10}
    return jsonl_record(frame_id, hands=[{"side": "right", **hand, "trans": [0.0, 0.0, 0.6]},
                                         {"side": "left", **hand, "trans": [left_x, 0.0, 0.6]}])


def test_an_interpenetrating_two_hand_candidate_is_rejected(tmp_path, mano_dir, model):
    labels = write_jsonl(tmp_path / "two.jsonl", [_two_hands("overlap", 0.0), _two_hands("apart", 0.0 - 0.3)])
    frames = read_labels(labels).frames
    for frame in frames:       # the planted candidate really interpenetrates; the other does not
        (_, va, _), (_, vb, _) = _hand_model_outputs(model, frame)
        depth = penetration_depth(va, model.faces("right"), vb, model.faces("left"))
        assert (depth > 0.008) if frame.key == "overlap" else (depth == 0.0)   # threshold: 5 mm
    recipe = AugmentRecipe.model_validate({"pose": {"interpolate": {"enabled": False}, "perturb": {"enabled": False}},
                                           "shape": {"enabled": False}})
    augmenter = Augmenter(recipe, frames, model)
    tried = {}
    for attempt in range(6):
        try:
            tried[attempt] = augmenter.candidate(0, attempt).record["augment"]["source"]["key"]
        except Rejected as exc:
            tried[attempt] = exc.reason
    assert set(tried.values()) == {"apart", "interpenetration"}
    out = tmp_path / "two-out.jsonl"
    summary = augment_labels(labels, recipe, count=8, out=out, mano_dir=mano_dir)
    records = _records(out)
    assert len(records) == 8 and all(r["augment"]["source"]["key"] == "apart" for r in records)
    assert all(r["augment"]["two_hands"]["penetration_mm"] == 0.0 for r in records)
    rejected = sum(r["augment"]["attempt"] for r in records)   # every earlier attempt of a frame was rejected
    assert summary["rejections"] == {"total": rejected, "interpenetration": rejected} and rejected > 0
    assert summary["rejections_by_source"] == {"overlap": rejected}
    assert summary["frames_by_source"] == {"sources_used": 1, "most_used": {"apart": 8}}


def test_the_output_renders_and_silhouettes_cover_the_projected_joints(run, mano_dir, tmp_path):
    from handsynth.render.stage import render_run

    out, _ = run
    rendered = render_run(out, tmp_path / "render", mano_dir=mano_dir, local_size=64, command=["render"])
    assert rendered.rendered == COUNT and not rendered.skipped
    for rec in _records(out):
        label = json.loads((tmp_path / "render" / "labels" / f"{rec['id']}.json").read_text())
        assert label["original"]["augment"] == rec["augment"]          # provenance travels with the labels
        mask = np.asarray(Image.open(tmp_path / "render" / "global" / f"{rec['id']}.png")).any(axis=2)
        assert mask.shape == (rec["height"], rec["width"])
        for hand in label["hands"]:
            uv = np.rint(np.asarray(hand["joints_2d"])).astype(int)
            assert len(uv) == 21
            for u, v in uv:
                assert mask[max(v - 2, 0):v + 3, max(u - 2, 0):u + 3].any(), (rec["id"], u, v)


def test_summary_is_printed_and_written_beside_the_output(run):
    out, summary = run
    written = json.loads(summary_path(out).read_text())
    assert summary_path(out).name == "new.summary.json"
    assert written["written"] == COUNT and written["requested"] == COUNT
    assert written["settings"] == AugmentRecipe().model_dump(mode="json")
    assert sum(written["viewpoint_coverage"]["azimuth_counts"]) == COUNT
    for side, d in written["pose_distance"].items():
        assert d["new_poses"] == sum(h["side"] == side for r in _records(out) for h in r["hands"])
        assert d["angle_deg"]["new_to_nearest_source"]["min"] > 0


def test_cli_refuses_to_overwrite_and_reports_bad_input(excerpt, mano_dir, tmp_path, capsys):
    out = tmp_path / "cli.jsonl"
    args = ["augment", "--labels", str(excerpt), "--count", "2", "--out", str(out), "--mano-dir", str(mano_dir)]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "wrote 2/2 frames" in captured.out and "deg mean joint angle" in captured.out
    assert "using default --recipe" in captured.err
    before = out.read_bytes()
    assert main(args) == 4
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == before
    assert main(args + ["--overwrite", "--count", "1"]) == 0 and len(out.read_text().splitlines()) == 1
    capsys.readouterr()
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 1\nviewpoint:\n  azimut_deg: [0, 90]\n")
    assert main(args + ["--overwrite", "--recipe", str(bad)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "field viewpoint.azimut_deg" in err and "line 3" in err and "azimuth_deg" in err
    assert "Traceback" not in err and len(out.read_text().splitlines()) == 1
    empty = write_jsonl(tmp_path / "none.jsonl", [jsonl_record("x", hands=[{"side": "right", "pose": [0.0] * 48,
                                                                           "shape": [0.0] * 10, "trans": [0, 0, 1],
                                                                           "valid": False}])])
    assert main(["augment", "--labels", str(empty), "--count", "1", "--out", str(tmp_path / "e.jsonl"),
                 "--mano-dir", str(mano_dir)]) == 2
    assert "no frame of the label file has a valid hand" in " ".join(capsys.readouterr().err.split())


def test_without_viewpoint_the_source_camera_stays_and_hands_out_of_its_image_are_rejected(tmp_path, mano_dir):
    seen = jsonl_record("seen", hands=[{"side": "right", "pose": [0.0] * 48, "shape": [0.0] * 10,
                                        "trans": [0.0, 0.02, 0.6]}])
    outside = jsonl_record("outside", hands=[{"side": "right", "pose": [0.0] * 48, "shape": [0.0] * 10,
                                              "trans": [0.5, 0.0, 0.6]}])
    labels = write_jsonl(tmp_path / "cams.jsonl", [seen, outside])
    recipe = AugmentRecipe.model_validate({"viewpoint": {"enabled": False}, "shape": {"sigma": 0.3}})
    out = tmp_path / "cams-out.jsonl"
    summary = augment_labels(labels, recipe, count=10, out=out, mano_dir=mano_dir)
    records = _records(out)
    assert len(records) == 10 and {r["augment"]["source"]["key"] for r in records} == {"seen"}
    for rec in records:
        assert rec["augment"]["viewpoint"] is None
        assert (rec["width"], rec["height"], rec["K"]) == (seen["width"], seen["height"], seen["K"])
        assert rec["R"] == np.eye(3).tolist() and rec["t"] == [0.0, 0.0, 0.0]
    assert summary["rejections"]["out_of_frame"] == summary["rejections"]["total"] > 0
    assert summary["viewpoint_coverage"] is None

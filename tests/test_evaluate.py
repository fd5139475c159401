"""`handsynth evaluate`: FID/KID against an independent computation, hand crops where the labels say, the
Inception loader on a local file, MediaPipe scores on rendered hands with known labels (planted misalignments),
the outputs, reuse on rerun, and export's quality gate."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from handsynth.cli import main
from handsynth.errors import InputError, MissingResourceError
from handsynth.evaluate import distribution, hands, inception
from handsynth.evaluate.hands import Detection, LabelledHand
from tests.fixtures.evaluate import build_tiny_extractor, hand_width, make_scene_generate_run
from tests.fixtures.export import make_generate_run

PLANTED = (1, 4)


# --- FID / KID --------------------------------------------------------------------------------

def _images(seed: int, n: int, shift: int = 0, size: int = 48) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 200, size=(n, size, size, 3))
    return [np.clip(b + shift, 0, 255).astype(np.uint8) for b in base]


def _fid_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance of two Gaussians fitted to the features (scipy's sqrtm)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


def _kid_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 with the polynomial kernel k(x, y) = (x.y / d + 1)^3 on whole sets of equal size."""
    d, m = a.shape[1], len(a)
    k = lambda x, y: (x @ y.T / d + 1.0) ** 3  # noqa: E731
    kxx, kyy, kxy = k(a, a), k(b, b), k(a, b)
    off = lambda kk: (kk.sum() - np.trace(kk)) / (m * (m - 1))  # noqa: E731
    return float(off(kxx) + off(kyy) - 2 * kxy.mean())


def test_fid_kid_match_an_independent_computation(tiny_extractor):
    real = distribution.extract(tiny_extractor, _images(0, 40)).astype(np.float64)
    same = distribution.extract(tiny_extractor, _images(1, 40)).astype(np.float64)
    shifted = distribution.extract(tiny_extractor, _images(2, 40, shift=50)).astype(np.float64)
    for other in (same, shifted):
        got = distribution.fid_kid(real, other, subsets=3, subset_size=40)
        assert got["fid"] == pytest.approx(_fid_reference(real, other), rel=1e-3, abs=1e-6)
        # one subset of the whole set: the random subset is a permutation, which MMD does not see
        assert got["kid"] == pytest.approx(_kid_reference(real, other), rel=1e-3, abs=1e-7)
        assert got["kid_std"] == pytest.approx(0.0, abs=1e-6)
    assert distribution.fid_kid(real, real)["fid"] == pytest.approx(0.0, abs=1e-6)
    near, far = (distribution.fid_kid(real, x) for x in (same, shifted))
    assert far["fid"] > 5 * near["fid"] and far["kid"] > 5 * abs(near["kid"])
    assert near["kid_subset_size"] == 40            # lowered from 1000 to the set size


def test_fid_kid_refuse_sets_of_one(tiny_extractor):
    feats = distribution.extract(tiny_extractor, _images(0, 3))
    with pytest.raises(ValueError, match="at least 2"):
        distribution.fid_kid(feats[:1], feats)


def test_extract_batches_images_of_one_size_and_keeps_order(tiny_extractor):
    images = _images(3, 3, size=48) + _images(4, 2, size=32)
    images = [images[0], images[3], images[1], images[4], images[2]]
    together = distribution.extract(tiny_extractor, images)
    alone = np.concatenate([distribution.extract(tiny_extractor, [im]) for im in images])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-5)


def test_kid_is_reproducible(tiny_extractor):
    a = distribution.extract(tiny_extractor, _images(0, 30))
    b = distribution.extract(tiny_extractor, _images(5, 30, shift=20))
    first, second = (distribution.fid_kid(a, b, subsets=5, subset_size=10) for _ in range(2))
    assert first == second and first["kid_std"] > 0


# --- InceptionV3 from a local file ------------------------------------------------------------

def test_inception_loads_its_weights_from_a_local_file(tmp_path):
    torch.manual_seed(0)
    model = inception.FIDInceptionV3()
    for m in model.modules():          # non-trivial batch-norm statistics, so loading them matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / inception.INCEPTION_FILE
    torch.save(model.state_dict(), path)
    loaded = inception.load_inception(path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    image = torch.from_numpy(np.stack(_images(0, 1, size=64))).permute(0, 3, 1, 2)
    with torch.no_grad():
        features = loaded(image)
    assert features.shape == (1, inception.NUM_FEATURES) and torch.isfinite(features).all()
    assert loaded.training is False and loaded.train().training is False


def test_inception_file_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert inception.find_weights(None) is None
    hint = inception.weights_hint()
    assert inception.INCEPTION_FILE in hint and str(tmp_path / "torch" / "hub" / "checkpoints") in hint
    with pytest.raises(MissingResourceError, match="does not exist"):
        inception.find_weights(tmp_path / "nope.pth")
    cached = inception.cache_path()
    cached.parent.mkdir(parents=True)
    torch.save({"conv.weight": torch.zeros(1)}, cached)
    assert inception.find_weights(None) == cached
    with pytest.raises(InputError, match="not the FID InceptionV3"):
        inception.load_inception(cached)

    class Payload:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    evil = tmp_path / "evil.pth"
    torch.save({"x": Payload()}, evil)
    with pytest.raises(InputError, match="cannot read the Inception weights"):
        inception.load_inception(evil)      # weights_only: the pickled call is refused, never run


# --- hand crops -------------------------------------------------------------------------------

def test_hand_crops_are_where_the_labels_say():
    """A red box on a wide image: the crop is the box squared about its centre, enlarged 1.5x; the red area
    lands in the crop's middle with the size the rule predicts."""
    w, h = 320, 200
    pixels = np.zeros((h, w, 3), np.uint8)
    x0, y0, x1, y1 = 200, 60, 240, 140            # pixel centres 200..239, 60..139 (40 x 80)
    pixels[y0:y1, x0:x1] = (255, 0, 0)
    box = np.array([x0 - 0.5, y0 - 0.5, x1 - 0.5, y1 - 0.5])     # edges in centre-at-integer coordinates
    hand = LabelledHand("right", np.zeros((21, 2)), box, None)
    crop_box = hands.crop_box(box, 1.5)
    centre, side = np.array([219.5, 99.5]), 1.5 * 80
    np.testing.assert_allclose(crop_box, np.r_[centre - side / 2, centre + side / 2])
    (crop,) = hands.hand_crops(Image.fromarray(pixels), [hand], 1.5, 120)    # 1 crop px = 1 image px
    red = (crop[..., 0] > 128) & (crop[..., 1] < 100)
    ys, xs = np.nonzero(red)
    assert crop.shape == (120, 120, 3)
    assert abs(xs.min() - 40) <= 1 and abs(xs.max() - 79) <= 1      # 40 px wide, centred
    assert abs(ys.min() - 20) <= 1 and abs(ys.max() - 99) <= 1      # 80 px tall, centred


# --- keypoint scores (pure) -------------------------------------------------------------------

def _hand(dx: float = 0.0, side: str = "right") -> LabelledHand:
    rng = np.random.default_rng(0)
    joints = rng.uniform(100, 180, size=(21, 2)) + [dx, 0]
    cam = rng.normal(size=(21, 3)) * 0.03 + [0, 0, 0.5]
    return LabelledHand(side, joints, np.r_[joints.min(0) - 5, joints.max(0) + 5], cam)


def test_scores_against_hand_computation():
    label = _hand()
    det_joints = label.joints_2d + [3.0, 4.0]                         # 5 px off every joint
    world = label.joints_cam - label.joints_cam[0] + [0.1, 0.2, 0.3]   # another origin: root alignment removes it
    world[1:] += [0.01, 0.0, 0.0]                                        # 1 cm off, all joints but the wrist
    record = hands.score_hand(label, Detection("right", 0.9, det_joints, world))
    size = label.size
    assert record["error_2d"] == pytest.approx(5.0 / size)
    assert record["mse_2d"] == pytest.approx(25.0 / size ** 2)
    assert record["mse_3d"] == pytest.approx(20 / 21 * 1.0)               # 20 joints 1 cm off, in cm^2
    assert record["mpjpe_3d"] == pytest.approx(20 / 21 * 10.0)
    assert record["pck"]["0.05"] == (1.0 if 5.0 / size <= 0.05 else 0.0)
    assert record["handedness_agrees"] and record["score"] == 0.9


def test_matching_pairs_hands_by_overlap():
    a, b = _hand(0.0), _hand(400.0, side="left")
    dets = [Detection("left", 0.8, b.joints_2d + 2, np.zeros((21, 3))),
            Detection("right", 0.7, a.joints_2d - 2, np.zeros((21, 3))),
            Detection("right", 0.6, a.joints_2d + 1000, np.zeros((21, 3)))]      # far from both
    assert hands.match([a, b], dets) == [1, 0]
    assert hands.match([a], []) == [None]
    scored = hands.score_sample([a, b], dets[2:])
    assert scored["hand_score"] == 0.0 and scored["keypoint_error"] is None
    assert [h["detected"] for h in scored["hands"]] == [False, False]


# --- reading runs ---------------------------------------------------------------------------

def test_generated_set_takes_each_image_frame_from_its_sample_file(hand_scene_render_run, small_render_run,
                                                                   tmp_path):
    from handsynth.evaluate.inputs import generated_set

    run = make_scene_generate_run(tmp_path / "gen", hand_scene_render_run)
    record_path = sorted((run / "samples").glob("*.json"))[0]
    record = json.loads(record_path.read_text())
    hand = record["image"]["hands"][0]
    hand["joints_2d"] = (np.asarray(hand["joints_2d"]) * 0.5 + 3).tolist()     # a frame of its own
    hand["box"] = (np.asarray(hand["box"]) * 0.5 + 3).tolist()
    record_path.write_text(json.dumps(record))
    item = generated_set(run).items[0]
    label = json.loads((hand_scene_render_run / "labels" / f"{record['frame']}.json").read_text())
    np.testing.assert_allclose(item.hands[0].joints_2d, hand["joints_2d"])
    np.testing.assert_allclose(item.hands[0].box, hand["box"])
    np.testing.assert_allclose(item.hands[0].joints_cam, label["hands"][0]["joints_cam"])   # from render

    hand["side"] = "left" if hand["side"] == "right" else "right"
    record_path.write_text(json.dumps(record))
    with pytest.raises(InputError, match=r"image.hands\[0\].side"):
        generated_set(run)

    # a sample file without the block (older runs): the whole source frame resized to the image
    # (a stretch run - the mapping such runs had - with its blocks removed)
    legacy = make_generate_run(tmp_path / "legacy", small_render_run, 2, size=64, fit="stretch")
    stretched = {}
    for path in (legacy / "samples").glob("*.json"):
        record = json.loads(path.read_text())
        stretched[record["frame"]] = record.pop("image")
        record.pop("local_image")
        path.write_text(json.dumps(record))
    item = generated_set(legacy).items[1]
    label = json.loads((small_render_run / "labels" / f"{item.info['frame']}.json").read_text())
    (w, h), joints = label["image_size"], np.asarray(label["hands"][0]["joints_2d"])
    expected = np.c_[(joints[:, 0] + 0.5) * 64 / w - 0.5, (joints[:, 1] + 0.5) * 64 / h - 0.5]
    np.testing.assert_allclose(item.hands[0].joints_2d, expected)
    np.testing.assert_allclose(stretched[item.info["frame"]]["hands"][0]["joints_2d"], expected)


# --- MediaPipe on rendered hands with known labels --------------------------------------------

@pytest.fixture(scope="module")
def scene_run(hand_scene_render_run, tmp_path_factory) -> Path:
    return make_scene_generate_run(tmp_path_factory.mktemp("scene-gen") / "gen", hand_scene_render_run,
                                   planted=PLANTED)


@pytest.fixture(scope="module")
def evaluated(scene_run, hand_task_file, tiny_extractor, tmp_path_factory):
    """The scene run evaluated through the stage with the tiny extractor standing in for Inception."""
    from handsynth.evaluate.inputs import generated_set, real_set
    from handsynth.evaluate.landmarker import HandLandmarker
    from handsynth.evaluate.stage import protocol_record, run_evaluation

    out = tmp_path_factory.mktemp("evaluation")
    generated = generated_set(scene_run)
    real, _ = real_set(generated.render_run)
    with HandLandmarker(hand_task_file) as landmarker:
        protocol = protocol_record(inception={"test": "tiny"}, hand_model={"test": True}, crop_scale=1.5,
                                   landmarker_settings=landmarker.settings)
        summary = run_evaluation(generated.items, real, out, extractor=tiny_extractor, landmarker=landmarker,
                                 protocol=protocol, skipped={}, inputs={"generated": str(scene_run)})
    return out, summary, generated, real


def test_mediapipe_finds_the_rendered_hands_and_the_planted_misalignments(evaluated):
    out, summary, generated, real = evaluated
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["key"] for r in records] == [i.key for i in generated.items]
    for i, r in enumerate(records):
        (hand,) = r["hands"]
        assert hand["detected"] and hand["score"] > 0.8 and hand["handedness_agrees"], r
        if i in PLANTED:        # the image moved one hand width right of its labels
            assert hand["error_2d"] > 0.4 and hand["pck"]["0.1"] == 0.0, r
            assert abs(np.mean(np.array(hand["joints_2d"])[:, 0] - generated.items[i].hands[0].joints_2d[:, 0])
                       - hand_width(json.loads((generated.render_run / "labels" / f"{r['frame']}.json")
                                               .read_text()))) < 0.15 * generated.items[i].hands[0].size
        else:
            assert hand["error_2d"] < 0.1 and hand["pck"]["0.2"] == 1.0, r
    planted = [records[i]["hands"][0]["mse_2d"] for i in PLANTED]
    clean = [r["hands"][0]["mse_2d"] for i, r in enumerate(records) if i not in PLANTED]
    assert min(planted) > 10 * max(clean)
    gen, ceiling = summary["figures"]["generated"], summary["figures"]["real"]
    assert gen["detection_rate"] == 1.0 and ceiling["detection_rate"] == 1.0
    assert ceiling["mse_2d"] < gen["mse_2d"] and ceiling["pck"]["0.1"] == 1.0 > gen["pck"]["0.1"]
    assert gen["handedness_disagreement"] == 0.0


def test_summary_records_figures_and_protocol(evaluated):
    out, summary, generated, real = evaluated
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["figures"] == json.loads(json.dumps(summary["figures"]))
    gen = on_disk["figures"]["generated"]
    for key in ("fid", "kid", "fid_h", "kid_h", "hand_conf", "mse_2d", "mse_3d"):
        assert isinstance(gen[key], float), key
    assert gen["counts"]["n_real"] == len(real) and gen["counts_h"]["n_generated"] == len(generated.items)
    assert on_disk["protocol"]["crop"]["scale"] == 1.5 and "antialias=True" in on_disk["protocol"]["resize"]
    assert on_disk["paper"]["fid"] == 20.71 and on_disk["status"] == "complete"


def test_real_excerpt_source_images_through_mediapipe(small_render_run, hand_task_file):
    """The real InterHand2.6M photos: whatever MediaPipe detects is matched to a labelled hand of the same side,
    with its keypoints within a hand size of the (wrist-placed, unposed) test-MANO labels."""
    from handsynth.evaluate.inputs import real_set
    from handsynth.evaluate.landmarker import HandLandmarker

    items, kind = real_set(small_render_run)
    assert kind == "render run" and len(items) == 4
    matched = 0
    with HandLandmarker(hand_task_file) as landmarker:
        for item in items:
            scored = hands.score_sample(item.hands, landmarker.detect(np.asarray(Image.open(item.image)
                                                                                   .convert("RGB"))))
            for hand in scored["hands"]:
                if hand["detected"]:
                    matched += 1
                    assert hand["handedness_agrees"] and hand["error_2d"] < 1.0, hand
    assert matched >= 1


# --- outputs, rerun, command ------------------------------------------------------------------

class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources: list[str] = []
        self.alts: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])
            self.alts.append(dict(attrs)["alt"])


def test_report_is_self_contained(evaluated):
    out, _, generated, _ = evaluated
    parser = _Images()
    parser.feed((out / "report.html").read_text())
    assert sorted(parser.alts) == sorted(i.key for i in generated.items)      # worst half, then best half
    assert set(parser.alts[:len(PLANTED)]) == {generated.items[i].key for i in PLANTED}
    for src in parser.sources:
        assert src.startswith("data:image/jpeg;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as img:
            assert img.width > img.height       # generated image beside its mesh image


def test_rerun_reuses_cached_results(evaluated, hand_task_file, tiny_extractor, tmp_path):
    from handsynth.evaluate.landmarker import HandLandmarker
    from handsynth.evaluate.stage import run_evaluation

    out, summary, generated, real = evaluated
    before = (out / "samples.jsonl").read_bytes()
    with HandLandmarker(hand_task_file) as landmarker:
        again = run_evaluation(generated.items, real, out, extractor=tiny_extractor, landmarker=landmarker,
                               protocol=summary["protocol"], skipped={}, inputs=summary["inputs"])
    assert again["counts"]["generated"]["reused_chunks"] == 1 and again["counts"]["real"]["reused_chunks"] == 1
    assert (out / "samples.jsonl").read_bytes() == before
    assert again["figures"] == summary["figures"]


def test_evaluate_command_without_models_says_what_it_skipped(small_render_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HANDSYNTH_CACHE", str(tmp_path / "cache"))
    run = make_generate_run(tmp_path / "gen", small_render_run, 4)
    code = main(["evaluate", "--run", str(run)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads((run / "evaluation" / "summary.json").read_text())
    assert inception.INCEPTION_FILE in summary["skipped"]["fid/kid"]
    assert "--build-hand-model" in summary["skipped"]["keypoints"]
    assert inception.INCEPTION_FILE in captured.err and "--build-hand-model" in captured.err
    assert len((run / "evaluation" / "samples.jsonl").read_text().splitlines()) == 4
    assert (run / "evaluation" / "report.html").is_file()


def test_a_second_evaluation_of_the_same_out_is_refused_naming_the_first(small_render_run, tmp_path, capsys):
    from handsynth import rundir

    run = make_generate_run(tmp_path / "gen", small_render_run, 2)
    out = tmp_path / "eval"
    out.mkdir()
    with rundir.Lock(out / rundir.LOCK) as held:
        assert held.acquire(["handsynth", "evaluate", "--out", "first"])
        assert main(["evaluate", "--run", str(run), "--out", str(out)]) == 4
        err = " ".join(capsys.readouterr().err.split())
        assert f"pid {os.getpid()}" in err and "handsynth evaluate --out first" in err, err
        assert not (out / "summary.json").exists()
    assert main(["evaluate", "--run", str(run), "--out", str(out)]) == 0      # free once the first one ended
    assert (out / "summary.json").is_file() and not (out / rundir.LOCK).exists()


def test_evaluate_bad_inputs(tmp_path, small_render_run, capsys):
    assert main(["evaluate", "--run", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    run = make_generate_run(tmp_path / "gen", small_render_run, 2)
    assert main(["evaluate", "--run", str(run), "--inception", str(tmp_path / "none.pth")]) == 3
    assert main(["evaluate", "--run", str(run), "--crop-scale", "0.5"]) == 2


def test_build_hand_model_from_a_wheel(tmp_path, capsys):
    from handsynth.evaluate.landmarker import TASK_MEMBERS
    from tests.fixtures.evaluate import mediapipe_wheel

    target = tmp_path / "models" / "hand.task"
    assert main(["evaluate", "--build-hand-model", "--hand-model", str(target),
                 "--hand-wheel", str(mediapipe_wheel())]) == 0
    import zipfile

    with zipfile.ZipFile(target) as zf:
        assert sorted(zf.namelist()) == sorted(TASK_MEMBERS)
    first = target.read_bytes()
    assert main(["evaluate", "--build-hand-model", "--hand-model", str(target),
                 "--hand-wheel", str(mediapipe_wheel())]) == 0
    assert target.read_bytes() == first
    assert main(["evaluate", "--build-hand-model", "--hand-model", str(target),
                 "--hand-wheel", str(tmp_path / "missing.whl")]) == 3



# --- several runs compared ----------------------------------------------------------------------

def test_comparing_runs_scores_each_as_alone_against_one_real_set(scene_run, evaluated, hand_scene_render_run,
                                                                  hand_task_file, tiny_extractor, tmp_path,
                                                                  monkeypatch, capsys):
    """`evaluate --run A --run B`: each run's figures are those of evaluating it alone, the real set is computed
    once (for the first run) and shared, and the table marks the run with all samples misaligned as worse."""
    weights = tmp_path / inception.INCEPTION_FILE
    weights.write_bytes(b"stands for the weights; the tiny extractor is loaded instead")
    monkeypatch.setattr(inception, "find_weights", lambda path: weights)
    monkeypatch.setattr(inception, "load_inception", lambda path, device="cpu": tiny_extractor)
    worse = make_scene_generate_run(tmp_path / "worse", hand_scene_render_run, planted=tuple(range(6)))
    comparison = tmp_path / "cmp"
    code = main(["evaluate", "--run", str(scene_run), "--run", str(worse), "--hand-model", str(hand_task_file),
                 "--comparison", str(comparison)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    record = json.loads((comparison / "comparison.json").read_text())
    summaries = [json.loads((run / "evaluation" / "summary.json").read_text()) for run in (scene_run, worse)]
    for row, run, summary in zip(record["runs"], (scene_run, worse), summaries):
        assert row["run"] == str(run.resolve()) and row["figures"] == summary["figures"]["generated"]
        assert row["images"] == 6 and row["method"] == "Stable Diffusion alone (guidance none)"
    assert record["real"]["figures"] == summaries[0]["figures"]["real"] == summaries[1]["figures"]["real"]
    assert list((scene_run / "evaluation" / "cache").glob("real-*.npz"))          # computed for the first run
    assert not list((worse / "evaluation" / "cache").glob("real-*.npz"))          # and shared with the second
    alone = evaluated[1]["figures"]                       # the first run evaluated on its own (the stage)
    for key in ("fid", "kid", "fid_h", "kid_h", "hand_conf", "mse_2d", "detection_rate"):
        assert record["runs"][0]["figures"][key] == pytest.approx(alone["generated"][key], rel=1e-6), key
        assert record["real"]["figures"][key] == pytest.approx(alone["real"][key], rel=1e-6), key
    a, b = (row["figures"]["mse_2d"] for row in record["runs"])
    assert a < b
    markdown = (comparison / "comparison.md").read_text()
    assert f"**{a:.4g}**" in markdown and f"**{b:.4g}**" not in markdown
    assert markdown.count("\n| ") == 4 and "| paper | AttentionHand w/ TAS" in markdown     # 2 runs, real, paper
    out = " ".join(captured.out.split())
    assert scene_run.name in out and worse.name in out and "20.71" in out


def test_comparison_needs_one_real_set_and_distinct_runs(small_render_run, scene_run, tmp_path, capsys):
    other = make_generate_run(tmp_path / "other", small_render_run, 2)
    for args, message in (
            (["--run", str(scene_run), "--run", str(other)], "different render runs"),
            (["--run", str(scene_run), "--run", str(scene_run)], "given twice"),
            (["--run", str(scene_run), "--run", str(other), "--out", str(tmp_path / "e")], "--comparison")):
        assert main(["evaluate", *args, "--comparison", str(tmp_path / "cmp")]) == 2
        assert message in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "cmp").exists() and not (other / "evaluation").exists()


def test_method_of_a_run_from_its_manifest():
    from handsynth.evaluate.compare import method_of

    assert method_of({"model": {"guidance": "models/attentionhand"}, "recipe": {"resolved": {"tas": {
        "enabled": True}}}}) == "guidance models/attentionhand, TAS on"
    assert method_of({"model": {"guidance": "none"}, "recipe": {"resolved": {"tas": {"enabled": False}}}}) == \
        "Stable Diffusion alone (guidance none), TAS off"


# --- the gate ---------------------------------------------------------------------------------

def test_export_gate_drops_exactly_the_planted_samples(scene_run, evaluated, tmp_path, capsys):
    out, _, generated, _ = evaluated
    shards = tmp_path / "shards"
    code = main(["export", "--run", str(scene_run), "--out", str(shards), "--evaluation", str(out),
                 "--min-hand-score", "0.5", "--max-keypoint-error", "0.2"])
    assert code == 0, capsys.readouterr().err
    index = json.loads((shards / "index.json").read_text())
    planted = [generated.items[i].key for i in PLANTED]
    kept = [k for shard in index["shards"] for k in shard["keys"]]
    assert kept == [i.key for i in generated.items if i.key not in planted]
    assert index["filter"]["dropped"] == {"keypoint_error_above_max": len(PLANTED)}
    assert index["filter"]["dropped_keys"] == planted
    assert index["fingerprint"]["filter"] == {"min_hand_score": 0.5, "max_keypoint_error": 0.2}
    assert "dropped 2" in capsys.readouterr().out


def test_export_gate_refuses_an_unevaluated_run(scene_run, tmp_path, capsys):
    code = main(["export", "--run", str(scene_run), "--out", str(tmp_path / "s"), "--evaluation",
                 str(tmp_path / "none"), "--min-hand-score", "0.5"])
    assert code == 2
    err = capsys.readouterr().err
    assert "has not been evaluated" in err and "handsynth evaluate" in err
    assert not (tmp_path / "s" / "index.json").exists()


@pytest.mark.slow
def test_evaluate_command_with_an_inception_file(scene_run, hand_task_file, tmp_path, capsys):
    """The whole command with the real Inception loading path (random weights saved as the weights file)."""
    torch.manual_seed(0)
    weights = tmp_path / inception.INCEPTION_FILE
    torch.save(inception.FIDInceptionV3().state_dict(), weights)
    out = tmp_path / "evaluation"
    code = main(["evaluate", "--run", str(scene_run), "--out", str(out), "--inception", str(weights),
                 "--hand-model", str(hand_task_file)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] == {}
    assert summary["protocol"]["inception"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    for key in ("fid", "kid", "fid_h", "kid_h", "hand_conf", "mse_2d", "mse_3d"):
        assert summary["figures"]["generated"][key] is not None, key
    assert "FID-H" in captured.out and "20.71" in captured.out


def test_render_generate_evaluate_export_chain(tmp_path, monkeypatch, interhand_set, mano_dir, tiny_sd_dir,
                                               tiny_guidance_dir, hand_task_file, capsys):
    """The commands as typed, defaults connecting them; the tiny model's images hold no hand, so MediaPipe finds
    none: a gate that asks for a detected hand drops every sample, one that asks nothing keeps them all."""
    from tests.fixtures.generate import write_gen_recipe

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    write_gen_recipe(tmp_path, tiny_sd_dir, tiny_guidance_dir, name="outdoor.yaml")
    assert main(["render", "--labels", str(interhand_set), "--mano-dir", str(mano_dir)]) == 0
    assert main(["generate", "--recipe", "outdoor.yaml", "--count", "4", "--device", "cpu"]) == 0
    assert main(["export", "--format", "webdataset", "--min-hand-score", "0.5"]) == 2
    assert "has not been evaluated" in capsys.readouterr().err
    assert main(["evaluate", "--hand-model", str(hand_task_file)]) == 0
    gen_run, render_run = Path("runs") / "outdoor-gen", Path("runs") / "test_interhand2-6m_data"
    records = [json.loads(line) for line in (gen_run / "evaluation" / "samples.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    for r in records:
        label = json.loads((render_run / "labels" / f"{r['frame']}.json").read_text())
        assert [h["side"] for h in r["hands"]] == [h["side"] for h in label["hands"]]
    summary = json.loads((gen_run / "evaluation" / "summary.json").read_text())
    assert summary["counts"]["real"]["images"] == 4 and "fid/kid" in summary["skipped"]
    capsys.readouterr()
    assert all(r["detections"] == 0 and r["hand_score"] == 0.0 for r in records)      # noise, no hand
    assert main(["export", "--format", "webdataset", "--min-hand-score", "0.5"]) == 2
    assert "dropped every sample" in capsys.readouterr().err
    assert main(["export", "--format", "webdataset", "--out", "all", "--min-hand-score", "0"]) == 0
    index = json.loads((Path("all") / "index.json").read_text())
    assert index["samples"] == 4 and index["filter"]["dropped"] == {}

"""InterHand2.6M reader against the real 4-frame excerpt and InterHand's own conventions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from handsynth.errors import InputError
from handsynth.keys import is_valid_key
from handsynth.labels import FORMATS, detect_format, read_labels
from tests.fixtures.labels import SAMPLE, build_interhand_set, load_sample, mano_fit_for

KINDS = ("data", "camera", "joint_3d", "MANO_NeuralAnnot")
EXPECTED_KEYS = ["ih_3_400026_69148", "ih_2_400012_44669", "ih_7_410053_29590", "ih_4_410028_2017"]


def edit_json(path: Path, change) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def sibling(data: Path, kind: str) -> Path:
    return data.with_name(data.name.replace("_data.json", f"_{kind}.json"))


def test_projected_real_joints_fall_in_annotated_boxes(interhand_set):
    """Independent check of R/t: InterHand's joint_3d (world mm) projected through the reader's
    Camera (X_cam = R X + t, u = fx X/Z + cx) lands inside every annotated box, and equals
    InterHand's own formula R (X - campos) computed from the raw camera file."""
    sample = load_sample()
    labels = read_labels(interhand_set)
    assert len(labels.frames) == 4
    for frame in labels.frames:
        cap, cam, idx = (str(frame.source_id[k]) for k in ("capture", "camera", "frame_idx"))
        entry = sample["joint_3d"][cap][idx]
        X = np.asarray(entry["world_coord"]) / 1000.0
        valid = np.asarray(entry["joint_valid"]).reshape(-1).astype(bool)
        cam_m = X @ frame.camera.R.T + frame.camera.t
        raw = sample["camera"][cap]
        own = (np.asarray(raw["camrot"][cam]) @ (X * 1000 - np.asarray(raw["campos"][cam])).T).T
        np.testing.assert_allclose(cam_m * 1000, own, atol=1e-6)
        (fx, fy), (cx, cy) = frame.camera.focal, frame.camera.princpt
        u = fx * cam_m[:, 0] / cam_m[:, 2] + cx
        v = fy * cam_m[:, 1] / cam_m[:, 2] + cy
        x, y, w, h = frame.original["annotations"][0]["bbox"]
        assert valid.sum() >= 21
        assert np.all((u[valid] >= x) & (u[valid] <= x + w) & (v[valid] >= y) & (v[valid] <= y + h))
        assert np.all(cam_m[valid, 2] > 0.5)      # about a metre in front of the camera


def test_frames_hold_the_source_values(interhand_set):
    sample = load_sample()
    manos = json.loads(sibling(interhand_set, "MANO_NeuralAnnot").read_text())
    labels = read_labels(interhand_set)
    assert labels.format == "interhand26m" and labels.skipped == {}
    assert [f.key for f in labels.frames] == EXPECTED_KEYS
    for frame, img, ann in zip(labels.frames, sample["data"]["images"], sample["data"]["annotations"]):
        assert frame.image_size == (img["width"], img["height"])
        assert frame.image_path == interhand_set.parent / img["file_name"]
        cap, cam = str(img["capture"]), img["camera"]
        assert frame.camera.focal == tuple(sample["camera"][cap]["focal"][cam])
        assert frame.camera.princpt == tuple(sample["camera"][cap]["princpt"][cam])
        expected_sides = {"right": ["right"], "left": ["left"], "interacting": ["right", "left"]}
        assert [h.side for h in frame.hands] == expected_sides[ann["hand_type"]]
        mano = manos[cap][str(img["frame_idx"])]
        for hand in frame.hands:
            assert hand.valid
            for field in ("pose", "shape", "trans"):
                np.testing.assert_array_equal(getattr(hand, field), mano[hand.side][field])
        # the original annotation, unchanged
        assert frame.original == {"image": img, "annotations": [ann],
                                  "camera": {f: sample["camera"][cap][f][cam]
                                             for f in ("campos", "camrot", "focal", "princpt")},
                                  "mano": mano,
                                  "joint_3d": sample["joint_3d"][cap][str(img["frame_idx"])]}


def test_keys_are_stable_valid_and_unique(interhand_set, tmp_path):
    other = build_interhand_set(tmp_path / "elsewhere", prefix="InterHand2.6M_test")
    a = [f.key for f in read_labels(interhand_set).frames]
    b = [f.key for f in read_labels(other).frames]
    assert a == b == EXPECTED_KEYS
    assert all(is_valid_key(k) for k in a) and len(set(a)) == len(a)


@pytest.mark.parametrize("prefix", ["test_interhand2.6m", "InterHand2.6M_test"])
@pytest.mark.parametrize("kind", KINDS)
def test_any_file_of_the_set_finds_its_siblings(tmp_path, prefix, kind):
    data = build_interhand_set(tmp_path, prefix=prefix)
    named = sibling(data, kind)
    labels = read_labels(named)
    assert [f.key for f in labels.frames] == EXPECTED_KEYS
    assert sorted(p.name for p in labels.sources) == sorted(f"{prefix}_{k}.json" for k in KINDS)
    assert detect_format(named) == "interhand26m"


def test_siblings_match_case_insensitively_and_joint_3d_is_optional(tmp_path):
    data = build_interhand_set(tmp_path, joint_3d=False)
    mano = sibling(data, "MANO_NeuralAnnot")
    mano.rename(mano.with_name(mano.name.lower()))
    labels = read_labels(data)
    assert len(labels.frames) == 4 and len(labels.sources) == 3
    assert "joint_3d" not in labels.frames[0].original


@pytest.mark.parametrize("kind", KINDS)
def test_format_is_detected_from_content_not_name(interhand_set, tmp_path, kind):
    misleading = tmp_path / "coco_wholebody_train_v1.0.jsonl"
    shutil.copyfile(sibling(interhand_set, kind), misleading)
    assert detect_format(misleading) == "interhand26m"


def test_plain_coco_style_data_file_is_interhand_when_a_camera_file_is_beside_it(interhand_set):
    def strip(doc):   # a data file without InterHand's own image keys
        for img in doc["images"]:
            for k in ("capture", "frame_idx"):
                img.pop(k)
    edit_json(interhand_set, strip)
    assert detect_format(interhand_set) == "interhand26m"
    sibling(interhand_set, "camera").unlink()
    with pytest.raises(InputError, match="cannot tell the label format") as err:
        detect_format(interhand_set)
    assert all(name in err.value.message for name in FORMATS) and "--format" in err.value.message


def test_limit_keeps_the_first_frames(interhand_set):
    assert [f.key for f in read_labels(interhand_set, limit=2).frames] == EXPECTED_KEYS[:2]
    assert read_labels(interhand_set, limit=0).frames == []


@pytest.mark.parametrize("layout", ["images/test/{name}", "images/{name}", "../../images/test/{name}"])
def test_images_are_found_in_dataset_layouts(tmp_path, layout):
    data = build_interhand_set(tmp_path / "annotations" / "test", images=False)
    edit_json(data, lambda d: [img.update(file_name=f"Capture{img['capture']}/cam/{img['file_name']}")
                               for img in d["images"]])
    for jpg in SAMPLE.glob("*.jpg"):
        target = data.parent / layout.format(name=f"Capture{{}}/cam/{jpg.name}")
        capture = {"image69148.jpg": 3, "image44669.jpg": 2, "image29590.jpg": 7, "image2017.jpg": 4}
        target = Path(str(target).format(capture[jpg.name]))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(jpg, target)
    frames = read_labels(data).frames
    assert all(f.image_path is not None and f.image_path.resolve().is_file() for f in frames)
    assert frames[0].image_path.name == "image69148.jpg"


def test_missing_images_give_none(tmp_path):
    frames = read_labels(build_interhand_set(tmp_path, images=False)).frames
    assert [f.image_path for f in frames] == [None] * 4


# --- counted skips ----------------------------------------------------------------------------

def test_null_hands_missing_cameras_and_invalid_hand_types_are_counted(interhand_set):
    def cams(doc):      # capture 2's camera disappears
        del doc["2"]
    edit_json(sibling(interhand_set, "camera"), cams)

    def manos(doc):     # frame 69148 loses its left hand; frame 2017 has no fit at all
        doc["3"]["69148"]["left"] = None
        del doc["4"]["2017"]
    edit_json(sibling(interhand_set, "MANO_NeuralAnnot"), manos)

    def data(doc):      # the left-hand frame's hand type is not trusted
        doc["annotations"][2]["hand_type_valid"] = 0
    edit_json(interhand_set, data)

    labels = read_labels(interhand_set)
    assert [f.key for f in labels.frames] == ["ih_3_400026_69148"]
    assert [h.side for h in labels.frames[0].hands] == ["right"]
    assert labels.skipped == {"missing_camera": 1, "missing_mano": 1, "no_valid_hand": 1, "null_hand": 1}


def test_hand_outside_hand_type_is_kept_invalid(interhand_set):
    sample = load_sample()
    entry = sample["joint_3d"]["4"]["2017"]
    edit_json(sibling(interhand_set, "MANO_NeuralAnnot"),
              lambda d: d["4"]["2017"].update(left=mano_fit_for(entry, "right")))
    frame = read_labels(interhand_set).frames[3]
    assert [(h.side, h.valid) for h in frame.hands] == [("right", True), ("left", False)]


# --- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["data", "camera", "MANO_NeuralAnnot", "joint_3d"])
def test_malformed_json_names_the_file(interhand_set, kind):
    bad = sibling(interhand_set, kind)
    bad.write_text(bad.read_text()[:-40])
    with pytest.raises(InputError, match="not valid JSON") as err:
        read_labels(interhand_set)
    assert str(bad) in err.value.message


@pytest.mark.parametrize("kind", ["camera", "MANO_NeuralAnnot"])
def test_missing_required_sibling_names_the_expected_path(interhand_set, kind):
    sibling(interhand_set, kind).unlink()
    with pytest.raises(InputError) as err:
        read_labels(interhand_set)
    assert str(sibling(interhand_set, kind)) in err.value.message
    assert "missing" in err.value.message


def test_missing_data_file_when_naming_the_mano_file(interhand_set):
    interhand_set.unlink()
    with pytest.raises(InputError, match="image records") as err:
        read_labels(sibling(interhand_set, "MANO_NeuralAnnot"))
    assert str(interhand_set) in err.value.message


def _set_mano(field, value):
    return lambda d: d["3"]["69148"]["right"].__setitem__(field, value)


@pytest.mark.parametrize("change, names", [
    (_set_mano("pose", [0.0] * 45), ["'right.pose'", "48", "45"]),
    (_set_mano("shape", [0.0] * 11), ["'right.shape'", "10", "11"]),
    (_set_mano("trans", [0.0, 0.0]), ["'right.trans'", "3", "2"]),
    (_set_mano("trans", [0.0, float("nan"), 1.0]), ["'right.trans'", "non-finite", "(nan at index 1)"]),
    (_set_mano("pose", [float("inf")] + [0.0] * 47), ["'right.pose'", "non-finite", "(inf at index 0)"]),
    (_set_mano("shape", "zeros"), ["'right.shape'", "list of 10 numbers"]),
    (lambda d: d["3"]["69148"]["right"].pop("shape"), ["missing key 'shape'"]),
])
def test_bad_mano_values_name_file_record_and_field(interhand_set, change, names):
    mano = sibling(interhand_set, "MANO_NeuralAnnot")
    edit_json(mano, change)
    with pytest.raises(InputError) as err:
        read_labels(interhand_set)
    msg = err.value.message
    assert str(mano) in msg and "capture 3 frame 69148" in msg and "Fix:" in msg
    for name in names:
        assert name in msg


@pytest.mark.parametrize("change, names", [
    (lambda d: d["3"]["camrot"]["400026"].__setitem__(0, [2.0, 0.0, 0.0]), ["'camrot'", "not a rotation"]),
    (lambda d: d["3"]["focal"].__setitem__("400026", [-5.0, 10.0]), ["'focal'", "positive"]),
    (lambda d: d["3"]["campos"].__setitem__("400026", [1.0, None, 2.0]), ["'campos'", "numbers"]),
    (lambda d: d["3"].pop("princpt"), ["'princpt'", "missing"]),
])
def test_bad_camera_values(interhand_set, change, names):
    cam = sibling(interhand_set, "camera")
    edit_json(cam, change)
    with pytest.raises(InputError) as err:
        read_labels(interhand_set)
    msg = err.value.message
    assert str(cam) in msg and "capture 3 camera 400026" in msg
    for name in names:
        assert name in msg


@pytest.mark.parametrize("change, names", [
    (lambda d: d["images"][0].pop("width"), ["missing key 'width'", "image id 326750"]),
    (lambda d: d["images"][0].update(height=0), ["'height'", "positive"]),
    (lambda d: d["annotations"][0].update(hand_type="both"), ["hand_type", "'both'"]),
    (lambda d: d["annotations"][0].update(hand_type=["right"]), ["hand_type", "['right']"]),
    (lambda d: d["annotations"][0].update(image_id=[326750]), ["annotations[0]", "'image_id'", "integer"]),
    (lambda d: d["images"][0].update(id={"n": 1}), ["images[0]", "'id'", "integer"]),
    (lambda d: d.pop("annotations"), ["missing key 'annotations'"]),
])
def test_bad_data_records(interhand_set, change, names):
    edit_json(interhand_set, change)
    with pytest.raises(InputError) as err:
        read_labels(interhand_set)
    assert str(interhand_set) in err.value.message
    for name in names:
        assert name in err.value.message


def test_unknown_format_and_bad_limit(interhand_set):
    with pytest.raises(InputError, match="unknown label format 'freihand'") as err:
        read_labels(interhand_set, "freihand")
    assert all(name in err.value.message for name in FORMATS)
    with pytest.raises(InputError, match="--limit"):
        read_labels(interhand_set, limit=-1)


def test_fixture_places_the_mano_root_on_the_real_wrist(tmp_path):
    """With a MANO model, the fit's root joint (J_root + trans) is the joint_3d wrist and the
    global orientation turns the model's rest axes onto the real hand's axes."""
    from scipy.spatial.transform import Rotation

    from tests.fixtures.labels import _axes, mano_rest
    rng = np.random.default_rng(0)
    v = rng.normal(size=(778, 3)) * 0.05
    reg = np.zeros((16, 778))
    for j in range(16):
        reg[j, rng.choice(778, 5, replace=False)] = 0.2
    arrays = {s: {"v_template": v, "J_regressor": reg} for s in ("right", "left")}
    entry = load_sample()["joint_3d"]["3"]["69148"]
    X = np.asarray(entry["world_coord"]) / 1000
    for side, o in (("right", 0), ("left", 21)):
        fit = mano_fit_for(entry, side, arrays)
        root, rest = mano_rest(arrays, side)
        np.testing.assert_allclose(root + fit["trans"], X[o + 20], atol=1e-12)
        G = Rotation.from_rotvec(fit["pose"][:3]).as_matrix()
        np.testing.assert_allclose(G @ rest, _axes(X[o + 20], X[o + 7], X[o + 11], X[o + 19]), atol=1e-9)


def test_fixture_hands_land_on_the_real_hands(interhand_set, mano_dir):
    """MANO run on the read parameters (hand_model) puts each wrist joint on the real joint_3d
    wrist, which projects inside the annotated box, and most of the mesh inside it too."""
    from handsynth.hand_model import HandModel
    model = HandModel(mano_dir)
    for frame in read_labels(interhand_set).frames:
        world = np.asarray(frame.original["joint_3d"]["world_coord"]) / 1000.0
        x, y, w, h = frame.original["annotations"][0]["bbox"]
        for hand in frame.hands:
            out = model.forward(hand.side, hand.pose[None], hand.shape[None], hand.trans[None])
            joints = out.joints[0].double().numpy()
            np.testing.assert_allclose(joints[0], world[20 if hand.side == "right" else 41], atol=1e-5)
            cam = out.vertices[0].double().numpy() @ frame.camera.R.T + frame.camera.t
            u = frame.camera.focal[0] * cam[:, 0] / cam[:, 2] + frame.camera.princpt[0]
            v = frame.camera.focal[1] * cam[:, 1] / cam[:, 2] + frame.camera.princpt[1]
            assert np.mean((u >= x) & (u <= x + w) & (v >= y) & (v <= y + h)) > 0.5


def design_card_set(folder: Path) -> Path:
    """The set named as the design card's ``--labels interhand.json``: interhand.json + interhand_<kind>.json."""
    data = build_interhand_set(folder, prefix="interhand")
    return data.rename(folder / "interhand.json")


@pytest.mark.parametrize("named", ["interhand.json", "interhand_camera.json", "interhand_MANO_NeuralAnnot.json",
                                   "interhand_joint_3d.json"])
def test_a_data_file_x_json_finds_x_camera_and_the_others(tmp_path, named):
    design_card_set(tmp_path)
    labels = read_labels(tmp_path / named)
    assert [f.key for f in labels.frames] == EXPECTED_KEYS
    assert sorted(p.name for p in labels.sources) == sorted(
        ["interhand.json"] + [f"interhand_{k}.json" for k in KINDS[1:]])
    reference = read_labels(build_interhand_set(tmp_path / "reference"))
    assert [f.original for f in labels.frames] == [f.original for f in reference.frames]


def test_explicit_files_serve_any_other_naming(tmp_path):
    data = design_card_set(tmp_path)
    renamed = {"camera": tmp_path / "cams.json", "mano": tmp_path / "fits" / "neuralannot.json",
               "joint_3d": tmp_path / "j3d.json"}
    renamed["mano"].parent.mkdir()
    for role, kind in (("camera", "camera"), ("mano", "MANO_NeuralAnnot"), ("joint_3d", "joint_3d")):
        (tmp_path / f"interhand_{kind}.json").rename(renamed[role])
    with pytest.raises(InputError, match="--camera FILE"):
        read_labels(data)
    labels = read_labels(data, companions=renamed)
    assert [f.key for f in labels.frames] == EXPECTED_KEYS
    assert set(labels.sources) == {data, *renamed.values()}
    assert "joint_3d" in labels.frames[0].original
    # the wrong file for an option, a missing one, and the options with another format are clear errors
    with pytest.raises(InputError, match="--camera holds InterHand2.6M joint_3d records"):
        read_labels(data, companions={**renamed, "camera": renamed["joint_3d"]})
    with pytest.raises(InputError, match="--mano-params does not exist"):
        read_labels(data, companions={**renamed, "mano": tmp_path / "nope.json"})
    jsonl = tmp_path / "frames.jsonl"
    jsonl.write_text(json.dumps({"id": 1, "hands": []}) + "\n" + json.dumps({"id": 2, "hands": []}) + "\n")
    with pytest.raises(InputError, match="only apply to InterHand2.6M"):
        read_labels(jsonl, companions={"camera": renamed["camera"]})

"""MSCOCO NeuralAnnot reader (InterWild's fit files + COCO-WholeBody)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from handsynth.errors import InputError
from handsynth.keys import is_valid_key
from handsynth.labels import detect_format, read_labels
from tests.fixtures.labels import build_coco_set, coco_hand


def edit_json(path, change):
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def wholebody(mano):
    return mano.with_name(mano.name.replace("MSCOCO_", "coco_wholebody_").replace("_MANO_NeuralAnnot", "_v1.0"))


def test_frames_hold_the_fits_boxes_and_sizes(tmp_path):
    mano = build_coco_set(tmp_path)
    fits = json.loads(mano.read_text())
    wb = json.loads(wholebody(mano).read_text())
    labels = read_labels(mano)
    assert labels.format == "coco-neuralannot"
    assert labels.sources == [mano, wholebody(mano)]
    assert [f.key for f in labels.frames] == ["coco_11", "coco_12", "coco_13"]
    assert all(is_valid_key(f.key) for f in labels.frames)
    for frame, ann, img in zip(labels.frames, wb["annotations"], wb["images"]):
        aid = str(ann["id"])
        assert frame.original == {"mano": fits[aid], "annotation": ann, "image": img}
        assert frame.image_size == (512, 334)
        assert frame.image_path == tmp_path / "images" / "train2017" / img["file_name"]
        assert [h.side for h in frame.hands] == [s for s in ("right", "left") if fits[aid][s]]
        for hand in frame.hands:
            fit = fits[aid][hand.side]
            for field in ("pose", "shape", "trans"):
                np.testing.assert_array_equal(getattr(hand, field), fit["mano_param"][field])
            assert hand.bbox == tuple(ann[f"{hand.side}hand_box"]) and hand.valid
            assert frame.camera.focal == tuple(fit["cam_param"]["focal"])
            assert frame.camera.princpt == tuple(fit["cam_param"]["princpt"])


def test_camera_extrinsics_follow_interwild(tmp_path):
    """Without R/t the fits are camera coordinates (identity, zero); with them X_cam = R X + t,
    t in metres as InterWild adds it to metre-scale MANO output (no unit change)."""
    frames = read_labels(build_coco_set(tmp_path)).frames
    np.testing.assert_array_equal(frames[0].camera.R, np.eye(3))
    np.testing.assert_array_equal(frames[0].camera.t, np.zeros(3))
    R = Rotation.from_rotvec([0.1, 0.2, 0.3]).as_matrix()
    np.testing.assert_allclose(frames[2].camera.R, R, atol=1e-12)
    np.testing.assert_array_equal(frames[2].camera.t, [0.01, -0.02, 0.4])


def test_hands_with_different_cameras_become_separate_frames(tmp_path):
    mano = build_coco_set(tmp_path, {7: {"right": coco_hand(focal=(1000.0, 1000.0)),
                                         "left": coco_hand(focal=(1200.0, 1200.0))}})
    frames = read_labels(mano).frames
    assert [f.key for f in frames] == ["coco_7_right", "coco_7_left"]
    assert [f.camera.focal for f in frames] == [(1000.0, 1000.0), (1200.0, 1200.0)]
    assert [[h.side for h in f.hands] for f in frames] == [["right"], ["left"]]


def test_the_wholebody_file_can_be_named_and_detection_uses_content(tmp_path):
    mano = build_coco_set(tmp_path)
    assert [f.key for f in read_labels(wholebody(mano)).frames] == ["coco_11", "coco_12", "coco_13"]
    for src in (mano, wholebody(mano)):
        misleading = tmp_path / "other" / "InterHand2.6M_train_data.jsonl"
        misleading.parent.mkdir(exist_ok=True)
        shutil.copyfile(src, misleading)
        assert detect_format(misleading) == "coco-neuralannot"


def test_a_renamed_fit_file_finds_the_only_wholebody_file(tmp_path):
    mano = build_coco_set(tmp_path)
    renamed = mano.rename(tmp_path / "fits.json")
    assert len(read_labels(renamed).frames) == 3


def test_images_beside_the_annotations_folder_or_absent(tmp_path):
    mano = build_coco_set(tmp_path / "annotations", image_layout="../images/train2017")
    frames = read_labels(mano).frames
    assert frames[0].image_path.resolve() == (tmp_path / "images/train2017/000000001011.jpg").resolve()
    assert [f.image_path for f in read_labels(build_coco_set(tmp_path / "a/b/c", image_layout=None)).frames] \
        == [None] * 3


def test_limit_and_counted_skips(tmp_path):
    mano = build_coco_set(tmp_path)
    assert [f.key for f in read_labels(mano, limit=2).frames] == ["coco_11", "coco_12"]

    def change(doc):
        doc["12"] = None                       # a person without fits
        doc["99"] = {"right": coco_hand(), "left": None}   # no WholeBody annotation
        doc["11"]["left"] = None               # WholeBody says the left hand is there
    edit_json(mano, change)
    labels = read_labels(mano)
    assert [f.key for f in labels.frames] == ["coco_11", "coco_13"]
    assert labels.skipped == {"missing_wholebody_annotation": 1, "no_valid_hand": 1, "null_hand": 2}


def test_missing_wholebody_file(tmp_path):
    mano = build_coco_set(tmp_path)
    wholebody(mano).unlink()
    with pytest.raises(InputError, match="image sizes") as err:
        read_labels(mano)
    assert str(wholebody(mano)) in err.value.message and "COCO-WholeBody" in err.value.message


@pytest.mark.parametrize("change, names", [
    (lambda d: d["11"]["right"]["mano_param"].update(pose=[0.0] * 47), ["'right.mano_param.pose'", "48"]),
    (lambda d: d["11"]["right"]["mano_param"].update(trans=[0.0, float("inf"), 0.0]),
     ["'right.mano_param.trans'", "non-finite"]),
    (lambda d: d["11"]["left"].pop("cam_param"), ["missing key 'cam_param'"]),
    (lambda d: d["11"]["left"]["cam_param"].update(focal=[0.0, 1.0]), ["'left.cam_param.focal'", "positive"]),
    (lambda d: d["11"]["left"]["cam_param"].update(R=np.eye(3).tolist()), ["'left.cam_param.t'", "'R' is given"]),
    (lambda d: d["11"]["left"]["cam_param"].update(R=[[1, 0, 0], [0, 1, 0], [0, 0, -1]], t=[0, 0, 0]),
     ["'left.cam_param.R'", "not a rotation"]),
])
def test_bad_fits_name_file_record_and_field(tmp_path, change, names):
    mano = build_coco_set(tmp_path)
    edit_json(mano, change)
    with pytest.raises(InputError) as err:
        read_labels(mano)
    msg = err.value.message
    assert str(mano) in msg and "annotation id 11" in msg
    for name in names:
        assert name in msg


def test_bad_wholebody_records(tmp_path):
    mano = build_coco_set(tmp_path)
    edit_json(wholebody(mano), lambda d: d["images"][0].pop("width"))
    with pytest.raises(InputError, match="missing key 'width'") as err:
        read_labels(mano)
    assert str(wholebody(mano)) in err.value.message and "image id 1011" in err.value.message
    edit_json(wholebody(mano), lambda d: d["annotations"][0].update(image_id=[1011]))
    with pytest.raises(InputError, match="'image_id' must be a non-empty string or an integer") as err:
        read_labels(mano)
    assert str(wholebody(mano)) in err.value.message
    edit_json(wholebody(mano), lambda d: d.update(images=None))
    with pytest.raises(InputError, match="'images' must be a list, got NoneType") as err:
        read_labels(mano)
    assert str(wholebody(mano)) in err.value.message
    wholebody(mano).write_text("{\"images\": [")
    with pytest.raises(InputError, match="not valid JSON"):
        read_labels(mano)

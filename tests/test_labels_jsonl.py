"""handsynth JSON Lines reader, and format detection / dispatch shared by all readers."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from handsynth.errors import InputError
from handsynth.labels import FORMATS, detect_format, read_labels
from tests.fixtures.labels import SAMPLE, jsonl_record, write_jsonl


def test_records_become_frames(tmp_path):
    shutil.copyfile(SAMPLE / "image2017.jpg", tmp_path / "a.jpg")
    R = Rotation.from_rotvec([0.0, 0.3, 0.0]).as_matrix()
    recs = [jsonl_record("Cap1/Frame.0001", image="a.jpg", extra={"note": 1}),
            jsonl_record(7, image="missing.jpg", K=None, focal=[600.0, 610.0], princpt=[150.0, 100.0],
                         R=R.tolist(), t=[0.1, 0.2, 0.3],
                         hands=[{"side": "left", "pose": [0.0] * 48, "shape": [0.5] * 10,
                                 "trans": [0.0, 0.0, 1.0], "bbox": [1, 2, 3, 4]},
                                {"side": "right", "pose": [0.0] * 48, "shape": [0.0] * 10,
                                 "trans": [0.0, 0.0, 1.0], "valid": False}])]
    recs[1].pop("K")
    path = write_jsonl(tmp_path / "labels.jsonl", ["", *recs])
    labels = read_labels(path)
    assert labels.format == "handsynth-jsonl" and labels.sources == [path] and labels.skipped == {}
    a, b = labels.frames
    assert [a.key, b.key] == ["cap1-frame-0001", "7"]
    assert a.source_id == {"id": "Cap1/Frame.0001", "line": 2} and a.original == recs[0]
    assert a.image_path == tmp_path / "a.jpg" and b.image_path is None
    np.testing.assert_array_equal(a.camera.K, recs[0]["K"])
    np.testing.assert_array_equal(a.camera.R, np.eye(3))
    np.testing.assert_array_equal(a.camera.t, np.zeros(3))
    np.testing.assert_array_equal(a.hands[0].pose, recs[0]["hands"][0]["pose"])
    np.testing.assert_array_equal(a.hands[0].trans, recs[0]["hands"][0]["trans"])
    assert b.camera.focal == (600.0, 610.0) and b.camera.princpt == (150.0, 100.0)
    np.testing.assert_allclose(b.camera.R, R, atol=1e-12)
    np.testing.assert_array_equal(b.camera.t, [0.1, 0.2, 0.3])
    assert [(h.side, h.valid, h.bbox) for h in b.hands] == [("left", True, (1.0, 2.0, 3.0, 4.0)),
                                                            ("right", False, None)]
    np.testing.assert_array_equal(b.hands[0].shape, [0.5] * 10)


def test_limit_and_frames_without_valid_hands(tmp_path):
    recs = [jsonl_record(f"f{i}") for i in range(4)]
    recs[1]["hands"] = []
    path = write_jsonl(tmp_path / "l.jsonl", recs)
    labels = read_labels(path)
    assert [f.key for f in labels.frames] == ["f0", "f2", "f3"] and labels.skipped == {"no_valid_hand": 1}
    assert [f.key for f in read_labels(path, limit=2).frames] == ["f0", "f2"]


def _hand(**kw):
    hand = jsonl_record()["hands"][0]
    hand.update(kw)
    return [hand]


@pytest.mark.parametrize("line, names", [
    ('{"id": "x", "width": 3', ["line 2 is not valid JSON"]),
    ('{"id": "x", "wid\x01"}', ["line 2 is not valid JSON: Invalid control character at column 17"]),
    ("[1, 2]", ["line 2 should be a JSON object"]),
    (jsonl_record("x", hands=_hand(pose=[0.0] * 47)), ["'hands[0].pose'", "48", "47"]),
    (jsonl_record("x", hands=_hand(shape=[0.0] * 9)), ["'hands[0].shape'", "10"]),
    (jsonl_record("x", hands=_hand(trans=[0.0, float("nan"), 0.0])), ["'hands[0].trans'", "non-finite"]),
    (jsonl_record("x", hands=_hand(side="both")), ["'hands[0].side'", "'both'"]),
    (jsonl_record("x", hands=_hand() + _hand()), ["'hands'", "same side twice"]),
    (jsonl_record("x", R=[[1, 0, 0], [0, 1, 0], [0, 0, 2]]), ["'R'", "not a rotation"]),
    (jsonl_record("x", t=[0, 0]), ["'t'", "3"]),
    (jsonl_record("x", K=[[500, 1, 0], [0, 500, 0], [0, 0, 1]]), ["'K'", "without skew"]),
    (jsonl_record("x", K=[[-5, 0, 0], [0, 500, 0], [0, 0, 1]]), ["'K'", "positive"]),
    (jsonl_record("x", focal=[1, 1]), ["'K'", "either K or focal"]),
    (jsonl_record("x", width=-3), ["'width'", "positive"]),
    (jsonl_record("x", image=5), ["'image'", "path"]),
    (jsonl_record("frame-0"), ["line 2", "same frame key", "line 1"]),
    ({k: v for k, v in jsonl_record("x").items() if k != "height"}, ["missing key 'height'"]),
    ({k: v for k, v in jsonl_record("x").items() if k != "K"}, ["missing key 'focal'"]),
])
def test_bad_lines_name_the_file_line_and_field(tmp_path, line, names):
    path = write_jsonl(tmp_path / "labels.jsonl", [jsonl_record("frame-0"), line])
    with pytest.raises(InputError) as err:
        read_labels(path)
    msg = err.value.message
    assert str(path) in msg and "line 2" in msg and "Fix:" in msg
    for name in names:
        assert name in msg


# --- detection and dispatch -------------------------------------------------------------------

def test_jsonl_is_detected_from_content(tmp_path):
    many = write_jsonl(tmp_path / "InterHand2.6M_train_data.json", [jsonl_record("a"), jsonl_record("b")])
    one = write_jsonl(tmp_path / "MSCOCO_train_MANO_NeuralAnnot.json", [jsonl_record("a")])
    assert detect_format(many) == detect_format(one) == "handsynth-jsonl"
    assert [f.key for f in read_labels(many).frames] == ["a", "b"]
    assert [f.key for f in read_labels(one).frames] == ["a"]


@pytest.mark.parametrize("content", ['{"foo": {"bar": 1}}', "[1, 2, 3]", '{"images": []}', "{}"])
def test_undetectable_content_lists_the_formats(tmp_path, content):
    path = tmp_path / "labels.json"
    path.write_text(content)
    for call in (lambda: detect_format(path), lambda: read_labels(path)):
        with pytest.raises(InputError, match="cannot tell the label format") as err:
            call()
        assert str(path) in err.value.message and "--format" in err.value.message
        assert all(f"'{name}'" in err.value.message for name in FORMATS)


def test_format_override_and_unreadable_files(tmp_path, interhand_set):
    path = write_jsonl(tmp_path / "labels.jsonl", [jsonl_record("a")])
    with pytest.raises(InputError, match="which InterHand2.6M file"):   # forced format, wrong content
        read_labels(path, "interhand26m")
    with pytest.raises(InputError, match="line 1 is not valid JSON"):
        read_labels(interhand_set.with_name("test_interhand2.6m_camera.json"), "handsynth-jsonl")
    with pytest.raises(InputError, match="unknown label format 'csv'"):
        read_labels(path, "csv")
    empty = tmp_path / "empty.json"
    empty.write_text("\n\n")
    with pytest.raises(InputError, match="empty"):
        read_labels(empty)
    with pytest.raises(InputError, match="does not exist"):
        read_labels(tmp_path / "nope.json")
    with pytest.raises(InputError, match="folder"):
        read_labels(tmp_path)
    malformed = tmp_path / "bad.json"
    malformed.write_text('{\n  "images": [\n')
    with pytest.raises(InputError, match="not valid JSON: .* line 3") as err:
        read_labels(malformed)
    assert str(malformed) in err.value.message
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(InputError, match="UTF-8"):
        read_labels(binary)
    assert json.loads(path.read_text())["id"] == "a"     # inputs untouched

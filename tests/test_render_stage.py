"""The render stage end to end on the real InterHand2.6M excerpt and small JSONL sets."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from handsynth.cli import main
from handsynth.errors import OutputError
from handsynth.hand_model import HandModel
from handsynth.render.stage import render_run
from tests.fixtures.labels import jsonl_record, write_jsonl

KEYS = ["ih_3_400026_69148", "ih_2_400012_44669", "ih_7_410053_29590", "ih_4_410028_2017"]   # source order


def _files(out: Path) -> dict[str, bytes]:
    """Every output file except the manifest (which records times), by relative path."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in ("manifest.json", ".handsynth.lock")}


def _snapshot(out: Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(out)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ih_run(tmp_path_factory, mano_dir):
    """One full run over the real excerpt (module-scoped: several tests read it)."""
    from tests.fixtures.labels import build_interhand_set
    from handsynth.hand_model import load_mano_arrays

    base = tmp_path_factory.mktemp("ih")
    arrays = {side: load_mano_arrays(Path(mano_dir), side) for side in ("right", "left")}
    labels = build_interhand_set(base / "labels", mano_arrays=arrays)
    out = base / "run"
    summary = render_run(labels, out, mano_dir=mano_dir)
    return labels, out, summary


def _source(labels: Path) -> dict:
    folder, prefix = labels.parent, labels.name.rsplit("_", 1)[0]
    return {kind: json.loads((folder / f"{prefix}_{kind}.json").read_text())
            for kind in ("data", "camera", "MANO_NeuralAnnot")}


def test_run_directory_layout_and_manifest(ih_run):
    labels, out, summary = ih_run
    assert summary.frames == summary.rendered == 4 and summary.skipped == {}
    lines = (out / "labels.jsonl").read_text().splitlines()
    assert [json.loads(line)["key"] for line in lines] == KEYS
    for key, line in zip(KEYS, lines):
        assert json.loads(line) == json.loads((out / "labels" / f"{key}.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "render" and manifest["status"] == "complete"
    assert manifest["counts"]["rendered"] == 4 and manifest["counts"]["rgb_local"] == 4
    assert {Path(e["path"]).name for e in manifest["inputs"]["labels"]} >= {
        "test_interhand2.6m_data.json", "test_interhand2.6m_camera.json", "test_interhand2.6m_MANO_NeuralAnnot.json"}
    for entry in manifest["inputs"]["labels"]:
        assert entry["sha256"] == hashlib.sha256(Path(entry["path"]).read_bytes()).hexdigest()
    assert set(manifest["mano"]["files"]) == {"MANO_RIGHT.pkl", "MANO_LEFT.pkl"}
    data = _source(labels)["data"]
    for key, img in zip(KEYS, data["images"]):
        assert Image.open(out / "global" / f"{key}.png").size == (img["width"], img["height"])
        assert Image.open(out / "local" / f"{key}.png").size == (512, 512)
        assert Image.open(out / "rgb_local" / f"{key}.jpg").size == (512, 512)


def test_labels_keep_the_source_and_derive_consistent_geometry(ih_run, mano_dir):
    labels, out, _ = ih_run
    src = _source(labels)
    model = HandModel(mano_dir)
    for img in src["data"]["images"]:
        cap, cam, fr = str(img["capture"]), str(img["camera"]), str(img["frame_idx"])
        key = f"ih_{cap}_{cam}_{fr}"
        label = json.loads((out / "labels" / f"{key}.json").read_text())
        # the original annotation travels unchanged
        assert label["original"]["image"] == img
        assert label["original"]["annotations"] == [a for a in src["data"]["annotations"] if a["image_id"] == img["id"]]
        assert label["original"]["mano"] == src["MANO_NeuralAnnot"][cap][fr]
        assert label["joint_order"] == "openpose21" and label["units"]["length"] == "metres"
        c = src["camera"][cap]
        campos, camrot = np.array(c["campos"][cam]), np.array(c["camrot"][cam])
        (fx, fy), (cx, cy) = c["focal"][cam], c["princpt"][cam]
        assert label["hands"], key
        for hand in label["hands"]:
            params = src["MANO_NeuralAnnot"][cap][fr][hand["side"]]
            assert hand["mano"] == {"pose": params["pose"], "shape": params["shape"], "trans": params["trans"]}
            # camera space by InterHand's formula, in mm, from the MANO output in world metres
            world = model.forward(hand["side"], np.array([params["pose"]]), np.array([params["shape"]]),
                                  np.array([params["trans"]]))
            def cam_mm(points_m):
                return (np.asarray(points_m, dtype=np.float64) * 1000.0 - campos) @ camrot.T
            joints_mm = cam_mm(world.joints[0].numpy())
            np.testing.assert_allclose(np.array(hand["joints_cam"]) * 1000.0, joints_mm, atol=1e-6)
            uv = np.column_stack([fx * joints_mm[:, 0] / joints_mm[:, 2] + cx, fy * joints_mm[:, 1] / joints_mm[:, 2] + cy])
            np.testing.assert_allclose(hand["joints_2d"], uv, atol=1e-6)
            verts_mm = cam_mm(world.vertices[0].numpy())
            vu = np.column_stack([fx * verts_mm[:, 0] / verts_mm[:, 2] + cx, fy * verts_mm[:, 1] / verts_mm[:, 2] + cy])
            x0, y0, x1, y1 = hand["box"]
            eps = 1e-6
            assert (vu[:, 0] >= x0 - eps).all() and (vu[:, 0] <= x1 + eps).all()
            assert (vu[:, 1] >= y0 - eps).all() and (vu[:, 1] <= y1 + eps).all()
            np.testing.assert_allclose([x0, y0, x1, y1], [*vu.min(0), *vu.max(0)], atol=1e-6)


def _covered(mask: np.ndarray, uv: np.ndarray, tol: int = 2) -> np.ndarray:
    h, w = mask.shape
    inside = (uv[:, 0] >= -0.5) & (uv[:, 0] < w - 0.5) & (uv[:, 1] >= -0.5) & (uv[:, 1] < h - 0.5)
    ok = []
    for u, v in np.rint(uv[inside]).astype(int):
        ok.append(mask[max(v - tol, 0):v + tol + 1, max(u - tol, 0):u + tol + 1].any())
    return np.array(ok)


def test_silhouettes_cover_projected_joints_globally_and_locally(ih_run):
    _, out, _ = ih_run
    for key in KEYS:
        label = json.loads((out / "labels" / f"{key}.json").read_text())
        glob = np.asarray(Image.open(out / "global" / f"{key}.png")).any(axis=2)
        local = np.asarray(Image.open(out / "local" / f"{key}.png")).any(axis=2)
        x0, y0, x1, y1 = label["crop_box"]
        assert x1 - x0 == pytest.approx(y1 - y0)
        for hand in label["hands"]:
            uv = np.array(hand["joints_2d"])
            assert len(_covered(glob, uv)) > 0 and _covered(glob, uv).all(), key
            # the crop by hand: shift to the box's edge, scale to 512 px, pixel centres at integers
            local_uv = (uv - [x0, y0]) * (512.0 / (x1 - x0)) - 0.5
            assert len(_covered(local, local_uv)) == 21 and _covered(local, local_uv, tol=3).all(), key
            # the crop box holds the hand's box
            bx0, by0, bx1, by1 = hand["box"]
            assert x0 <= bx0 and y0 <= by0 and bx1 <= x1 and by1 <= y1
        # nothing is drawn outside the hands' boxes (1 px of anti-aliasing allowed)
        ys, xs = np.nonzero(glob)
        boxes = np.array([h["box"] for h in label["hands"]])
        assert xs.min() >= boxes[:, 0].min() - 1.5 and xs.max() <= boxes[:, 2].max() + 1.5
        assert ys.min() >= boxes[:, 1].min() - 1.5 and ys.max() <= boxes[:, 3].max() + 1.5


def test_rgb_crop_matches_the_source_image(ih_run):
    labels, out, _ = ih_run
    key = KEYS[0]
    label = json.loads((out / "labels" / f"{key}.json").read_text())
    src = np.asarray(Image.open(labels.parent / label["original"]["image"]["file_name"]).convert("RGB"), dtype=float)
    crop = np.asarray(Image.open(out / "rgb_local" / f"{key}.jpg"), dtype=float)
    x0, y0, x1, y1 = label["crop_box"]
    s = 512.0 / (x1 - x0)
    # sample crop pixels well inside the image and compare with the source pixel they come from
    diffs = []
    for i in range(40, 480, 37):
        for j in range(40, 480, 41):
            u, v = x0 + (i + 0.5) / s - 0.5, y0 + (j + 0.5) / s - 0.5
            if 2 <= u < src.shape[1] - 2 and 2 <= v < src.shape[0] - 2:
                diffs.append(np.abs(crop[j, i] - src[int(round(v)), int(round(u))]).mean())
    assert len(diffs) > 20 and np.median(diffs) < 12


def test_reruns_are_byte_identical(ih_run, tmp_path, mano_dir):
    labels, out, _ = ih_run
    again = tmp_path / "again"
    render_run(labels, again, mano_dir=mano_dir)
    first, second = _files(out), _files(again)
    assert list(first) == list(second) and len(first) == 4 * 4 + 1
    assert all(first[name] == second[name] for name in first)


def test_resume_keeps_finished_frames_and_recovers_from_interruption(ih_run, tmp_path, mano_dir):
    labels, full, _ = ih_run
    out = tmp_path / "run"
    assert main(["render", "--labels", str(labels), "--out", str(out), "--mano-dir", str(mano_dir),
                 "--limit", "2"]) == 0
    assert sorted(p.stem for p in (out / "labels").glob("*.json")) == sorted(KEYS[:2])
    before = _snapshot(out)
    assert main(["render", "--labels", str(labels), "--out", str(out), "--mano-dir", str(mano_dir)]) == 0
    after = _snapshot(out)
    for name, state in before.items():
        if name.startswith(("global/", "local/", "rgb_local/", "labels/")):
            assert after[name] == state, name            # same bytes, never rewritten (same mtime)
    assert _files(out) == _files(full)
    # an interrupted run: frame 3's label never written, a temporary file left behind
    (out / "labels" / f"{KEYS[2]}.json").unlink()
    (out / "global" / f".{KEYS[2]}.png.abc123.tmp").write_bytes(b"half a png")
    kept = _snapshot(out)
    assert main(["render", "--labels", str(labels), "--out", str(out), "--mano-dir", str(mano_dir)]) == 0
    assert not list(out.rglob("*.tmp"))
    assert _files(out) == _files(full)
    final = _snapshot(out)
    for key in (KEYS[0], KEYS[1], KEYS[3]):
        assert final[f"labels/{key}.json"] == kept[f"labels/{key}.json"]
        assert final[f"global/{key}.png"] == kept[f"global/{key}.png"]
    assert json.loads((out / "manifest.json").read_text())["counts"]["stray_temporaries_removed"] == 1


def test_resume_redoes_frames_whose_images_are_damaged(ih_run, tmp_path, mano_dir):
    """Complete means 'every listed image matches the sha256 its label recorded': a truncated or
    bit-flipped mesh image is rendered again on resume, to the same bytes; other frames are untouched."""
    labels, full, _ = ih_run
    out = tmp_path / "run"
    shutil.copytree(full, out)
    label = json.loads((out / "labels" / f"{KEYS[1]}.json").read_text())
    assert set(label["images_sha256"]) == set(label["images"])
    truncated, flipped = out / "global" / f"{KEYS[1]}.png", out / "local" / f"{KEYS[2]}.png"
    truncated.write_bytes(truncated.read_bytes()[:-40])
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x10
    flipped.write_bytes(bytes(data))
    before = _snapshot(out)
    assert main(["render", "--labels", str(labels), "--out", str(out), "--mano-dir", str(mano_dir)]) == 0
    assert _files(out) == _files(full)
    after = _snapshot(out)
    assert json.loads((out / "manifest.json").read_text())["counts"]["already_done"] == 2
    for key in (KEYS[0], KEYS[3]):
        assert after[f"labels/{key}.json"] == before[f"labels/{key}.json"]
        assert after[f"global/{key}.png"] == before[f"global/{key}.png"]


@pytest.fixture
def edge_cases(tmp_path):
    """JSONL frames: fine, behind the camera, outside the image, and one hand fine + one behind."""
    ok = {"side": "right", "pose": [0.0] * 48, "shape": [0.0] * 10, "trans": [-0.1, 0.0, 0.6]}
    behind = dict(ok, trans=[-0.1, 0.0, -0.6])
    outside = dict(ok, trans=[3.0, 0.0, 0.6])
    left_behind = dict(behind, side="left")
    return write_jsonl(tmp_path / "edge.jsonl", [
        jsonl_record("ok", hands=[ok]), jsonl_record("behind", hands=[behind]),
        jsonl_record("outside", hands=[outside]), jsonl_record("mixed", hands=[ok, left_behind])])


def test_hands_behind_camera_or_outside_image_are_skipped_and_counted(edge_cases, tmp_path, mano_dir, capsys):
    out = tmp_path / "run"
    assert main(["render", "--labels", str(edge_cases), "--out", str(out), "--mano-dir", str(mano_dir)]) == 0
    err = capsys.readouterr().err
    assert "behind skipped: behind_camera" in err and "outside skipped: outside_image" in err
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["skipped"] == {"behind_camera": 1, "outside_image": 1}
    assert counts["skipped_hands"] == {"behind_camera": 2, "outside_image": 1}
    assert counts["rendered"] == 2
    assert sorted(p.name for p in (out / "global").iterdir()) == ["mixed.png", "ok.png"]
    mixed = json.loads((out / "labels" / "mixed.json").read_text())
    assert [h["side"] for h in mixed["hands"]] == ["right"] and mixed["skipped_hands"] == {"behind_camera": 1}
    # the skipped left hand does not change the image: it equals the frame with only the right hand
    assert (out / "global" / "mixed.png").read_bytes() == (out / "global" / "ok.png").read_bytes()
    assert "rgb_local" not in mixed["images"] and not (out / "rgb_local").exists()


def test_unwritable_output_dir(edge_cases, tmp_path, mano_dir, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError):
        render_run(edge_cases, blocker / "run", mano_dir=mano_dir)
    code = main(["render", "--labels", str(edge_cases), "--out", str(blocker / "run"), "--mano-dir", str(mano_dir)])
    err = capsys.readouterr().err
    assert code == OutputError.exit_code and "cannot write" in err and "Traceback" not in err


def test_bad_inputs_fail_cleanly_and_keep_the_earlier_run(edge_cases, tmp_path, mano_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # default --out: runs/<labels stem>, printed
    assert main(["render", "--labels", str(edge_cases), "--mano-dir", str(mano_dir)]) == 0
    out = tmp_path / "runs" / "edge"
    assert "runs/edge" in capsys.readouterr().err
    before = _snapshot(out)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": "x", "width": 3\n')
    bad_mano = tmp_path / "no-mano"
    bad_mano.mkdir()
    corrupt_mano = tmp_path / "corrupt-mano"
    corrupt_mano.mkdir()
    (corrupt_mano / "MANO_RIGHT.pkl").write_bytes((Path(mano_dir) / "MANO_RIGHT.pkl").read_bytes()[:1000])
    (corrupt_mano / "MANO_LEFT.pkl").write_bytes((Path(mano_dir) / "MANO_LEFT.pkl").read_bytes())
    cases = [
        ["--labels", str(broken)],                                         # malformed JSON
        ["--labels", str(edge_cases), "--format", "nonsense"],             # unknown format
        ["--labels", str(tmp_path / "missing.json")],                      # missing file
        ["--labels", str(edge_cases), "--mano-dir", str(bad_mano)],        # missing MANO files
        ["--labels", str(edge_cases), "--mano-dir", str(corrupt_mano)],    # truncated MANO file
        ["--labels", str(edge_cases), "--style", "depth"],                 # other settings into the same run
        ["--labels", str(edge_cases), "--local-size", "3"],
    ]
    for args in cases:
        argv = ["render", "--out", str(out), *args]
        if "--mano-dir" not in args:
            argv += ["--mano-dir", str(mano_dir)]
        code = main(argv)
        err = capsys.readouterr().err
        assert code != 0, args
        assert "Traceback" not in err and "error" in err.lower(), args
        assert _snapshot(out) == before, args
    # bad input creates no output directory either
    assert main(["render", "--labels", str(broken), "--out", str(tmp_path / "fresh"), "--mano-dir", str(mano_dir)]) != 0
    for mano in (bad_mano, corrupt_mano):       # MANO files are checked before anything is written
        assert main(["render", "--labels", str(edge_cases), "--out", str(tmp_path / "fresh"), "--mano-dir",
                     str(mano)]) != 0
        assert "MANO_RIGHT.pkl" in capsys.readouterr().err
    assert not (tmp_path / "fresh").exists()


def test_unreadable_or_oversized_source_images_only_drop_the_rgb_crop(tmp_path, mano_dir, monkeypatch, capsys):
    import PIL.Image

    Image.new("RGB", (320, 240), (90, 60, 30)).save(tmp_path / "photo.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    labels = write_jsonl(tmp_path / "photos.jsonl", [jsonl_record("big", image="photo.png"),
                                                      jsonl_record("broken", image="broken.png")])
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)      # 320x240 now counts as a decompression bomb
    summary = render_run(labels, tmp_path / "run", mano_dir=mano_dir)
    assert summary.rendered == 2 and not (tmp_path / "run" / "rgb_local").exists()
    err = capsys.readouterr().err
    assert f"cannot read image {tmp_path / 'photo.png'}; no rgb_local crop" in err
    assert f"cannot read image {tmp_path / 'broken.png'}; no rgb_local crop" in err


def test_temporary_looking_files_of_a_folder_that_is_no_run_are_kept(edge_cases, tmp_path, mano_dir):
    out = tmp_path / "mine"
    out.mkdir()
    (out / ".notes.txt.tmp").write_text("the user's")
    summary = render_run(edge_cases, out, mano_dir=mano_dir, limit=1)
    assert summary.rendered == 1 and (out / ".notes.txt.tmp").read_text() == "the user's"
    assert json.loads((out / "manifest.json").read_text())["counts"]["stray_temporaries_removed"] == 0


def test_mirrored_hand_and_camera_render_mirrored(tmp_path, mano_dir):
    """A right hand and its mirror-image left hand, seen by mirrored cameras, give mirrored images."""
    rng = np.random.default_rng(3)
    pose = rng.normal(0.0, 0.2, 48)
    pose[:3] = [0.3, -2.6, 0.4]
    shape = rng.normal(0.0, 0.5, 10)
    trans = np.array([-0.02, 0.01, 0.05])
    mirror = np.tile([1.0, -1.0, -1.0], 16)                     # axis-angle under x -> -x
    R = np.array([[0.96, 0.0, 0.28], [0.0, 1.0, 0.0], [-0.28, 0.0, 0.96]])
    R = np.linalg.svd(R)[0] @ np.linalg.svd(R)[2]
    t = np.array([0.02, -0.01, 0.55])
    M = np.diag([-1.0, 1.0, 1.0])
    width, height = 320, 240
    K = [[500.0, 0.0, 150.0], [0.0, 505.0, 118.0], [0.0, 0.0, 1.0]]
    Km = [[500.0, 0.0, width - 1 - 150.0], [0.0, 505.0, 118.0], [0.0, 0.0, 1.0]]
    hand = {"side": "right", "pose": pose.tolist(), "shape": shape.tolist(), "trans": trans.tolist()}
    left = {"side": "left", "pose": (pose * mirror).tolist(), "shape": shape.tolist(), "trans": (M @ trans).tolist()}
    labels = write_jsonl(tmp_path / "mirror.jsonl", [
        jsonl_record("right", width=width, height=height, K=K, R=R.tolist(), t=t.tolist(), hands=[hand]),
        jsonl_record("left", width=width, height=height, K=Km, R=(M @ R @ M).tolist(), t=(M @ t).tolist(),
                     hands=[left])])
    out = tmp_path / "run"
    render_run(labels, out, mano_dir=mano_dir)
    a, b = (json.loads((out / "labels" / f"{k}.json").read_text())["hands"][0] for k in ("right", "left"))
    np.testing.assert_allclose(np.array(b["joints_cam"]), np.array(a["joints_cam"]) * [-1, 1, 1], atol=1e-5)
    np.testing.assert_allclose(np.array(b["joints_2d"])[:, 0], width - 1 - np.array(a["joints_2d"])[:, 0], atol=1e-3)
    for view in ("global", "local"):
        ia = np.asarray(Image.open(out / view / "right.png"), dtype=int)
        ib = np.fliplr(np.asarray(Image.open(out / view / "left.png"), dtype=int))
        ma, mb = ia.any(axis=2), ib.any(axis=2)
        assert (ma ^ mb).sum() <= 0.03 * ma.sum(), view
        diff = np.abs(ia - ib)[ma & mb]
        assert np.median(diff) <= 2 and np.mean(diff) < 6, view


def test_render_help_explains_the_command(capsys):
    assert main(["render", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--labels", "--out", "--format", "--mano-dir", "--limit", "--workers", "--style", "--local-size"):
        assert option in out
    assert "HANDSYNTH_MANO_DIR" in out


def test_mesh_and_depth_in_one_pass_share_one_set_of_labels(ih_run, tmp_path, mano_dir):
    labels, mesh_run, _ = ih_run
    out = tmp_path / "both"
    render_run(labels, out, mano_dir=mano_dir, style="depth,mesh", limit=2)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["style"] == "mesh,depth" and "inverse depth" in manifest["depth_images"]
    for key in KEYS[:2]:
        label = json.loads((out / "labels" / f"{key}.json").read_text())
        assert label["images"] == {"global": f"global/{key}.png", "local": f"local/{key}.png",
                                   "depth_global": f"depth_global/{key}.png", "depth_local": f"depth_local/{key}.png",
                                   "rgb_local": f"rgb_local/{key}.jpg"}
        mesh_label = json.loads((mesh_run / "labels" / f"{key}.json").read_text())
        per_image = ("images", "images_sha256")
        assert ({k: v for k, v in label.items() if k not in per_image}
                == {k: v for k, v in mesh_label.items() if k not in per_image})
        assert {n: label["images_sha256"][n] for n in mesh_label["images"]} == mesh_label["images_sha256"]
        for view in ("global", "local"):
            assert (out / view / f"{key}.png").read_bytes() == (mesh_run / view / f"{key}.png").read_bytes()
            mesh = np.asarray(Image.open(out / view / f"{key}.png")).any(axis=2)
            depth = np.asarray(Image.open(out / f"depth_{view}" / f"{key}.png"))
            grey = depth[..., 0]
            assert (depth[..., 1] == grey).all() and (depth[..., 2] == grey).all()
            assert grey.max() == 255 and grey[grey > 0].min() == 64        # normalised per image
            assert not (grey > 0)[~mesh].any()                             # black wherever there is no mesh
            assert (grey > 0).sum() >= 0.9 * mesh.sum()                    # (colour edges are anti-aliased)
    depth_only = tmp_path / "depth"
    render_run(labels, depth_only, mano_dir=mano_dir, style="depth", limit=1)
    label = json.loads((depth_only / "labels" / f"{KEYS[0]}.json").read_text())
    assert set(label["images"]) == {"depth_global", "depth_local", "rgb_local"} and not (depth_only / "global").exists()
    assert (depth_only / "depth_global" / f"{KEYS[0]}.png").read_bytes() == \
        (out / "depth_global" / f"{KEYS[0]}.png").read_bytes()


@pytest.mark.slow
def test_worker_processes_give_the_same_files(ih_run, tmp_path, mano_dir):
    labels, out, _ = ih_run
    render_run(labels, tmp_path / "two", mano_dir=mano_dir, workers=2)
    assert _files(tmp_path / "two") == _files(out)


# Run in a subprocess with a time limit: were the parent to wait for a lost worker forever, the test fails
# instead of hanging the suite.
_WORKER_SCRIPT = """
import os, shutil, signal, sys, threading, time
from pathlib import Path

from handsynth.hand_model import HandModel
from handsynth.labels import read_labels
from handsynth.render import stage

labels, mano, out, case = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]


def kill_a_worker():
    # SIGKILL one worker process once the workers have written a label
    while not any((out / "labels").glob("*.json")):
        time.sleep(0.01)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and b"spawn_main" in cmdline:
            os.kill(int(stat.parent.name), signal.SIGKILL)
            return


if __name__ == "__main__":
    try:
        if case == "init":        # the MANO folder is gone by the time the workers load it
            frames = read_labels(labels).frames
            copy = out.parent / "mano-copy"
            shutil.copytree(mano, copy)
            model = HandModel(copy)
            shutil.rmtree(copy)
            stage._render_frames(frames, out, model, stage.Settings(), 2)
        else:
            threading.Thread(target=kill_a_worker, daemon=True).start()
            stage.render_run(labels, out, mano_dir=mano, workers=2)
    except Exception as exc:
        print("raised", type(exc).__name__, exc)
"""


def _run_workers(tmp_path: Path, mano_dir: Path, case: str, frames: int) -> tuple[str, Path, Path]:
    import subprocess
    import sys

    labels = write_jsonl(tmp_path / "many.jsonl", [jsonl_record(f"f{i:03d}", hands=[{
        "side": "right", "pose": [0.01 * ((i + j) % 7) for j in range(48)], "shape": [0.0] * 10,
        "trans": [0.02, -0.01, 0.6]}]) for i in range(frames)])
    script = tmp_path / "workers.py"
    script.write_text(_WORKER_SCRIPT)
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, str(script), str(labels), str(mano_dir), str(out), case],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    return done.stdout, labels, out


def test_a_worker_that_cannot_start_stops_the_run_with_its_error(tmp_path, mano_dir):
    said, _, _ = _run_workers(tmp_path, mano_dir, "init", 4)
    assert said.startswith("raised MissingResourceError the MANO folder named by") and "does not exist" in said


def test_a_killed_worker_ends_the_run_with_an_error_and_the_rerun_finishes_it(tmp_path, mano_dir):
    said, labels, out = _run_workers(tmp_path, mano_dir, "kill", 96)
    assert said.startswith("raised RuntimeError a render worker process stopped abruptly"), said
    assert json.loads((out / "manifest.json").read_text())["status"] == "failed"
    done_before = {p.name for p in (out / "labels").glob("*.json")}
    assert 0 < len(done_before) < 96
    render_run(labels, out, mano_dir=mano_dir)                    # the same command again: resumes
    render_run(labels, tmp_path / "alone", mano_dir=mano_dir)     # and the run never interrupted
    assert _files(out) == _files(tmp_path / "alone")


def test_an_image_larger_than_the_renderer_can_draw_is_refused_before_any_output(tmp_path, mano_dir, capsys):
    from handsynth.render.renderer import max_render_size

    limit = max_render_size()
    labels = write_jsonl(tmp_path / "wide.jsonl", [jsonl_record("small"), jsonl_record("wide", width=limit + 1)])
    code = main(["render", "--labels", str(labels), "--mano-dir", str(mano_dir), "--out", str(tmp_path / "run")])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and f"frame wide is {limit + 1}x240 pixels, larger than the {limit}-pixel side" in err
    assert str(labels) in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_missing_osmesa_library_is_a_one_paragraph_error(tmp_path, mano_dir):
    """HANDSYNTH_GL_PLATFORM=osmesa on a machine without libOSMesa (a fresh process: the GL platform is chosen
    once per process)."""
    import ctypes.util
    import os
    import subprocess
    import sys

    if ctypes.util.find_library("OSMesa"):
        pytest.skip("libOSMesa is installed here: nothing is missing")
    labels = write_jsonl(tmp_path / "one.jsonl", [jsonl_record("one")])
    env = {k: v for k, v in os.environ.items() if k != "PYOPENGL_PLATFORM"} | {"HANDSYNTH_GL_PLATFORM": "osmesa"}
    done = subprocess.run([sys.executable, "-m", "handsynth.cli", "render", "--labels", str(labels), "--mano-dir",
                           str(mano_dir), "--out", str(tmp_path / "run")], env=env, capture_output=True, text=True,
                          timeout=600)
    err = " ".join(done.stderr.split())
    assert done.returncode == 3 and "headless OpenGL through 'osmesa' is not available" in err, err
    assert "libosmesa6" in err and "Traceback" not in err


def test_a_render_runs_labels_jsonl_renders_again_to_the_same_files(ih_run, mano_dir, tmp_path):
    """Render's own labels.jsonl is a label file render reads: same keys, labels (source ids, original
    annotation, geometry) and byte-identical images as the run rendered from the source."""
    _, out, _ = ih_run
    again = tmp_path / "again"
    summary = render_run(out / "labels.jsonl", again, mano_dir=mano_dir)
    assert summary.rendered == 4
    first, second = _files(out), _files(again)
    assert first.keys() == second.keys()
    for name in first:
        if name.endswith(".json") or name.endswith(".jsonl"):
            continue
        assert first[name] == second[name], name
    for key in KEYS:
        a, b = (json.loads((run / "labels" / f"{key}.json").read_text()) for run in (out, again))
        assert a.pop("images_sha256") == b.pop("images_sha256")
        assert a == b, key


def test_a_damaged_render_label_line_names_line_and_field(tmp_path, mano_dir, ih_run, capsys):
    _, out, _ = ih_run
    line = json.loads((out / "labels.jsonl").read_text().splitlines()[0])
    del line["hands"][0]["mano"]["pose"]
    bad = tmp_path / "labels.jsonl"
    bad.write_text(json.dumps(line) + "\n")
    assert main(["render", "--labels", str(bad), "--mano-dir", str(mano_dir), "--out", str(tmp_path / "o")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "line 1" in err and "hands[0].mano.pose" in err, err


def test_the_pipeline_writes_each_frame_what_rendering_it_alone_writes(tmp_path, mano_dir):
    """FrameRenderer.render overlaps a frame's GL render with the previous frame's files and the next frame's MANO:
    every frame's files must still be byte-identical to those of the frame rendered on its own, with frames
    without a renderable hand, one- and two-hand frames, different image sizes and both styles (depth too)."""
    import handsynth.render.stage as stage

    rng = np.random.default_rng(7)
    records = []
    for i in range(8):
        hands = [{"side": side, "pose": rng.normal(0, 0.2, 48).tolist(), "shape": rng.normal(0, 0.5, 10).tolist(),
                  "trans": [x + 0.02 * rng.normal(), 0.01 * rng.normal(), 0.55 + 0.05 * rng.normal()]}
                 for side, x in (("right", -0.06), ("left", 0.06))[: 1 + i % 2]]
        if i == 4:
            hands[0]["trans"][2] = -0.6                              # behind the camera: nothing to render
        size = (320, 240) if i % 3 else (512, 512)             # 512: the local view's size too
        records.append(jsonl_record(f"f{i}", width=size[0], height=size[1],
                                    K=[[300.0, 0, size[0] / 2], [0, 300.0, size[1] / 2], [0, 0, 1]], hands=hands))
    from handsynth.labels import read_labels

    frames = read_labels(write_jsonl(tmp_path / "p.jsonl", records)).frames
    settings = stage.Settings(styles=("mesh", "depth"))
    model = HandModel(mano_dir)
    together = stage.FrameRenderer(tmp_path / "together", model, settings)
    results = list(together.render(frames))
    assert [r.key for r in results] == [f.key for f in frames]
    assert [r.status for r in results] == ["rendered"] * 4 + ["skipped"] + ["rendered"] * 3
    alone = stage.FrameRenderer(tmp_path / "alone", model, settings)
    for frame in reversed(frames):                      # another order, one frame per call
        (result,) = alone.render([frame])
        assert result.jsonl_line == results[frames.index(frame)].jsonl_line
    first, second = _files(tmp_path / "together"), _files(tmp_path / "alone")
    assert list(first) == list(second) and len(first) == 7 * 5      # 4 images and a label per rendered frame
    assert all(first[name] == second[name] for name in first)

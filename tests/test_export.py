"""handsynth export: WebDataset shards of generated images paired with the original labels."""

from __future__ import annotations

import io
import json
import pickle
import pickletools
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from handsynth.cli import main
from handsynth.export.hamer import HAMER_FIELDS, HAMER_MARGIN, encode_pyd, load_pyd
from handsynth.export.webdataset import TAR_MTIME, export_run
from handsynth.generate.frame import frame_of, resample, resize_map
from tests.fixtures.export import make_generate_run
from tests.test_frame import covered, inside

# HaMeR's mano_wrapper order: MANO joints (16) + fingertips -> OpenPose 21.
MANO_TO_OPENPOSE = [0, 13, 14, 15, 16, 1, 2, 3, 17, 4, 5, 6, 18, 10, 11, 12, 19, 7, 8, 9, 20]


@pytest.fixture
def gen_run(tmp_path, small_render_run):
    """8 planned samples over the 4 frames, sample 5 unfinished (image but no sample file)."""
    return make_generate_run(tmp_path / "runs" / "gen-a", small_render_run, 8, missing=(5,))


def _raw(shard: Path) -> list[dict]:
    return list(wds.WebDataset(str(shard), shardshuffle=False))


def _source_records(render_run: Path) -> dict:
    manifest = json.loads((render_run / "manifest.json").read_text())
    data = next(Path(e["path"]) for e in manifest["inputs"]["labels"] if e["path"].endswith("_data.json"))
    prefix = data.name.rsplit("_", 1)[0]
    return {kind: json.loads((data.parent / f"{prefix}_{kind}.json").read_text())
            for kind in ("data", "MANO_NeuralAnnot")}


def test_round_trip_labels_and_images_equal_the_sources(gen_run, small_render_run, tmp_path):
    summary = export_run(gen_run, tmp_path / "shards", shard_size=3)
    assert (summary.shards, summary.samples, summary.incomplete) == (3, 7, 1)
    shards = sorted((tmp_path / "shards").glob("*.tar"))
    assert [p.name for p in shards] == [f"gen-a-{i:06d}.tar" for i in range(3)]
    samples = [s for p in shards for s in _raw(p)]
    assert [len(_raw(p)) for p in shards] == [3, 3, 1]
    records = [json.loads(p.read_text()) for p in sorted((gen_run / "samples").glob("*.json"))]
    records.sort(key=lambda r: r["index"])
    assert [s["__key__"] for s in samples] == [r["key"] for r in records]
    assert [r["index"] for r in records] == [0, 1, 2, 3, 4, 6, 7]
    src = _source_records(small_render_run)
    for sample, record in zip(samples, records):
        key, frame = sample["__key__"], record["frame"]
        assert "." not in key
        assert set(sample) - {"__key__", "__url__", "__local_path__"} == {
            "jpg", "json", "mesh.png", "local_mesh.png", "local.jpg"}
        assert sample["jpg"] == (gen_run / "images" / f"{key}.jpg").read_bytes()
        assert sample["local.jpg"] == (gen_run / "local" / f"{key}.jpg").read_bytes()
        label = json.loads(sample["json"])
        generation = label.pop("generation")
        image, local = label.pop("image"), label.pop("local_image")
        assert (image, local) == (record["image"], record["local_image"])          # copied, not recomputed
        assert label == json.loads((small_render_run / "labels" / f"{frame}.json").read_text())
        # the mesh images come in the frames of the images they conditioned, covering the in-frame joints
        for member, block, source in (("mesh.png", image, small_render_run / "global" / f"{frame}.png"),
                                      ("local_mesh.png", local, small_render_run / "local" / f"{frame}.png")):
            mesh = np.asarray(Image.open(io.BytesIO(sample[member])).convert("RGB"))
            assert mesh.shape == (block["size"][1], block["size"][0], 3)
            frame_map = frame_of(block) if member == "mesh.png" else resize_map(Image.open(source).size, block["size"])
            np.testing.assert_array_equal(mesh, np.asarray(resample(Image.open(source).convert("RGB"), frame_map)))
            for hand in block["hands"]:
                joints = np.asarray(hand["joints_2d"])
                assert covered(mesh, joints[inside(joints, block["size"])])
        img = label["original"]["image"]
        assert img in src["data"]["images"]
        assert label["original"]["annotations"] == [a for a in src["data"]["annotations"] if a["image_id"] == img["id"]]
        assert label["original"]["mano"] == src["MANO_NeuralAnnot"][str(img["capture"])][str(img["frame_idx"])]
        assert label["joint_order"] == "openpose21" and label["units"]["length"] == "metres"
        assert {k: generation[k] for k in record if k not in ("image", "local_image")} == {
            k: v for k, v in record.items() if k not in ("image", "local_image")}
        assert "image" not in generation and "image_size" not in generation
        assert generation["recipe_sha256"] == "ab" * 32 and generation["model"]["base"] == "tiny-sd"
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    assert index["status"] == "complete" and index["samples"] == 7
    assert [e["count"] for e in index["shards"]] == [3, 3, 1]
    assert [k for e in index["shards"] for k in e["keys"]] == [r["key"] for r in records]


def test_webdataset_decodes_the_fields(gen_run, tmp_path):
    export_run(gen_run, tmp_path / "shards", shard_size=4)
    urls = [str(p) for p in sorted((tmp_path / "shards").glob("*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8"))
    assert len(samples) == 7
    for s in samples:
        assert s["jpg"].shape == s["mesh.png"].shape == (64, 64, 3) and s["local.jpg"].shape == (64, 64, 3)
        assert s["json"]["image"]["size"] == s["json"]["local_image"]["size"] == [64, 64]
        assert s["json"]["generation"]["key"] == s["__key__"] and s["json"]["hands"]


def test_reruns_are_byte_identical_with_fixed_member_metadata(gen_run, tmp_path):
    export_run(gen_run, tmp_path / "a", shard_size=3, verify=False)
    export_run(gen_run, tmp_path / "b", shard_size=3, verify=False)
    names = sorted(p.name for p in (tmp_path / "a").glob("*.tar"))
    assert names and names == sorted(p.name for p in (tmp_path / "b").glob("*.tar"))
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        with tarfile.open(tmp_path / "a" / name) as tar:
            for member in tar.getmembers():
                assert (member.mtime, member.uid, member.gid, member.uname, member.mode) == (
                    TAR_MTIME, 0, 0, "handsynth", 0o444)


def test_resume_rewrites_only_missing_shards_and_removes_stray_temporaries(gen_run, tmp_path):
    out = tmp_path / "shards"
    export_run(gen_run, out, shard_size=3, verify=False)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.tar")}
    (out / "gen-a-000001.tar").unlink()
    stray = out / ".gen-a-000002.tar.0123456789abcdef.tmp"
    stray.write_bytes(b"half a shard")
    summary = export_run(gen_run, out, shard_size=3)
    assert (summary.written, summary.kept) == (1, 2)
    assert not stray.exists()
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.tar")}
    assert after["gen-a-000000.tar"] == before["gen-a-000000.tar"]      # untouched
    assert after["gen-a-000002.tar"] == before["gen-a-000002.tar"]
    assert after["gen-a-000001.tar"][1] == before["gen-a-000001.tar"][1]  # rewritten, same bytes


def test_changed_inputs_are_refused_unless_overwrite(gen_run, tmp_path, capsys):
    out = tmp_path / "shards"
    assert main(["export", "--run", str(gen_run), "--out", str(out), "--shard-size", "3"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    sample = next(p for p in (gen_run / "samples").glob("*.json") if json.loads(p.read_text())["index"] == 0)
    record = json.loads(sample.read_text())
    sample.write_text(json.dumps({**record, "prompt": "something else"}))
    capsys.readouterr()
    assert main(["export", "--run", str(gen_run), "--out", str(out), "--shard-size", "3"]) == 2
    err = capsys.readouterr().err
    assert "changed since it was exported" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main(["export", "--run", str(gen_run), "--out", str(out), "--shard-size", "5"]) == 2  # other settings
    assert main(["export", "--run", str(gen_run), "--out", str(out), "--shard-size", "5", "--overwrite"]) == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["gen-a-000000.tar", "gen-a-000001.tar"]
    assert json.loads(_raw(out / "gen-a-000000.tar")[0]["json"])["generation"]["prompt"] == "something else"


def _lbs_joints(arrays: dict, pose: np.ndarray, betas: np.ndarray) -> np.ndarray:
    """21 OpenPose-order joints of MANO with ``pose`` as ABSOLUTE rotations (no mean pose), via smplx.lbs."""
    import torch
    from smplx.lbs import lbs
    from smplx.vertex_ids import vertex_ids

    t = lambda a: torch.tensor(np.asarray(a, dtype=np.float64))  # noqa: E731
    reg = arrays["J_regressor"]
    reg = reg.toarray() if hasattr(reg, "toarray") else np.asarray(reg)
    posedirs = np.asarray(arrays["posedirs"], dtype=np.float64)
    parents = np.asarray(arrays["kintree_table"][0], dtype=np.int64).copy()
    parents[0] = -1
    verts, joints = lbs(t(betas)[None], t(pose)[None], t(arrays["v_template"]), t(arrays["shapedirs"])[..., :10],
                        t(posedirs.reshape(-1, posedirs.shape[-1]).T), t(reg), torch.tensor(parents),
                        t(arrays["weights"]))
    tips = verts[0, list(vertex_ids["mano"].values())]
    return torch.cat([joints[0], tips])[MANO_TO_OPENPOSE].numpy()


@pytest.mark.parametrize("fit", ["crop", "native"])
def test_hamer_layout_fields_shapes_and_geometry(fit, tmp_path, small_render_run, mano_dir):
    from handsynth.hand_model import load_mano_arrays, resolve_mano_dir

    run = make_generate_run(tmp_path / "gen-h", small_render_run, 4, ext="png", size=96, fit=fit)
    export_run(run, tmp_path / "h", shard_size=10, layout="hamer")
    samples = _raw(tmp_path / "h" / "gen-h-000000.tar")
    assert [s["__key__"] for s in samples] == [k for r in _records(run) for k in (r["key"], r["key"] + "-local")]
    arrays = {side: load_mano_arrays(resolve_mano_dir(mano_dir), side) for side in ("right", "left")}
    for sample in samples:
        assert set(sample) - {"__key__", "__url__", "__local_path__"} == {"png", "data.pyd", "json"}
        label = json.loads(sample["json"])
        block = label["local_image" if sample["__key__"].endswith("-local") else "image"]
        assert list(Image.open(io.BytesIO(sample["png"])).size) == block["size"]
        hands = load_pyd(sample["data.pyd"])
        kept = [(h, f) for h, f in zip(label["hands"], block["hands"]) if inside(f["joints_2d"], block["size"]).any()]
        assert len(hands) == len(kept) > 0
        K = np.asarray(block["K"])
        for hand, (src, framed) in zip(hands, kept):
            assert set(hand) == set(HAMER_FIELDS)
            shapes = {k: np.shape(v) for k, v in hand.items()}
            assert shapes == {"keypoints_2d": (21, 3), "keypoints_3d": (21, 4), "hand_pose": (48,), "betas": (10,),
                              "has_hand_pose": (), "has_betas": (), "center": (2,), "scale": (2,), "right": ()}
            assert float(hand["right"]) == (1.0 if src["side"] == "right" else 0.0)
            np.testing.assert_array_equal(hand["keypoints_3d"][:, 3], 1.0)
            # 2D keypoints: the 3D keypoints through the image's own K; confidence 0 exactly outside the image
            X = hand["keypoints_3d"][:, :3].astype(np.float64)
            uv = (X @ K.T)[:, :2] / X[:, 2:]
            np.testing.assert_allclose(hand["keypoints_2d"][:, :2], uv, atol=0.01)
            W, H = block["size"]
            out = (uv[:, 0] < -0.5) | (uv[:, 0] > W - 0.5) | (uv[:, 1] < -0.5) | (uv[:, 1] > H - 0.5)
            np.testing.assert_array_equal(hand["keypoints_2d"][:, 2], np.where(out, 0.0, 1.0))
            # the box: centre of the hand's box in this image, a square of HAMER_MARGIN x its longer side
            x0, y0, x1, y1 = framed["box"]
            np.testing.assert_allclose(hand["center"], [(x0 + x1) / 2, (y0 + y1) / 2], rtol=1e-6)
            np.testing.assert_allclose(hand["scale"] * 200, [2.2 * max(x1 - x0, y1 - y0)] * 2, rtol=1e-6)
            # hand_pose as absolute camera-frame rotations reproduces the camera-space joint shape
            joints = _lbs_joints(arrays[src["side"]], hand["hand_pose"].astype(np.float64), hand["betas"])
            np.testing.assert_allclose(joints - joints[0], X - X[0], atol=1e-4)
    assert HAMER_MARGIN == 2.2


def _records(run: Path) -> list[dict]:
    return sorted((json.loads(p.read_text()) for p in (run / "samples").glob("*.json")), key=lambda r: r["index"])


def test_out_of_image_joints_get_confidence_zero(tmp_path, landscape_render_run, mano_dir):
    """The landscape set's far-apart hands cannot share one crop square: joints outside get confidence 0,
    a hand with no joint inside is left out of data.pyd."""
    run = make_generate_run(tmp_path / "gen-l", landscape_render_run, 3, ext="png", size=64, local=False)
    export_run(run, tmp_path / "l", shard_size=10, layout="hamer", mano_dir=mano_dir)
    confidences = [h["keypoints_2d"][:, 2] for s in _raw(tmp_path / "l" / "gen-l-000000.tar")
                   for h in load_pyd(s["data.pyd"])]
    assert any((c == 0).any() for c in confidences) and all(c.any() for c in confidences)
    assert {float(v) for c in confidences for v in c} <= {0.0, 1.0}


def test_data_pyd_names_no_numpy_core_module_and_round_trips():
    hands = [{"keypoints_2d": np.arange(63, dtype=np.float32).reshape(21, 3), "right": np.array(1.0, np.float32),
              "betas": np.linspace(-1, 1, 10).astype(np.float32), "center": np.array([3.5, -2.0], np.float32)}]
    data = encode_pyd(hands)
    assert b"numpy._core" not in data and b"numpy.core" not in data
    ops = list(pickletools.genops(data))
    assert {op.name for op, _, _ in ops} & {"GLOBAL", "INST", "OBJ", "NEWOBJ", "BUILD"} == set()
    strings = [arg for op, arg, _ in ops if op.name in ("SHORT_BINUNICODE", "BINUNICODE")]   # STACK_GLOBAL's names
    assert {"numpy", "ndarray", "builtins", "bytearray"} <= set(strings)
    assert not {s for s in strings if s.startswith("numpy") and s != "numpy"}
    for loaded in (pickle.loads(data), load_pyd(data)):       # plain pickle (what HaMeR runs) and ours
        assert [sorted(h) for h in loaded] == [sorted(h) for h in hands]
        for key, value in hands[0].items():
            got = loaded[0][key]
            assert type(got) is np.ndarray and got.dtype == value.dtype and got.shape == value.shape
            np.testing.assert_array_equal(got, value)
            assert got.flags.writeable                          # HaMeR writes into keypoints_2d in place
    with pytest.raises(pickle.UnpicklingError):
        load_pyd(pickle.dumps([print]))


def _hamer_crop_holds(center, side, joints, scale, rot_deg, tx, ty) -> bool:
    """Whether every joint lands inside HaMeR's augmented square crop: side ``scale * side`` about
    ``center + (tx, ty) * side``, rotated by ``rot_deg`` (written from the augmentation's definition)."""
    c = np.asarray(center) + np.array([tx, ty]) * side
    r = np.deg2rad(rot_deg)
    R = np.array([[np.cos(r), np.sin(r)], [-np.sin(r), np.cos(r)]])
    local = (np.asarray(joints) - c) @ R.T
    return bool(np.all(np.abs(local) <= scale * side / 2))


def test_hamer_margin_keeps_joints_in_the_augmented_crop(tmp_path, small_render_run, landscape_render_run, mano_dir):
    """Every draw of HaMeR's default augmentation (scale 0.7..1.3, rotation up to 60 deg, shift up to
    0.02 of the box) keeps all joints in the crop with the default margin; the tight box does not."""
    extremes = [(0.7, rot, tx, ty) for rot in range(-60, 61, 5) for tx in (-0.02, 0.02) for ty in (-0.02, 0.02)]
    lost = {}
    for margin in (HAMER_MARGIN, 1.0):
        lost[margin] = 0
        for name, render in (("real", small_render_run), ("landscape", landscape_render_run)):
            run = make_generate_run(tmp_path / f"g-{name}-{margin}", render, 3, ext="png", size=128, local=True)
            export_run(run, tmp_path / f"h-{name}-{margin}", layout="hamer", mano_dir=mano_dir, hamer_margin=margin,
                       verify=False)
            for shard in (tmp_path / f"h-{name}-{margin}").glob("*.tar"):
                for sample in _raw(shard):
                    for hand in load_pyd(sample["data.pyd"]):
                        joints = hand["keypoints_2d"][:, :2]
                        lost[margin] += sum(not _hamer_crop_holds(hand["center"], hand["scale"].max() * 200, joints, *e)
                                            for e in extremes)
    assert lost[HAMER_MARGIN] == 0 and lost[1.0] > 0


def test_verify_only_detects_a_damaged_shard(gen_run, tmp_path, capsys):
    out = tmp_path / "shards"
    export_run(gen_run, out, shard_size=3, verify=False)
    capsys.readouterr()
    assert main(["export", "--verify-only", "--out", str(out)]) == 0
    assert "verified 3 shards, 7 samples" in capsys.readouterr().out
    shard = out / "gen-a-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["export", "--verify-only", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "gen-a-000001.tar does not match its sha256" in err and "Traceback" not in err


def test_defaults_pick_the_newest_generate_run(tmp_path, small_render_run, monkeypatch, capsys):
    old = make_generate_run(tmp_path / "runs" / "old", small_render_run, 2)
    new = make_generate_run(tmp_path / "runs" / "new", small_render_run, 3)
    for run, created in ((old, "2025-01-01T00:00:00+00:00"), (new, "2025-02-01T00:00:00+00:00")):
        manifest = json.loads((run / "manifest.json").read_text())
        (run / "manifest.json").write_text(json.dumps({**manifest, "created": created}))
    monkeypatch.chdir(tmp_path)
    assert main(["export", "--format", "webdataset"]) == 0
    captured = capsys.readouterr()
    assert "runs/new" in captured.err and "shards/new" in captured.err
    assert "using default --shard-size = 1000" in captured.err and "using default --layout = handsynth" in captured.err
    assert [len(_raw(p)) for p in sorted((tmp_path / "shards" / "new").glob("*.tar"))] == [3]


def test_bad_input_gives_clear_errors(gen_run, small_render_run, tmp_path, capsys):
    cases = [
        (["--run", str(tmp_path / "nope")], 2, "does not exist"),
        (["--run", str(small_render_run)], 2, "'render' stage, not 'generate'"),
        (["--run", str(gen_run), "--format", "parquet"], 2, "unknown export format 'parquet'"),
        (["--run", str(gen_run), "--layout", "coco"], 2, "unknown shard layout"),
        (["--run", str(gen_run), "--out", str(gen_run / "manifest.json" / "x")], 4, "cannot write"),
        (["--verify-only", "--out", str(tmp_path / "empty")], 2, "no shard index"),
        (["--run", str(gen_run), "--verify", "quick"], 2, "--verify 'quick' is not a verification mode"),
    ]
    for args, code, text in cases:
        capsys.readouterr()
        assert main(["export", *args]) == code, args
        err = capsys.readouterr().err
        assert text in " ".join(err.split()) and "Traceback" not in err, (args, err)
    assert not (gen_run / "manifest.json").is_dir()


def _first_sample(run: Path) -> Path:
    return next(p for p in (run / "samples").glob("*.json") if json.loads(p.read_text())["index"] == 0)


@pytest.mark.parametrize("case", ["sample_not_object", "sample_without_image", "image_missing", "image_unreadable",
                                  "label_truncated", "label_without_fields"])
def test_broken_run_files_give_clear_errors(case, small_render_run, tmp_path, capsys):
    render = tmp_path / "render"
    shutil.copytree(small_render_run, render)
    run = make_generate_run(tmp_path / "gen", render, 4, local=False)
    sample = _first_sample(run)
    record = json.loads(sample.read_text())
    image = run / record["outputs"]["image"]
    label = render / "labels" / f"{record['frame']}.json"
    if case == "sample_not_object":
        sample.write_text("[1, 2]")
        where, text = sample, "not a JSON object"
    elif case == "sample_without_image":
        sample.write_text(json.dumps({k: v for k, v in record.items() if k != "outputs"}))
        where, text = sample, "field 'outputs.image'"
    elif case == "image_missing":
        image.unlink()
        where, text = sample, "which does not exist"
    elif case == "image_unreadable":
        image.write_bytes(b"not an image")
        where, text = image, "does not match the sha256 recorded"
    elif case == "label_truncated":
        label.write_text(label.read_text()[:100])
        where, text = label, "not valid JSON"
    else:
        label.write_text(json.dumps({"images": 3}))
        where, text = label, "lacks a field export needs"
    capsys.readouterr()
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "shards")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert text in err and str(where) in err and "Traceback" not in err, err
    assert not list((tmp_path / "shards").glob("*.tar")) and not list((tmp_path / "shards").glob(".*.tmp"))


# --- nothing lost, nothing silently wrong --------------------------------------------------------

def _sample_of(run: Path, index: int) -> tuple[Path, dict]:
    path = next(p for p in (run / "samples").glob("*.json") if json.loads(p.read_text())["index"] == index)
    return path, json.loads(path.read_text())


@pytest.mark.parametrize("verify", ["--verify fast", "--verify full", "--no-verify"])
def test_a_damaged_image_never_lands_in_a_shard(gen_run, small_render_run, tmp_path, capsys, verify):
    """A generated image or mesh image that no longer matches its recorded sha256 stops the export with a
    one-paragraph error naming it and the command that repairs it; the shard is not written and the
    index does not say complete (with --no-verify too)."""
    out = tmp_path / "shards"
    _, record = _sample_of(gen_run, 4)                      # in the second shard of 3
    image = gen_run / record["outputs"]["image"]
    data = bytearray(image.read_bytes())
    data[len(data) // 2] ^= 0x55                            # a flipped byte: still "an image file"
    image.write_bytes(bytes(data))
    args = ["export", "--run", str(gen_run), "--out", str(out), "--shard-size", "3", *verify.split()]
    capsys.readouterr()
    assert main(args) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert str(image) in err and "does not match the sha256" in err and "handsynth generate" in err, err
    index = json.loads((out / "index.json").read_text())
    assert index["status"] == "failed" and [e["name"] for e in index["shards"]] == ["gen-a-000000.tar"]
    assert sorted(p.name for p in out.glob("*.tar")) == ["gen-a-000000.tar"]
    assert main(["export", "--verify-only", "--out", str(out)]) == 2
    # a damaged mesh image of the render run is caught the same way
    image.write_bytes(bytes(data[: len(data) // 2]) + bytes([data[len(data) // 2] ^ 0x55]) + bytes(data[len(data) // 2 + 1:]))
    mesh = small_render_run / json.loads((small_render_run / "labels" / f"{record['frame']}.json").read_text())[
        "images"]["global"]
    original = mesh.read_bytes()
    try:
        mesh.write_bytes(original[:-30])
        assert main(args) == 2
        assert str(mesh) in " ".join(capsys.readouterr().err.split())
    finally:
        mesh.write_bytes(original)
    assert main(args) == 0
    assert json.loads((out / "index.json").read_text())["status"] == "complete"


def test_overwrite_replaces_an_export_with_a_corrupt_index_but_nothing_else(gen_run, tmp_path, capsys):
    out = tmp_path / "shards"
    assert main(["export", "--run", str(gen_run), "--out", str(out), "--shard-size", "3"]) == 0
    (out / "index.json").write_text('{"status": "comp')
    (out / "gen-a-000009.tar").write_bytes(b"a shard of an earlier export, no longer listed")
    capsys.readouterr()
    assert main(["export", "--run", str(gen_run), "--out", str(out), "--shard-size", "3"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "cannot be read" in err and "--overwrite" in err and "Traceback" not in err
    assert main(["export", "--run", str(gen_run), "--out", str(out), "--shard-size", "3", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["gen-a-000000.tar", "gen-a-000001.tar", "gen-a-000002.tar",
                                                     "index.json"]
    # a folder holding anything else is never replaced, --overwrite or not
    user = tmp_path / "user"
    user.mkdir()
    (user / "index.json").write_text("not json")
    (user / "thesis.tex").write_text("mine")
    for extra in ([], ["--overwrite"]):
        assert main(["export", "--run", str(gen_run), "--out", str(user), *extra]) == 2
        assert sorted(p.name for p in user.iterdir()) == ["index.json", "thesis.tex"]
    plain = tmp_path / "plain"
    plain.write_text("x")
    assert main(["export", "--run", str(gen_run), "--out", str(plain), "--overwrite"]) == 4
    assert plain.read_text() == "x"


def test_verify_only_fails_on_a_tar_the_index_does_not_list(gen_run, tmp_path, capsys):
    out = tmp_path / "shards"
    export_run(gen_run, out, shard_size=3, verify=False)
    shutil.copy(out / "gen-a-000000.tar", out / "holiday-photos.tar")
    capsys.readouterr()
    assert main(["export", "--verify-only", "--out", str(out)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "holiday-photos.tar is not listed in index.json" in err and "Traceback" not in err


def test_a_full_disk_leaves_no_truncated_shard(gen_run, tmp_path, capsys, monkeypatch):
    """ENOSPC in the middle of a shard: exit 4 with one paragraph, the partial shard removed, the index
    not complete; the rerun (disk freed) finishes with the same bytes as an undisturbed export."""
    import errno

    from handsynth.export import webdataset as wd

    reference = tmp_path / "reference"
    export_run(gen_run, reference, shard_size=3, verify=False)
    out = tmp_path / "shards"
    real_write = wd._HashingFile.write
    written = {"bytes": 0}

    def write(self, data):
        written["bytes"] += len(data)
        if written["bytes"] > (reference / "gen-a-000000.tar").stat().st_size + 5000:   # inside shard 2
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(wd._HashingFile, "write", write)
    capsys.readouterr()
    assert main(["export", "--run", str(gen_run), "--out", str(out), "--shard-size", "3"]) == 4
    err = capsys.readouterr().err
    assert "No space left on device" in err and "gen-a-000001.tar" in " ".join(err.split())
    assert "free disk space" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["gen-a-000000.tar", "index.json"]   # no temporary
    assert json.loads((out / "index.json").read_text())["status"] == "failed"
    assert main(["export", "--verify-only", "--out", str(out)]) == 2
    monkeypatch.setattr(wd._HashingFile, "write", real_write)
    assert main(["export", "--run", str(gen_run), "--out", str(out), "--shard-size", "3"]) == 0
    for shard in reference.glob("*.tar"):
        assert (out / shard.name).read_bytes() == shard.read_bytes()


def test_interrupted_export_says_so_and_a_second_export_is_refused(gen_run, tmp_path, capsys, monkeypatch):
    from handsynth.export import webdataset as wd
    from handsynth.rundir import RunDir

    out = tmp_path / "shards"
    real = wd.write_shard
    calls = {"n": 0}

    def interrupted(path, records):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(path, records)

    monkeypatch.setattr(wd, "write_shard", interrupted)
    assert main(["export", "--run", str(gen_run), "--out", str(out), "--shard-size", "3"]) == 130
    assert json.loads((out / "index.json").read_text())["status"] == "interrupted"
    monkeypatch.setattr(wd, "write_shard", real)
    with RunDir(out, "export", fingerprint={}, manifest="index.json", replace=True,
                recognise=wd.holds_only_an_export, command=["handsynth", "export", "elsewhere"]).open():
        capsys.readouterr()
        assert main(["export", "--run", str(gen_run), "--out", str(out), "--shard-size", "3"]) == 4
        err = " ".join(capsys.readouterr().err.split())
        assert "another handsynth process is writing" in err and "handsynth export elsewhere" in err
    assert main(["export", "--run", str(gen_run), "--out", str(out), "--shard-size", "3", "--overwrite"]) == 0


def _replace_member(shard: Path, index_path: Path, name: str, data: bytes) -> None:
    """Rewrite ``shard`` with member ``name`` replaced by ``data`` and record the new file's sha256 and size
    in the index - a shard that passes the sha256 check but holds a bad member."""
    import hashlib

    buf = io.BytesIO()
    with tarfile.open(shard) as src, tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as dst:
        for info in src.getmembers():
            content = data if info.name == name else src.extractfile(info).read()
            info.size = len(content)
            dst.addfile(info, io.BytesIO(content))
    shard.write_bytes(buf.getvalue())
    index = json.loads(index_path.read_text())
    entry = next(e for e in index["shards"] if e["name"] == shard.name)
    entry.update(sha256=hashlib.sha256(buf.getvalue()).hexdigest(), bytes=len(buf.getvalue()))
    index_path.write_text(json.dumps(index))


def test_fast_verify_checks_headers_and_sizes_full_verify_decodes(gen_run, tmp_path, capsys):
    """Default verification reads image headers (format, size against the json block) without decoding;
    --verify full also decodes every pixel. Both name the shard, the sample and the member."""
    out = tmp_path / "shards"
    summary = export_run(gen_run, out, shard_size=3)
    assert summary.verified is not None and not summary.verified.full and summary.verified.samples == 7
    shard = out / "gen-a-000001.tar"
    key = json.loads((out / "index.json").read_text())["shards"][1]["keys"][0]
    original = (gen_run / "images" / f"{key}.jpg").read_bytes()
    cut = original[: len(original) // 2]                    # header intact, pixels missing
    _replace_member(shard, out / "index.json", f"{key}.jpg", cut)
    capsys.readouterr()
    assert main(["export", "--verify-only", "--out", str(out)]) == 0
    assert "image headers): ok" in capsys.readouterr().out
    assert main(["export", "--verify-only", "--out", str(out), "--verify", "full"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"gen-a-000001.tar: {key}: jpg is no decodable jpg image" in err and "Traceback" not in err
    # a member that is no image at all, and an image of another size than its json block records
    other = Image.new("RGB", (32, 64))
    buf = io.BytesIO()
    other.save(buf, format="JPEG")
    _replace_member(shard, out / "index.json", f"{key}.jpg", buf.getvalue())
    _replace_member(shard, out / "index.json", f"{key}.local_mesh.png", b"not a png")
    assert main(["export", "--verify-only", "--out", str(out)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{key}: local_mesh.png is no png image" in err
    assert f"{key}: the generated image is (32, 64) but the json's image block says [64, 64]" in err
    _replace_member(shard, out / "index.json", f"{key}.jpg", original)
    _replace_member(shard, out / "index.json", f"{key}.local_mesh.png",
                    next(s for s in _raw(tmp_path / "shards" / "gen-a-000001.tar") if s["__key__"] != key)[
                        "local_mesh.png"])
    assert main(["export", "--verify-only", "--out", str(out), "--verify", "full"]) == 0
    assert "every image decoded): ok" in capsys.readouterr().out


def test_parallel_verification_finds_what_one_thread_finds(gen_run, tmp_path):
    from handsynth.errors import InputError
    from handsynth.export.webdataset import verify_shards

    out = tmp_path / "shards"
    export_run(gen_run, out, shard_size=1, verify=False)
    for name in ("gen-a-000002.tar", "gen-a-000005.tar"):
        data = bytearray((out / name).read_bytes())
        data[1000] ^= 0xFF
        (out / name).write_bytes(bytes(data))
    found = []
    for workers in (1, 4):
        with pytest.raises(InputError) as info:
            verify_shards(out, workers=workers)
        found.append(str(info.value))
    assert found[0] == found[1] and "found 2 problem(s)" in found[0]
    assert "gen-a-000002.tar does not match its sha256" in found[0] and "gen-a-000005.tar" in found[0]


def test_input_digests_made_while_writing_equal_the_resume_digests(gen_run, tmp_path):
    """The digest of a shard's sample and label files, computed from the reads that build it, is the one a
    resumed export computes up front (so a rerun keeps the shards)."""
    from handsynth.export.webdataset import _chunk_digest
    from handsynth.generate.layout import read_run

    out = tmp_path / "shards"
    export_run(gen_run, out, shard_size=3, verify=False)
    source = read_run(gen_run)
    chunks = [source.samples[i:i + 3] for i in range(0, len(source.samples), 3)]
    index = json.loads((out / "index.json").read_text())
    assert [e["inputs_sha256"] for e in index["shards"]] == [_chunk_digest(source, c) for c in chunks]

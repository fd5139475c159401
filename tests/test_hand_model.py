"""MANO loading and forward: restricted unpickling, errors, joints, mirror symmetry, geometry.

Forward results are compared with an independent numpy implementation of MANO's linear blend
skinning (below), written from the model's definition, not from smplx. smplx keeps the model arrays
at float32 precision even in a float64 model, hence ATOL (0.2 micrometres) against numpy.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import pickletools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from handsynth.errors import InputError, MissingResourceError
from handsynth.hand_model import (JOINT_NAMES, JOINT_ORDER, HandModel, load_mano_arrays,
                                  resolve_mano_dir)
from handsynth.io import sha256_file
from tests.fixtures.mano import build_arrays, write_mano_file

TIPS = {"thumb": 744, "index": 320, "middle": 443, "ring": 554, "pinky": 671}
# MANO's 16 joints by name (its own order), written out independently of the module's table.
MANO_JOINTS = {"wrist": 0, "index1": 1, "index2": 2, "index3": 3, "middle1": 4, "middle2": 5, "middle3": 6,
               "pinky1": 7, "pinky2": 8, "pinky3": 9, "ring1": 10, "ring2": 11, "ring3": 12,
               "thumb1": 13, "thumb2": 14, "thumb3": 15}
MIRROR = np.array([-1.0, 1.0, 1.0])
ATOL = 2e-7


def rodrigues(w: np.ndarray) -> np.ndarray:
    angle = np.linalg.norm(w)
    if angle < 1e-12:
        return np.eye(3)
    k = w / angle
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle) * K + (1 - np.cos(angle)) * K @ K


def numpy_mano(a: dict, pose, shape, trans) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (778,3) and 21 named joints (OpenPose order) of one hand, in float64."""
    full = np.array(pose, float)
    full[3:] += a["hands_mean"]
    v_shaped = a["v_template"] + np.einsum("vck,k->vc", a["shapedirs"][:, :, :10], shape)
    J = a["J_regressor"] @ v_shaped
    R = [rodrigues(full[3 * j:3 * j + 3]) for j in range(16)]
    features = np.concatenate([(R[j] - np.eye(3)).ravel() for j in range(1, 16)])
    v_posed = v_shaped + np.einsum("vck,k->vc", a["posedirs"], features)
    parents = a["kintree_table"][0]
    G = []
    for j in range(16):
        local = np.eye(4)
        local[:3, :3] = R[j]
        local[:3, 3] = J[j] - (J[parents[j]] if j else 0)
        G.append(local if j == 0 else G[parents[j]] @ local)
    A = np.stack([np.block([[g[:3, :3], (g[:3, 3] - g[:3, :3] @ J[j])[:, None]], [np.zeros((1, 3)), 1]])
                  for j, g in enumerate(G)])
    T = np.einsum("vj,jab->vab", a["weights"], A)
    verts = np.einsum("vab,vb->va", T[:, :3, :3], v_posed) + T[:, :3, 3] + trans
    joints16 = np.stack([g[:3, 3] for g in G]) + trans
    named = [joints16[MANO_JOINTS[n]] if n in MANO_JOINTS else verts[TIPS[n[:-1]]]
             for n in ["wrist"] + [f"{f}{i}" for f in TIPS for i in range(1, 5)]]
    return verts, np.stack(named)


def mirror_pose(pose: np.ndarray) -> np.ndarray:
    out = np.array(pose, float).reshape(*np.shape(pose)[:-1], -1, 3)
    out[..., 1:] *= -1
    return out.reshape(np.shape(pose))


def random_params(rng, batch):
    pose = rng.normal(scale=0.4, size=(batch, 48))
    shape = rng.normal(scale=1.5, size=(batch, 10))
    trans = rng.normal(scale=0.2, size=(batch, 3))
    return pose, shape, trans


@pytest.fixture(scope="module")
def model(mano_dir):
    return HandModel(mano_dir, dtype=torch.float64)


@pytest.fixture(scope="module")
def arrays(mano_dir):
    return {side: load_mano_arrays(mano_dir, side) for side in ("right", "left")}


# ---------------------------------------------------------------------------------------------
# Loading


def test_files_reference_chumpy_and_load_without_it(mano_dir, arrays):
    raw = (mano_dir / "MANO_RIGHT.pkl").read_bytes()
    globals_used = {arg for op, arg, _ in pickletools.genops(raw) if op.name in ("GLOBAL", "STACK_GLOBAL")}
    assert "chumpy.ch Ch" in globals_used and any(g.startswith("scipy.sparse") for g in globals_used)
    assert importlib.util.find_spec("chumpy") is None                 # loads without chumpy installed
    expected = build_arrays()
    for side in ("right", "left"):
        got, want = arrays[side], expected[side]
        assert got["path"] == mano_dir / f"MANO_{side.upper()}.pkl"
        for key in ("v_template", "posedirs", "J_regressor", "weights", "hands_mean", "hands_components"):
            np.testing.assert_array_equal(got[key], want[key])
        np.testing.assert_array_equal(got["f"], want["f"].astype(np.int64))
        assert got["J_regressor"].shape == (16, 778) and isinstance(got["J_regressor"], np.ndarray)
    # the left-hand fix flips the x components of the LEFT file's shape directions, and only those
    np.testing.assert_array_equal(arrays["right"]["shapedirs"], expected["right"]["shapedirs"])
    np.testing.assert_array_equal(arrays["left"]["shapedirs"], expected["left"]["shapedirs"] * MIRROR[None, :, None])


@pytest.mark.parametrize("protocol, sparse", [(0, "csr_matrix"), (1, "coo_matrix"), (2, None), (2, "csc_array")])
def test_other_pickle_protocols_and_regressor_storage(tmp_path, protocol, sparse):
    import scipy.sparse as sp

    want = build_arrays()["left"]
    write_mano_file(tmp_path / "MANO_LEFT.pkl", want, protocol=protocol, sparse=sparse and getattr(sp, sparse))
    got = load_mano_arrays(tmp_path, "left")
    np.testing.assert_array_equal(got["J_regressor"], want["J_regressor"])
    np.testing.assert_array_equal(got["shapedirs"], want["shapedirs"] * MIRROR[None, :, None])


class _Evil:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize("payload", [
    "reduce-os-system", b"cos\nsystem\n(S'true'\ntR.", b"c__builtin__\neval\n(S'1+1'\ntR.",
    b"\x80\x02cnumpy\nload\nq\x00.", b"csubprocess\nPopen\n.",
])
def test_refuses_pickles_that_call_anything_else(tmp_path, payload):
    path, target = tmp_path / "MANO_RIGHT.pkl", tmp_path / "pwned"
    path.write_bytes(pickle.dumps({"v_template": _Evil(target)}, protocol=2)
                     if payload == "reduce-os-system" else payload)
    with pytest.raises(InputError) as info:
        load_mano_arrays(tmp_path, "right")
    assert str(path) in info.value.message and "mano.is.tue.mpg.de" in info.value.message
    assert not target.exists()


@pytest.mark.parametrize("content", [b"", b"not a pickle at all", None])
def test_corrupt_file_names_path_and_where_to_get_it(tmp_path, mano_dir, content):
    path = tmp_path / "MANO_LEFT.pkl"
    path.write_bytes(content if content is not None else (mano_dir / "MANO_LEFT.pkl").read_bytes()[:5000])
    with pytest.raises(InputError) as info:
        load_mano_arrays(tmp_path, "left")
    assert str(path) in info.value.message and "mano.is.tue.mpg.de" in info.value.message


@pytest.mark.parametrize("key, value, words", [
    ("v_template", np.zeros((777, 3)), "shape (777, 3)"),
    ("shapedirs", np.zeros((778, 3, 4)), "shape directions"),
    ("posedirs", np.full((778, 3, 135), np.nan), "NaN"),
    ("f", np.full((1538, 3), 800), "outside"),
    ("hands_mean", None, "missing"),
    ("kintree_table", np.array([[-1, 0, 1, 2, 0, 4, 5, 0, 7, 8, 0, 10, 11, 0, 15, 14], list(range(16))]), "parent"),
])
def test_bad_arrays_name_file_and_key(tmp_path, key, value, words):
    arrays = build_arrays()["right"]
    if value is None:
        del arrays[key]
    else:
        arrays[key] = value
    path = write_mano_file(tmp_path / "MANO_RIGHT.pkl", arrays)
    with pytest.raises(InputError) as info:
        load_mano_arrays(tmp_path, "right")
    assert str(path) in info.value.message and f"'{key}'" in info.value.message and words in info.value.message


def test_missing_files_say_where_to_get_them(tmp_path, monkeypatch, mano_dir):
    monkeypatch.delenv("HANDSYNTH_MANO_DIR", raising=False)
    for call in (lambda: resolve_mano_dir(None), lambda: resolve_mano_dir(tmp_path / "nowhere"),
                 lambda: resolve_mano_dir(tmp_path)):
        with pytest.raises(MissingResourceError) as info:
            call()
        msg = info.value.message
        assert "mano.is.tue.mpg.de" in msg and "MANO_RIGHT.pkl" in msg and "MANO_LEFT.pkl" in msg
        assert "--mano-dir" in msg and "HANDSYNTH_MANO_DIR" in msg
    with pytest.raises(MissingResourceError, match="nowhere"):
        resolve_mano_dir(tmp_path / "nowhere")
    only_right = tmp_path / "only_right"
    only_right.mkdir()
    (only_right / "MANO_RIGHT.pkl").write_bytes((mano_dir / "MANO_RIGHT.pkl").read_bytes())
    assert load_mano_arrays(resolve_mano_dir(only_right), "right")["path"] == only_right / "MANO_RIGHT.pkl"
    with pytest.raises(MissingResourceError) as info:
        load_mano_arrays(only_right, "left")
    assert str(only_right / "MANO_LEFT.pkl") in info.value.message and "mano.is.tue.mpg.de" in info.value.message


def test_resolve_finds_files_by_env_subfolder_or_file(tmp_path, monkeypatch, mano_dir):
    monkeypatch.setenv("HANDSYNTH_MANO_DIR", str(mano_dir))
    assert resolve_mano_dir(None) == mano_dir
    for sub in ("mano", "models"):
        nested = tmp_path / sub
        nested.mkdir()
        (nested / "MANO_RIGHT.pkl").write_bytes(b"x")
        assert resolve_mano_dir(tmp_path) == nested
        (nested / "MANO_RIGHT.pkl").unlink()
        nested.rmdir()
    assert resolve_mano_dir(mano_dir / "MANO_LEFT.pkl") == mano_dir


def test_doctor_check_reports_the_files(mano_dir):
    from handsynth.doctor import check_mano

    check = check_mano(mano_dir)
    assert check.ok and "MANO_RIGHT.pkl" in check.detail and "MANO_LEFT.pkl" in check.detail


def test_file_hashes_and_faces(model, mano_dir, arrays):
    assert model.file_hashes() == {n: sha256_file(mano_dir / n) for n in ("MANO_RIGHT.pkl", "MANO_LEFT.pkl")}
    for side in ("right", "left"):
        faces = model.faces(side)
        assert faces.shape == (1538, 3) and faces.dtype == np.int64
        np.testing.assert_array_equal(faces, arrays[side]["f"])


# ---------------------------------------------------------------------------------------------
# Forward


def test_joint_names():
    assert JOINT_ORDER == "openpose21" and len(JOINT_NAMES) == 21
    assert JOINT_NAMES[:5] == ("wrist", "thumb1", "thumb2", "thumb3", "thumb4")
    assert JOINT_NAMES[8::4] == ("index4", "middle4", "ring4", "pinky4")


def test_template_pose_gives_template_plus_trans(model, arrays):
    a = arrays["right"]
    pose = np.zeros((1, 48))
    pose[0, 3:] = -a["hands_mean"]                 # cancels flat_hand_mean=False's mean pose
    trans = np.array([[0.1, -0.2, 0.5]])
    out = model.forward("right", pose, np.zeros((1, 10)), trans)
    np.testing.assert_allclose(out.vertices[0].numpy(), a["v_template"] + trans[0], atol=ATOL, rtol=0)
    np.testing.assert_allclose(out.joints[0, [0, 1, 5, 9, 13, 17]].numpy(),
                               a["J_regressor"][[0, 13, 1, 4, 10, 7]] @ a["v_template"] + trans[0], atol=ATOL, rtol=0)
    # zero pose is the mean (slightly flexed) hand, not the template
    flexed = model.forward("right", np.zeros((1, 48)), np.zeros((1, 10)), trans)
    assert (flexed.vertices[0].numpy() - a["v_template"] - trans[0]).std() > 1e-3


@pytest.mark.parametrize("side", ["right", "left"])
def test_forward_matches_independent_lbs(model, arrays, side):
    pose, shape, trans = random_params(np.random.default_rng(1), 3)
    out = model.forward(side, pose, shape, trans)
    assert out.vertices.shape == (3, 778, 3) and out.joints.shape == (3, 21, 3)
    assert out.vertices.dtype == torch.float64
    for b in range(3):
        verts, joints = numpy_mano(arrays[side], pose[b], shape[b], trans[b])
        np.testing.assert_allclose(out.vertices[b].numpy(), verts, atol=ATOL, rtol=0)
        np.testing.assert_allclose(out.joints[b].numpy(), joints, atol=ATOL, rtol=0)
    for k, tip in enumerate(TIPS.values()):         # joints 4, 8, 12, 16, 20 are the tip vertices
        np.testing.assert_array_equal(out.joints[:, 4 + 4 * k].numpy(), out.vertices[:, tip].numpy())


def test_batched_equals_per_sample(model):
    pose, shape, trans = random_params(np.random.default_rng(2), 5)
    batched = model.forward("left", torch.tensor(pose), torch.tensor(shape), torch.tensor(trans))
    for b in range(5):
        single = model.forward("left", pose[b:b + 1], shape[b:b + 1], trans[b:b + 1])
        np.testing.assert_allclose(batched.vertices[b].numpy(), single.vertices[0].numpy(), atol=1e-12)
        np.testing.assert_allclose(batched.joints[b].numpy(), single.joints[0].numpy(), atol=1e-12)


def test_global_rotation_turns_about_the_root_joint(model):
    rng = np.random.default_rng(3)
    pose, shape, trans = random_params(rng, 1)
    pose[0, :3] = 0.0
    rest = model.forward("right", pose, shape, trans)
    omega = np.array([0.3, -1.1, 0.7])
    pose[0, :3] = omega
    turned = model.forward("right", pose, shape, trans)
    root = rest.joints[0, 0].numpy()
    expected = (rest.joints[0].numpy() - root) @ rodrigues(omega).T + root
    np.testing.assert_allclose(turned.joints[0].numpy(), expected, atol=1e-10)
    np.testing.assert_allclose(turned.joints[0, 0].numpy(), root, atol=1e-12)


def test_left_is_mirror_of_right_only_with_the_fix(model, arrays):
    pose, shape, trans = random_params(np.random.default_rng(4), 2)
    right = model.forward("right", pose, shape, trans)
    left = model.forward("left", mirror_pose(pose), shape, trans * MIRROR)
    np.testing.assert_allclose(left.vertices.numpy(), right.vertices.numpy() * MIRROR, atol=1e-9, rtol=0)
    np.testing.assert_allclose(left.joints.numpy(), right.joints.numpy() * MIRROR, atol=1e-9, rtol=0)
    unfixed = dict(arrays["left"], shapedirs=arrays["left"]["shapedirs"] * MIRROR[None, :, None])
    verts, _ = numpy_mano(unfixed, mirror_pose(pose[0]), shape[0], trans[0] * MIRROR)
    assert np.abs(verts - right.vertices[0].numpy() * MIRROR).max() > 2e-3     # > 2 mm off without the fix
    verts, _ = numpy_mano(unfixed, mirror_pose(pose[0]), np.zeros(10), trans[0] * MIRROR)
    zero_shape = model.forward("right", pose[:1], np.zeros((1, 10)), trans[:1])
    np.testing.assert_allclose(verts, zero_shape.vertices[0].numpy() * MIRROR, atol=ATOL, rtol=0)


def test_float32_and_tensor_inputs(mano_dir):
    model32 = HandModel(mano_dir)
    pose, shape, trans = random_params(np.random.default_rng(5), 2)
    out = model32.forward("right", torch.tensor(pose, dtype=torch.float16), shape, torch.tensor(trans))
    assert out.vertices.dtype == torch.float32 and out.joints.dtype == torch.float32
    with pytest.raises(ValueError, match="pose"):
        model32.forward("right", pose[:, :45], shape, trans)
    with pytest.raises(ValueError, match="trans"):
        model32.forward("right", pose, shape, trans[:1])


@pytest.mark.gpu
def test_cuda_matches_cpu(mano_dir, model):
    gpu = HandModel(mano_dir, device="cuda", dtype=torch.float64)
    pose, shape, trans = random_params(np.random.default_rng(6), 4)
    out = gpu.forward("left", torch.tensor(pose, device="cuda"), shape, trans)
    assert out.vertices.device.type == "cuda"
    np.testing.assert_allclose(out.vertices.cpu().numpy(), model.forward("left", pose, shape, trans).vertices.numpy(),
                               atol=1e-9)


# ---------------------------------------------------------------------------------------------
# The test hand itself


@pytest.mark.parametrize("side", ["right", "left"])
def test_fixture_hand_is_a_closed_hand_shaped_mesh(arrays, side):
    import trimesh

    a = arrays[side]
    v, f = a["v_template"], a["f"]
    assert v.shape == (778, 3) and f.shape == (1538, 3) and f.min() >= 0 and f.max() < 778
    assert len(np.unique(f)) == 778                                   # every vertex is on the surface
    directed = Counter((int(t[i]), int(t[(i + 1) % 3])) for t in f for i in range(3))
    assert max(directed.values()) == 1                                # consistently wound
    open_edges = [e for e in directed if e[::-1] not in directed]
    assert len(open_edges) == 16                                      # open only at the wrist, like MANO
    wrist = a["J_regressor"][0] @ v
    assert np.linalg.norm(v[np.unique(open_edges)] - wrist, axis=1).max() < 0.035
    # cap the wrist with a fan around the hole's centre: then closed, outward, a hand's volume
    hole = np.unique(open_edges)
    cap = [(b, a_, 778) for a_, b in open_edges]
    mesh = trimesh.Trimesh(np.vstack([v, v[hole].mean(0)]), np.vstack([f, cap]), process=False)
    assert mesh.is_watertight and mesh.is_winding_consistent and 1e-4 < mesh.volume < 4e-4
    length = np.linalg.norm(v[TIPS["middle"]] - wrist)
    assert 0.17 < length < 0.21 and 0.15 < np.ptp(v, axis=0).max() < 0.22
    # each fingertip vertex is the vertex of its digit farthest from the wrist
    digit_joint = {"index": 3, "middle": 6, "pinky": 9, "ring": 12, "thumb": 15}
    for name, tip in TIPS.items():
        on_digit = np.flatnonzero(a["weights"][:, digit_joint[name]] > 0.5)
        assert tip in on_digit
        assert np.argmax(np.linalg.norm(v[on_digit] - wrist, axis=1)) == list(on_digit).index(tip)
    # thumb on the +z side for the right hand (mirrored for the left), fingers along -x
    sign = 1 if side == "right" else -1
    assert v[TIPS["middle"], 0] * sign < wrist[0] * sign - 0.15
    assert v[TIPS["thumb"], 2] > v[TIPS["index"], 2] > v[TIPS["middle"], 2] > v[TIPS["ring"], 2] > v[TIPS["pinky"], 2]

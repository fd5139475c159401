"""The pure pieces of handsynth augment: slerp, anatomical frames and limits, camera placement,
interpenetration depth, and the recipe schema - each against an independent computation."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation, Slerp

from handsynth.augment import camera as cam
from handsynth.augment import limits
from handsynth.augment.penetration import boundary_loops, close_boundary, penetration_depth
from handsynth.augment.recipe import AugmentRecipe, load_augment_recipe
from handsynth.augment.rotation import geodesic, slerp
from handsynth.augment.summary import coverage, mean_joint_angle_deg, pose_distances
from handsynth.errors import InputError
from handsynth.hand_model import HandModel
from tests.conftest import AUGMENT_RECIPE


# --- rotations ----------------------------------------------------------------------------------

def test_slerp_matches_scipy_and_lies_on_the_geodesic():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(15, 3)), rng.normal(size=(15, 3))
    for t in (0.0, 0.3, 0.75, 1.0):
        out = slerp(a, b, t)
        for j in range(15):
            ref = Slerp([0.0, 1.0], Rotation.from_rotvec([a[j], b[j]]))([t])[0]
            assert (ref.inv() * Rotation.from_rotvec(out[j])).magnitude() < 1e-9
        whole = geodesic(a, b)
        np.testing.assert_allclose(geodesic(a, out), t * whole, atol=1e-9)
        np.testing.assert_allclose(geodesic(out, b), (1 - t) * whole, atol=1e-9)


def test_geodesic_is_the_angle_between_rotations():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(50, 3))
    axis = rng.normal(size=(50, 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    angle = rng.uniform(0, np.pi, 50)
    b = (Rotation.from_rotvec(a) * Rotation.from_rotvec(axis * angle[:, None])).as_rotvec()
    np.testing.assert_allclose(geodesic(a, b), angle, atol=1e-9)


# --- anatomical frames and limits ---------------------------------------------------------------

@pytest.fixture(scope="module")
def model(mano_dir):
    return HandModel(mano_dir, dtype=torch.float64)


@pytest.mark.parametrize("side", ["right", "left"])
def test_positive_bend_curls_each_digit_towards_the_palm_and_splay_towards_the_thumb(model, side):
    joints, vertices, mean = model.rest(side)
    frames = limits.joint_frames(joints, vertices, side)
    np.testing.assert_allclose(np.einsum("jab,jcb->jac", frames, frames), np.broadcast_to(np.eye(3), (15, 3, 3)),
                               atol=1e-12)
    palm = limits.palm_direction(joints, side)
    radial = joints[limits.MANO_INDEX1] - joints[limits.MANO_PINKY1]
    tips = list(limits.DIGIT_TIPS.values())
    flat = np.concatenate([np.zeros(3), -mean])          # the template hand itself
    base = model.forward(side, flat[None], np.zeros((1, 10)), np.zeros((1, 3))).vertices[0].numpy()
    np.testing.assert_allclose(base, vertices, atol=1e-9)
    digit_of_joint = ["index"] * 3 + ["middle"] * 3 + ["pinky"] * 3 + ["ring"] * 3 + ["thumb"] * 3
    for j in range(15):
        tip = limits.DIGIT_TIPS[digit_of_joint[j]]
        for component, direction in ((0, palm), (1, radial)):
            if component == 1 and digit_of_joint[j] == "thumb":
                continue                                   # the thumb's splay is in its own plane
            angles = np.zeros((15, 3))
            angles[j, component] = np.deg2rad(20)
            pose = flat.copy()
            pose[3:] += limits.from_anatomical(angles, frames).ravel()
            moved = model.forward(side, pose[None], np.zeros((1, 10)), np.zeros((1, 3))).vertices[0].numpy()
            assert np.dot(moved[tip] - base[tip], direction) > 0, (side, j, component)
            others = [t for t in tips if t != tip]
            np.testing.assert_allclose(moved[others], base[others], atol=1e-3)   # pose blend shapes only


def test_limits_table_and_clipping():
    assert limits.LIMITS_DEG.shape == (15, 3, 2)
    assert np.all(limits.LIMITS_DEG[..., 0] < limits.LIMITS_DEG[..., 1])
    # AAOS flexion ranges as documented: MCP 90, PIP 100, DIP 90; thumb MCP 50, IP 80
    assert [limits.LIMITS_DEG[j, 0, 1] for j in (0, 1, 2, 13, 14)] == [90, 100, 90, 50, 80]
    rng = np.random.default_rng(2)
    angles = rng.normal(scale=1.5, size=(7, 15, 3))
    clipped, n = limits.clip_angles(angles)
    assert limits.within_limits(clipped).all()
    assert n == int((~limits.within_limits(angles)).sum()) > 0
    inside = np.deg2rad(limits.LIMITS_DEG.mean(-1))
    assert limits.within_limits(inside).all() and limits.clip_angles(inside)[1] == 0


# --- camera placement ---------------------------------------------------------------------------

def _project(points, K, R, t):
    x = points @ R.T + t
    return x, x[:, :2] / x[:, 2:] * [K[0, 0], K[1, 1]] + [K[0, 2], K[1, 2]]


@pytest.mark.parametrize("size", [(512, 512), (640, 480), (480, 640), (100, 900)])
def test_every_point_lands_inside_the_image_by_construction(size):
    rng = np.random.default_rng(3)
    for trial in range(40):
        points = rng.normal(size=(300, 3)) * [0.08, 0.03, 0.05] + rng.normal(size=3)
        basis = Rotation.random(random_state=trial).as_matrix()
        az, el, roll = rng.uniform(-np.pi, np.pi), rng.uniform(-1.5, 1.5), rng.uniform(-np.pi, np.pi)
        share = rng.choice([0.05, 0.5, 1.0])
        offset = rng.choice([-1.0, 1.0], 2) if trial % 2 else rng.uniform(-1, 1, 2)
        K = cam.intrinsics(size, np.deg2rad(rng.uniform(20, 120)))
        view = cam.orbit_direction(az, el, basis)
        R, t, info = cam.place_camera(points, view, basis[0], basis[2], roll, share, tuple(offset), K, size, 2.0)
        assert np.allclose(R @ R.T, np.eye(3)) and np.isclose(np.linalg.det(R), 1.0)
        x, uv = _project(points, K, R, t)
        assert np.all(x[:, 2] > 0)
        assert np.all(uv >= 2.0 - 1e-9) and np.all(uv <= np.array(size) - 1 - 2.0 + 1e-9)
        # the camera sits on the orbit direction, at the recorded distance from the sphere's centre
        centre, radius = cam.bounding_sphere(points)
        position = -R.T @ t
        np.testing.assert_allclose(position - centre, info["distance_m"] * view, atol=1e-9)
        assert info["realised_share"] <= share + 1e-9


def test_centred_camera_hits_the_target_share_and_looks_at_the_centre():
    rng = np.random.default_rng(4)
    points = rng.normal(size=(200, 3)) * 0.05
    size, K = (640, 480), cam.intrinsics((640, 480), np.deg2rad(60))
    basis = np.eye(3)
    R, t, info = cam.place_camera(points, cam.orbit_direction(0.3, 0.2, basis), basis[0], basis[2], 0.0, 0.4,
                                  (0.0, 0.0), K, size)
    centre, radius = cam.bounding_sphere(points)
    _, uv = _project(centre[None], K, R, t)
    np.testing.assert_allclose(uv[0], [K[0, 2], K[1, 2]], atol=1e-6)
    depth = (R @ centre + t)[2]
    assert info["realised_share"] == pytest.approx(0.4)
    assert 2 * radius * K[0, 0] / depth == pytest.approx(0.4 * 480)
    # roll 0: the image's "up" (-y) is basis[0]'s direction across the optical axis
    up_in_camera = R @ basis[0]
    assert up_in_camera[1] < 0 and abs(up_in_camera[0]) < 1e-9


# --- interpenetration ---------------------------------------------------------------------------

def _sphere(radius, centre, subdivisions=3):
    import trimesh

    mesh = trimesh.creation.icosphere(subdivisions, radius=radius)
    return np.asarray(mesh.vertices) + centre, np.asarray(mesh.faces)


def test_penetration_depth_agrees_with_trimesh_and_geometry():
    import trimesh

    va, fa = _sphere(0.05, [0.0, 0.0, 0.0])
    for gap in (0.09, 0.07, 0.05):
        vb, fb = _sphere(0.03, [gap, 0.0, 0.0])
        depth = penetration_depth(va, fa, vb, fb)
        ref = max(trimesh.proximity.signed_distance(trimesh.Trimesh(va, fa), vb).max(),
                  trimesh.proximity.signed_distance(trimesh.Trimesh(vb, fb), va).max(), 0.0)
        assert depth == pytest.approx(ref, abs=1e-9)
        assert depth == pytest.approx(max(0.0, 0.05 + 0.03 - gap), abs=0.002)   # overlap of the two radii


def test_an_open_mesh_is_capped_watertight_with_outward_faces():
    import trimesh

    v, f = _sphere(0.05, [0.0, 0.0, 0.0])
    open_faces = f[v[f].mean(1)[:, 2] < 0.045]          # cut a cap off: one boundary loop
    loops = boundary_loops(open_faces)
    assert len(loops) == 1 and len(loops[0]) > 3
    cv, cf = close_boundary(v, open_faces)
    mesh = trimesh.Trimesh(cv, cf, process=False)
    assert mesh.is_watertight and mesh.is_winding_consistent and mesh.volume > 0
    assert penetration_depth(v, open_faces, v * 0.5, f) == pytest.approx(0.05 - 0.025, abs=0.002)


# --- summary pieces -----------------------------------------------------------------------------

def test_pose_distances_merge_repeated_sources_and_measure_spacing():
    rng = np.random.default_rng(5)
    src = rng.normal(scale=0.3, size=(3, 15, 3))
    src = np.concatenate([src, src[:1]])                     # a pose repeated (another camera)
    joints = rng.normal(size=(4, 21, 3))
    joints[3] = joints[0]
    new = src[:2] + 0.01
    d = pose_distances(new, joints[:2] + 1.0, src, joints)
    assert d["source_poses"] == 3
    pair = mean_joint_angle_deg(src[:3], src[:3])
    np.fill_diagonal(pair, np.inf)
    assert d["angle_deg"]["source_spacing"]["median"] == pytest.approx(np.median(pair.min(1)))
    a, b = np.broadcast_arrays(new[:, None], src[None, :3])
    direct = np.rad2deg(geodesic(a, b)).mean(-1).min(1)
    assert d["angle_deg"]["new_to_nearest_source"]["mean"] == pytest.approx(direct.mean(), abs=1e-5)
    assert d["joints_mm"]["new_to_nearest_source"]["max"] == pytest.approx(np.sqrt(3.0))


def test_coverage_histogram_counts_every_view_once():
    cov = coverage([-179.0, 0.0, 10.0, 179.0], [-89.0, 0.0, 5.0, 89.0])
    assert sum(cov["azimuth_counts"]) == 4 and cov["counts"][6][3] == 2 and cov["cells_filled"] == 3


# --- recipe -------------------------------------------------------------------------------------

def test_the_shipped_recipe_states_exactly_the_defaults():
    recipe, defaults = load_augment_recipe(AUGMENT_RECIPE)
    assert recipe == AugmentRecipe() and defaults == {}


@pytest.mark.parametrize("text, field, line, words", [
    ("viewpoint:\n  fov_deg: [80, 20]\n", "viewpoint.fov_deg", 2, "low <= high"),
    ("seed: 1\npose:\n  perturb:\n    sigmas_deg: {bend: 3}\n", "pose.perturb.sigmas_deg", 4, "did you mean 'sigma_deg'"),
    ("shape:\n  sigma: lots\n", "shape.sigma", 2, "valid number"),
    ("viewpoint:\n  image_sizes: [[512, 512], [640]]\n", "viewpoint.image_sizes[1]", 2, ""),
    ("two_hands:\n  max_penetration_mm: -1\n", "two_hands.max_penetration_mm", 2, "greater than or equal to 0"),
])
def test_bad_recipes_name_file_field_and_line(tmp_path: Path, text, field, line, words):
    path = tmp_path / "aug.yaml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(InputError) as info:
        load_augment_recipe(path)
    message = info.value.message
    assert str(path) in message and f"field {field}" in message and f"line {line}" in message, message
    assert words in message and ("handsynth recipes copy augment" in message or "did you mean" in message), message

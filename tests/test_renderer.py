"""The pyrender hand renderer against geometry computed independently (trimesh primitives, MANO hands)."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh

from handsynth.render import geometry as g
from handsynth.render.renderer import HandRenderer, View, oriented_faces

K = np.array([[600.0, 0.0, 150.0], [0.0, 620.0, 110.0], [0.0, 0.0, 1.0]])
SIZE = (320, 240)


@pytest.fixture(scope="module")
def renderer():
    return HandRenderer()


def _sphere(centre, radius=0.05, subdivisions=4):
    s = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    return np.asarray(s.vertices) + np.asarray(centre, dtype=float), np.asarray(s.faces)


def _near_mask(mask: np.ndarray, uv: np.ndarray, radius: int = 1) -> np.ndarray:
    """For each pixel position, whether the mask is set within ``radius`` pixels of it."""
    h, w = mask.shape
    ok = []
    for u, v in np.rint(uv).astype(int):
        ys, xs = slice(max(v - radius, 0), min(v + radius + 1, h)), slice(max(u - radius, 0), min(u + radius + 1, w))
        ok.append(bool(mask[ys, xs].any()))
    return np.array(ok)


def _asymmetric_mesh():
    """A sphere with a capsule 'thumb' off to one side, at about half a metre."""
    body = _sphere((0.01, 0.0, 0.5), radius=0.04)
    cap = trimesh.creation.capsule(height=0.06, radius=0.012)
    cap.apply_transform(trimesh.transformations.rotation_matrix(1.1, [0.3, 1.0, 0.2]))
    return [body, (np.asarray(cap.vertices) + [0.06, -0.03, 0.47], np.asarray(cap.faces))]


def test_silhouette_and_box_match_projection(renderer):
    verts, faces = _sphere((0.02, -0.01, 0.6))
    (out,) = renderer.render([(verts, faces)], [View(K, SIZE)])
    assert out.color.shape == (240, 320, 3) and out.color.dtype == np.uint8
    uv = g.project(verts, K)
    assert _near_mask(out.mask, uv).all()
    box = g.tight_box(uv)
    ys, xs = np.nonzero(out.mask)
    # the silhouette's pixel extent is the projected box to within a pixel (pixel centres at integers)
    np.testing.assert_allclose([xs.min(), ys.min(), xs.max(), ys.max()], box, atol=1.0)
    assert out.color[~out.mask].max() == 0          # pure black background


def test_depth_is_camera_z_in_metres(renderer):
    centre = np.array([0.0, 0.0, 0.8])
    verts, faces = _sphere(centre, radius=0.05)
    (out,) = renderer.render([(verts, faces)], [View(K, SIZE)])
    u, v = np.rint(g.project(centre[None], K)[0]).astype(int)
    assert out.depth[v, u] == pytest.approx(0.75, abs=2e-3)


def test_meshes_are_z_buffered_together(renderer):
    near = _sphere((0.0, 0.0, 0.5), radius=0.03)
    far = _sphere((0.02, 0.0, 0.9), radius=0.08)
    (both,) = renderer.render([far, near], [View(K, SIZE)])
    (near_only,) = renderer.render([near], [View(K, SIZE)])
    overlap = near_only.depth > 0
    np.testing.assert_allclose(both.depth[overlap], near_only.depth[overlap], atol=1e-5)
    assert (both.depth[~overlap & (both.depth > 0)] > 0.8).all()


def test_renders_are_deterministic_across_resizes_and_instances(renderer):
    meshes = _asymmetric_mesh()
    a1, b1 = renderer.render(meshes, [View(K, SIZE), View(K * [[2], [2], [1]], (512, 512))])
    (a2,) = renderer.render(meshes, [View(K, SIZE)])
    (a3,) = HandRenderer().render(meshes, [View(K, SIZE)])
    assert a1.color.tobytes() == a2.color.tobytes() == a3.color.tobytes()
    assert b1.color.shape == (512, 512, 3)


def test_near_white_shading_with_visible_variation(renderer):
    (out,) = renderer.render(_asymmetric_mesh(), [View(K, SIZE)])
    lit = out.color[out.mask].astype(float)
    # base colour (1.0, 1.0, 0.9): red = green, blue a little lower; bright but shaded
    assert np.abs(lit[:, 0] - lit[:, 1]).max() <= 1
    assert (lit[:, 2] <= lit[:, 0]).all() and lit[:, 2].mean() < lit[:, 0].mean() - 5
    assert np.median(lit[:, 0]) > 200 and lit[:, 0].std() > 8


def test_inward_wound_faces_are_reoriented(renderer):
    verts, faces = _sphere((0.0, 0.01, 0.6))
    assert (oriented_faces(verts, faces[:, ::-1]) == faces).all()
    (a,) = renderer.render([(verts, faces)], [View(K, SIZE)])
    (b,) = renderer.render([(verts, faces[:, ::-1])], [View(K, SIZE)])
    assert a.color.tobytes() == b.color.tobytes()


def _mirror_view(K: np.ndarray, width: int) -> np.ndarray:
    """Intrinsics that image x-mirrored points at horizontally flipped pixels: u' = (W - 1) - u."""
    Km = K.copy()
    Km[0, 2] = width - 1 - K[0, 2]
    return Km


def _assert_mirrored(a, b):
    """``b`` is ``a`` flipped left-right, up to a few edge pixels from rasterisation."""
    flipped_mask = np.fliplr(b.mask)
    differ = a.mask ^ flipped_mask
    assert differ.sum() <= 0.02 * a.mask.sum()
    both = (a.depth > 0) & (np.fliplr(b.depth) > 0)
    diff = np.abs(a.color.astype(int) - np.fliplr(b.color).astype(int))[both]
    assert np.median(diff) <= 1 and np.mean(diff) < 3
    # depth comes from one multisample position per pixel, which the flip moves by 1/4 px
    depth_diff = np.abs(a.depth[both] - np.fliplr(b.depth)[both])
    assert np.median(depth_diff) < 3e-4 and np.quantile(depth_diff, 0.95) < 3e-3


def test_mirrored_mesh_renders_mirrored(renderer):
    meshes = _asymmetric_mesh()
    flip = np.array([-1.0, 1.0, 1.0])
    mirrored = [(v * flip, f) for v, f in meshes]           # inverted winding: the renderer must cope
    (a,) = renderer.render(meshes, [View(K, SIZE)])
    (b,) = renderer.render(mirrored, [View(_mirror_view(K, SIZE[0]), SIZE)])
    _assert_mirrored(a, b)


def test_depth_style_is_bright_near_dim_far():
    near = _sphere((-0.05, 0.0, 0.5), radius=0.03)
    far = _sphere((0.06, 0.0, 0.9), radius=0.03)
    (out,) = HandRenderer(style="depth").render([near, far], [View(K, SIZE)])
    u_near, v_near = np.rint(g.project(np.array([[-0.05, 0.0, 0.47]]), K)[0]).astype(int)
    u_far, v_far = np.rint(g.project(np.array([[0.06, 0.0, 0.87]]), K)[0]).astype(int)
    assert out.color[v_near, u_near, 0] > out.color[v_far, u_far, 0] > 0
    assert (out.color[..., 0] == out.color[..., 2]).all() and out.color[~out.mask].max() == 0


def test_unknown_style_rejected():
    with pytest.raises(ValueError, match="unknown render style"):
        HandRenderer(style="cartoon")

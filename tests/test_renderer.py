"""The pyrender hand renderer against geometry computed independently (trimesh primitives, MANO hands)."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh

from handsynth.render import geometry as g
from handsynth.render.renderer import HandRenderer, View, depth_image, oriented_faces

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


def test_depth_image_is_relative_inverse_depth_of_the_z_buffer(renderer):
    near = _sphere((-0.05, 0.0, 0.5), radius=0.03)
    far = _sphere((0.06, 0.0, 0.9), radius=0.03)
    (out,) = renderer.render([near, far], [View(K, SIZE)])
    image = depth_image(out.depth)
    grey, z, mesh = image[..., 0].astype(int), out.depth.astype(np.float64), out.depth > 0
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 0] == image[..., 2]).all()
    assert (grey[~mesh] == 0).all() and grey[mesh].min() == 64 and grey[mesh].max() == 255  # black background
    # nearer = brighter: sorted by Z, the grey levels never increase
    order = np.argsort(z[mesh], kind="stable")
    assert (np.diff(grey[mesh][order]) <= 0).all()
    # exactly 64 + 191 * normalised disparity (1/Z) of this image's mesh pixels
    d = 1.0 / z[mesh]
    np.testing.assert_array_equal(grey[mesh], np.rint(64 + 191 * (d - d.min()) / (d.max() - d.min())))
    # against the scene: the near sphere's front is the nearest point, the far sphere's front 0.87 m away
    u_near, v_near = np.rint(g.project(np.array([[-0.05, 0.0, 0.47]]), K)[0]).astype(int)
    u_far, v_far = np.rint(g.project(np.array([[0.06, 0.0, 0.87]]), K)[0]).astype(int)
    assert grey[v_near, u_near] >= 254
    expected_far = 64 + 191 * (1 / 0.87 - 1 / 0.9) / (1 / 0.47 - 1 / 0.9)   # about 71 (linear in Z: about 77)
    assert abs(grey[v_far, u_far] - expected_far) <= 3
    # relative: the same scene twice as far (or in other units) gives the same image
    np.testing.assert_array_equal(depth_image(out.depth * 2.0), image)
    assert not depth_image(np.zeros((4, 4), np.float32)).any()


def test_smooth_normals_equal_trimesh_vertex_normals():
    """The normals the renderer uploads are trimesh's (what pyrender's from_trimesh(smooth=True) used), bit for bit,
    degenerate faces included."""
    from handsynth.render.renderer import smooth_normals

    for vertices, faces in _asymmetric_mesh():
        faces = np.vstack([faces, [[0, 0, 1]]])                # a degenerate face: zero normal, zero angles
        expected = trimesh.Trimesh(vertices, faces, process=False).vertex_normals
        np.testing.assert_array_equal(smooth_normals(vertices, faces), expected)


def test_a_render_does_not_depend_on_what_was_rendered_before(renderer):
    """Hand slots are reused (vertex buffers overwritten in place, unused slots hidden, draw order as given):
    each call gives the bytes a fresh renderer gives, whatever the earlier calls drew."""
    body, cap = _asymmetric_mesh()
    moved = (body[0] + [0.02, 0.01, 0.03], body[1])
    calls = [[body, cap], [moved], [cap, moved], [cap], [body, cap, moved], [body]]
    history, expected = HandRenderer(), []
    for meshes in calls:
        (got,) = history.render(meshes, [View(K, SIZE)])
        (fresh,) = HandRenderer().render(meshes, [View(K, SIZE)])
        expected.append(fresh.color.tobytes() + fresh.depth.tobytes())
        assert got.color.tobytes() + got.depth.tobytes() == expected[-1]
    # the renderers share one GL context, which holds only the meshes of the scene drawn last: alone, the
    # slots' buffers stay in it and are overwritten, not re-created
    history.render(calls[4], [View(K, SIZE)])
    slots = [(node, node.mesh.primitives[0]._vaid) for _, node in history._slots]
    assert len(slots) == 3 and all(vaid is not None for _, vaid in slots)    # two sphere slots, one capsule
    for meshes, pixels in zip(calls, expected):
        (got,) = history.render(meshes, [View(K, SIZE)])
        assert got.color.tobytes() + got.depth.tobytes() == pixels
    assert [(node, node.mesh.primitives[0]._vaid) for _, node in history._slots] == slots


def test_colour_only_render_reads_the_same_colour(renderer):
    meshes = _asymmetric_mesh()
    views = [View(K, SIZE), View(K * [[2], [2], [1]], (512, 512))]
    full = renderer.render(meshes, views)
    colour = renderer.render(meshes, views, depth=False)
    for a, b in zip(full, colour):
        assert b.depth is None and a.color.tobytes() == b.color.tobytes() and a.color.any()
        assert (b.mask == a.color.any(axis=2)).all()
    (again,) = renderer.render(meshes, views[:1])            # and the depth read-back is back for the next call
    assert again.depth is not None and again.depth.tobytes() == full[0].depth.tobytes()


def test_deferred_read_back_equals_pyrenders_own(renderer):
    """start() draws every view before reading any back (views of one size in their own framebuffers) and reads
    them with its own blit and depth conversion: the bytes must equal pyrender's own render-and-read of each view,
    including two views of the same size in one call, whatever Python does in between."""
    from handsynth.render import renderer as module

    meshes = _asymmetric_mesh()
    views = [View(K, (512, 512)), View(K * [[1.6], [1.6], [1]], (512, 512)), View(K, SIZE)]
    pending = renderer.start(meshes, views)
    sum(i * i for i in range(100_000))                         # the caller's work while the driver draws
    got = pending.wait()
    assert pending.wait() is got                               # read once
    offscreen = module._offscreen(renderer._pyrender)
    for view, rendering in zip(views, got):
        own = renderer._render_now(offscreen, view)            # pyrender's OffscreenRenderer.render, unhooked
        assert rendering.color.tobytes() == own.color.tobytes() and rendering.color.any()
        assert rendering.depth.tobytes() == own.depth.tobytes()
    assert got[0].color.tobytes() != got[1].color.tobytes()


def test_many_view_sizes_recycle_framebuffers(renderer):
    """More framebuffer keys than are kept, one after the other and in one call: the ones set aside longest ago
    are deleted, every render stays right."""
    from handsynth.render import renderer as module

    meshes = _asymmetric_mesh()
    sizes = [(96 + 8 * i, 80 + 4 * i) for i in range(module.MAX_KEPT_FRAMEBUFFERS + 3)]
    first = [renderer.render(meshes, [View(K * [[s[0] / 320], [s[0] / 320], [1]], s)])[0] for s in sizes]
    assert len(module._KEPT_FRAMEBUFFERS) <= module.MAX_KEPT_FRAMEBUFFERS
    again = [renderer.render(meshes, [View(K * [[s[0] / 320], [s[0] / 320], [1]], s)])[0] for s in sizes[::-1]]
    at_once = renderer.render(meshes, [View(K * [[s[0] / 320], [s[0] / 320], [1]], s) for s in sizes])
    for a, b, c in zip(first, again[::-1], at_once):
        assert a.color.tobytes() == b.color.tobytes() == c.color.tobytes() and a.color.any()
        assert a.depth.tobytes() == b.depth.tobytes() == c.depth.tobytes()


def test_covered_region_bounds_the_silhouette_to_the_pixel():
    """covered_region (no margin) against pyrender's own full-image render of meshes at random sub-pixel places:
    every covered pixel lies inside it, and it is no more than a pixel larger than the silhouette on any side."""
    from handsynth.render import renderer as module

    hands = HandRenderer()
    offscreen = module._offscreen(hands._pyrender)
    rng = np.random.default_rng(3)
    for _ in range(12):
        centre = [rng.uniform(-0.08, 0.08), rng.uniform(-0.06, 0.06), rng.uniform(0.4, 0.9)]
        vertices, faces = _sphere(centre, radius=rng.uniform(0.004, 0.03), subdivisions=2)
        view = View(K * [[rng.uniform(0.8, 1.2)], [rng.uniform(0.8, 1.2)], [1]], SIZE)
        hands.start([(vertices, faces)], [])                        # loads the mesh into the scene, draws nothing
        own = hands._render_now(offscreen, view)                    # every pixel, as pyrender reads them
        ys, xs = np.nonzero(own.mask)
        x0, y0, x1, y1 = module.covered_region(vertices, view, margin=0)
        assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1
        assert xs.min() - x0 <= 1 and x1 - 1 - xs.max() <= 1 and ys.min() - y0 <= 1 and y1 - 1 - ys.max() <= 1


def test_only_the_covered_region_is_drawn_and_read_yet_every_pixel_is_right(renderer):
    """start() clears, draws, resolves and reads only covered_region of each view: after a render that filled
    the framebuffers, renders of meshes crossing the image edges, outside it, or crossing the near plane (whole
    image) must still equal pyrender's own full render and read of every pixel."""
    from handsynth.render import renderer as module

    offscreen = module._offscreen(renderer._pyrender)
    views = [View(K, SIZE), View(K * [[2], [2], [1]], (512, 512))]
    big = _sphere((0.0, 0.0, 0.3), radius=0.2)
    body, cap = _asymmetric_mesh()
    # a rod from 0.5 m in front of the camera to 0.3 m behind it, right of centre: its corners behind the camera
    # project to the left, while what is drawn of it runs off the right edge
    rod = trimesh.creation.box(extents=(0.02, 0.02, 0.8), transform=trimesh.transformations.translation_matrix(
        [0.04, 0.0, 0.1]))
    cases = {
        "fills the image": [big],
        "crosses the left and bottom edges": [(body[0] + [-0.13, 0.1, 0.0], body[1]), cap],
        "outside the image": [(body[0] + [1.0, 0.0, 0.0], body[1])],
        "crosses the near plane": [(big[0] + [0.0, 0.0, -0.29], big[1])],
        "reaches behind the camera": [(np.asarray(rod.vertices), np.asarray(rod.faces))],
    }
    for case, meshes in cases.items():
        got = renderer.render(meshes, views)
        for view, rendering in zip(views, got):
            own = renderer._render_now(offscreen, view)
            assert rendering.color.tobytes() == own.color.tobytes(), case
            assert rendering.depth.tobytes() == own.depth.tobytes(), case
            region = module.covered_region(np.concatenate([v for v, _ in meshes]), view)
            whole = case in ("fills the image", "crosses the near plane", "reaches behind the camera")
            assert (region == (0, 0, *view.size)) == whole, case
            assert (region == (0, 0, 0, 0)) == (case == "outside the image"), case

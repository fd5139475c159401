"""Headless pyrender rendering of hand meshes in AttentionHand's style.

Input meshes are in OpenCV camera space (metres; x right, y down, z forward) and cameras are
pinhole intrinsics K in pixels with pixel centres at integers (see geometry.py). pyrender uses
OpenGL conventions (y up, looking down -z, pixel edges at integers), so vertices are turned by
diag(1, -1, -1) - a rotation, which keeps face winding - and the principal point is shifted by
half a pixel. The camera sits at the scene origin; lights are fixed in camera space, so every
hand is lit the same way wherever it is.

Styles (one render gives both): "mesh" - ``Rendering.color``, a smooth-shaded near-white mesh (base
colour (1.0, 1.0, 0.9)) on pure black, as in AttentionHand's mesh images; "depth" -
:func:`depth_image` of ``Rendering.depth``, the convention depth ControlNets were trained on (MiDaS-style
relative inverse depth: near bright, far dark, background black, normalised per image).

One pyrender.OffscreenRenderer per process is created lazily and reused for every frame and
every HandRenderer (pyrender's EGL teardown terminates the display, which would break any other
live context, so the one context lives until the process exits). pyrender keeps one framebuffer
and re-creates it whenever the viewport size changes; rendering a global and a local view per
frame would do that twice a frame, so the framebuffers of the last few (size, slot) keys are kept
and swapped back in (see _select_framebuffer). :meth:`HandRenderer.start` draws every view of a
call into its own framebuffer and only flushes, so the driver draws (Mesa's llvmpipe in its own
threads) while the caller works; :meth:`PendingRender.wait` then resolves and reads the views as
pyrender's own read-back does. Only each view's :func:`covered_region` (the box of the projected vertices,
the whole image when a mesh crosses the near plane) is cleared, drawn, resolved and read; every other pixel
is background, so the bytes are those of a full render (tested), for a fraction of llvmpipe's per-pixel work
and of the read-back, which nothing overlaps. Each HandRenderer keeps one scene with its lights and
camera, and one pyrender mesh per hand slot (a MANO topology and its n-th use in a call): a call
writes its vertices and smooth normals into that mesh's GL vertex buffer in place, hides the slots
it does not use and draws the used ones in the order given, so no mesh is built or uploaded per
frame. Rendering is deterministic: the same input gives the same bytes on the same machine and
driver, whatever was rendered before.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from handsynth.errors import MissingResourceError
from handsynth.render.backend import configure_platform

STYLES = ("mesh", "depth")
# Depth style: grey level of the farthest mesh pixel of an image (the nearest is 255). Above 0 so that the
# far side of a hand stays apart from the black (infinitely far) background.
DEPTH_FAR_LEVEL = 64
BASE_COLOR = (1.0, 1.0, 0.9, 1.0)
ZNEAR, ZFAR = 0.01, 100.0                     # metres: hands are expected at 0.2-5 m
AMBIENT = (0.3, 0.3, 0.3)
# Directional lights in OpenCV camera space: (direction the light travels, intensity). The set is
# mirror-symmetric left/right, so a left hand renders as the mirror image of the right hand. Tuned so
# the brightness spread of a lit hand (5th/50th/95th percentile about 180/230/245 of 255) matches
# AttentionHand's sample mesh images.
LIGHTS = (
    ((0.0, 0.0, 1.0), 1.0),                   # key light from the camera
    ((0.0, 0.8, 0.6), 0.9),                   # from above, grazing: shades the finger creases
    ((0.7, -0.3, 0.65), 0.4),                 # soft fills from below-left and below-right
    ((-0.7, -0.3, 0.65), 0.4),
)
_CV_TO_GL = np.diag([1.0, -1.0, -1.0])

Mesh = tuple[np.ndarray, np.ndarray]          # vertices (V, 3) camera space metres, faces (F, 3) int


@dataclass(frozen=True)
class View:
    """A pinhole view: intrinsics K (3, 3, pixels) and output image size (width, height)."""

    K: np.ndarray
    size: tuple[int, int]


@dataclass
class Rendering:
    """One rendered view: ``color`` uint8 (H, W, 3) RGB; ``depth`` float32 (H, W) camera Z in metres, 0 = empty.

    pyrender renders with 4x multisampling: ``color`` edges are anti-aliased (any covered sample
    makes a pixel non-black), while ``depth`` comes from one sample per pixel.
    """

    color: np.ndarray
    depth: np.ndarray | None              # None when the render was asked for colour only

    @property
    def mask(self) -> np.ndarray:
        """Silhouette of all meshes, bool (H, W): pixels with any coverage (non-black colour or depth)."""
        return self.color.any(axis=2) if self.depth is None else (self.depth > 0) | self.color.any(axis=2)


def oriented_faces(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """``faces`` wound so that their normals point outwards (positive signed volume).

    MANO files differ in the winding of the left hand; lighting and back-face culling need
    outward normals, so a mesh whose signed volume is negative gets its faces reversed. The volume
    is taken about the centroid, so an open mesh (MANO's wrist) is judged by its own shape.
    """
    tri = vertices[faces] - vertices.mean(axis=0)
    signed_volume = np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum()
    return faces[:, ::-1] if signed_volume < 0 else faces


def _light_pose(direction: Sequence[float]) -> np.ndarray:
    """Pose of a pyrender directional light (which shines along its -z) travelling along ``direction`` (OpenCV)."""
    d = _CV_TO_GL @ np.asarray(direction, dtype=np.float64)
    z = -d / np.linalg.norm(d)
    helper = np.array([0.0, 1.0, 0.0]) if abs(z[1]) < 0.9 else np.array([1.0, 0.0, 0.0])
    x = np.cross(helper, z)
    x /= np.linalg.norm(x)
    pose = np.eye(4)
    pose[:3, :3] = np.stack([x, np.cross(z, x), z], axis=1)
    return pose


class HandRenderer:
    """Renders several hand meshes, z-buffered together, through one or more pinhole views."""

    def __init__(self):
        pyrender = _import_pyrender()
        self._pyrender = pyrender
        self._material = pyrender.MetallicRoughnessMaterial(
            metallicFactor=0.0, roughnessFactor=0.7, alphaMode="OPAQUE", baseColorFactor=BASE_COLOR)
        # One scene for every call: the lights (added first, so they keep their order) and the camera stay,
        # the meshes are replaced per call.
        self._scene = _ordered_scene_class(pyrender)(bg_color=np.zeros(4), ambient_light=np.array(AMBIENT))
        for direction, intensity in LIGHTS:
            self._scene.add(pyrender.DirectionalLight(color=np.ones(3), intensity=intensity),
                            pose=_light_pose(direction))
        self._camera = pyrender.IntrinsicsCamera(1.0, 1.0, 0.0, 0.0, znear=ZNEAR, zfar=ZFAR)
        self._scene.add(self._camera, pose=np.eye(4))
        self._slots: list[tuple[np.ndarray, object]] = []        # (faces, scene node) per hand slot

    def render(self, meshes: Sequence[Mesh], views: Sequence[View], *, depth: bool = True) -> list[Rendering]:
        """Render ``meshes`` (camera-space vertices and faces) once per view, in the order given; ``depth=False``
        reads back the colour only (``Rendering.depth`` None), which saves the depth read-back."""
        return self.start(meshes, views, depth=depth).wait()

    def start(self, meshes: Sequence[Mesh | GLMesh], views: Sequence[View], *, depth: bool = True) -> PendingRender:
        """Like :meth:`render`, but return once the GL commands are issued: the GL driver draws meanwhile (Mesa's
        llvmpipe in its own threads, a GPU on its own), while the caller does other work; ``.wait()`` reads the
        images back. Call ``wait`` before the next ``start`` or ``render`` of the process (they share the GL
        context, the framebuffers and the meshes). Each view is drawn into a multisampled framebuffer of its own
        and flushed; the read-back resolves it as pyrender's own read does (same bytes, tested)."""
        meshes = [m if isinstance(m, GLMesh) else GLMesh.of(*m) for m in meshes]
        if len(views) > MAX_KEPT_FRAMEBUFFERS:          # more views than kept framebuffers: read back in groups
            step = MAX_KEPT_FRAMEBUFFERS
            return PendingRender([rendering for i in range(0, len(views), step)
                                  for rendering in self.start(meshes, views[i:i + step], depth=depth).wait()], depth)
        pyrender, scene = self._pyrender, self._scene
        used = []
        for mesh in meshes:
            node = next((n for f, n in self._slots if n not in used and np.array_equal(f, mesh.faces)), None)
            if node is None:
                primitive = pyrender.Primitive(positions=mesh.positions, normals=mesh.normals, indices=mesh.faces,
                                               material=self._material, mode=pyrender.constants.GLTF.TRIANGLES)
                node = scene.add(pyrender.Mesh([primitive]))
                self._slots.append((mesh.faces, node))
            else:
                _replace_vertices(node.mesh, mesh)
            used.append(node)
        for _, node in self._slots:
            node.mesh.is_visible = node in used
        scene.draw_in_order(used)
        scene._bounds = None                          # pyrender's cached scene bounds (used for shadows)
        offscreen = _offscreen(pyrender)
        if not offscreen._platform.supports_framebuffers():      # OSMesa: pyrender draws and reads at once
            return PendingRender([self._render_now(offscreen, view) for view in views], depth)
        from OpenGL import GL

        offscreen._platform.make_current()
        renderer, drawn = offscreen._renderer, []
        camera_vertices = np.concatenate([m.vertices for m in meshes]) if meshes else None
        for view in views:
            self._set_camera(view)
            size = (int(view.size[0]), int(view.size[1]))
            # a framebuffer per view of the call, so that no view is drawn over before it is read
            _select_framebuffer(offscreen, (*size, sum(d.size == size for d in drawn)))
            offscreen.viewport_width, offscreen.viewport_height = size
            # only the pixels the meshes can cover are cleared, drawn, resolved and read (the rest is background)
            region = covered_region(camera_vertices, view)
            renderer._read_main_framebuffer = lambda scene, flags: drawn.append(_Drawn.flush(renderer, region))
            GL.glEnable(GL.GL_SCISSOR_TEST)
            GL.glScissor(region[0], size[1] - region[3], region[2] - region[0], region[3] - region[1])
            try:
                offscreen.render(scene)
            finally:
                renderer.__dict__.pop("_read_main_framebuffer", None)
                GL.glDisable(GL.GL_SCISSOR_TEST)
        return PendingRender(drawn, depth)

    def _set_camera(self, view: View) -> None:
        (fx, _, cx), (_, fy, cy), _ = np.asarray(view.K, dtype=np.float64)
        self._camera.fx, self._camera.fy, self._camera.cx, self._camera.cy = fx, fy, cx + 0.5, cy + 0.5

    def _render_now(self, offscreen, view: View) -> Rendering:
        self._set_camera(view)
        offscreen.viewport_width, offscreen.viewport_height = (int(view.size[0]), int(view.size[1]))
        color, z = offscreen.render(self._scene)
        return Rendering(np.ascontiguousarray(color[..., :3], dtype=np.uint8), z.astype(np.float32))


class PendingRender:
    """The views of one :meth:`HandRenderer.start`; :meth:`wait` reads them back on its first call and returns them."""

    def __init__(self, views: list, depth: bool):
        self._views, self._depth = views, depth
        self._renderings: list[Rendering] | None = None

    def wait(self) -> list[Rendering]:
        if self._renderings is None:
            out = [view if isinstance(view, Rendering) else view.read(self._depth) for view in self._views]
            self._renderings = [r if self._depth else Rendering(r.color, None) for r in out]
        return self._renderings


@dataclass(frozen=True)
class _Drawn:
    """A view drawn into one of pyrender's multisampled framebuffers (``ms``), to be resolved into its
    single-sample companion (``fb``) and read back."""

    ms: int
    fb: int
    size: tuple[int, int]
    region: tuple[int, int, int, int]         # x0, y0, x1, y1: the pixels the meshes may cover, rows top first

    @classmethod
    def flush(cls, renderer, region: tuple[int, int, int, int]) -> _Drawn:
        """Stands in for pyrender's ``_read_main_framebuffer`` at the end of a render: instead of reading, flush,
        which sets the driver drawing (llvmpipe: in its own threads) while Python goes on."""
        from OpenGL import GL

        GL.glFlush()
        return cls(renderer._main_fb_ms, renderer._main_fb, tuple(renderer._main_fb_dims), region)

    def read(self, depth: bool) -> Rendering:
        """What pyrender's ``_read_main_framebuffer`` reads: colour resolved by a linear blit and, with ``depth``,
        the depth buffer (nearest sample) as camera Z in metres, 0 where empty, by pyrender's formula; rows top
        first. Only ``region`` is resolved and read: every pixel outside it is background (black, Z 0), as the
        view's framebuffer was cleared to it. Waits for the driver to finish drawing the view."""
        from OpenGL import GL

        width, height = self.size
        color = np.zeros((height, width, 3), dtype=np.uint8)
        z = np.zeros((height, width), dtype=np.float32) if depth else None
        x0, y0, x1, y1 = self.region
        if x1 <= x0 or y1 <= y0:
            return Rendering(color, z)
        w, h, gl_y0 = x1 - x0, y1 - y0, height - y1            # GL counts rows from the bottom
        _OFFSCREEN._platform.make_current()
        GL.glBindFramebuffer(GL.GL_READ_FRAMEBUFFER, self.ms)
        GL.glBindFramebuffer(GL.GL_DRAW_FRAMEBUFFER, self.fb)
        box = (x0, gl_y0, x1, gl_y0 + h)
        GL.glBlitFramebuffer(*box, *box, GL.GL_COLOR_BUFFER_BIT, GL.GL_LINEAR)
        if depth:
            GL.glBlitFramebuffer(*box, *box, GL.GL_DEPTH_BUFFER_BIT, GL.GL_NEAREST)
        GL.glBindFramebuffer(GL.GL_READ_FRAMEBUFFER, self.fb)
        data = GL.glReadPixels(x0, gl_y0, w, h, GL.GL_RGB, GL.GL_UNSIGNED_BYTE)
        color[y0:y1, x0:x1] = np.frombuffer(data, dtype=np.uint8).reshape(h, w, 3)[::-1]
        if depth:
            data = GL.glReadPixels(x0, gl_y0, w, h, GL.GL_DEPTH_COMPONENT, GL.GL_FLOAT)
            buffer = np.frombuffer(data, dtype=np.float32).reshape(h, w)[::-1]
            ndc = 2.0 * buffer - 1.0               # pyrender's linearisation, in float32 as pyrender computes it
            z[y0:y1, x0:x1] = np.where(buffer == 1.0, np.float32(0.0),
                                       (2.0 * ZNEAR * ZFAR) / (ZFAR + ZNEAR - ndc * (ZFAR - ZNEAR)))
        return Rendering(color, z)


def covered_region(vertices: np.ndarray | None, view: View, margin: int = 2) -> tuple[int, int, int, int]:
    """The pixels (x0, y0, x1, y1, exclusive ends, rows top first) that triangles on ``vertices`` (OpenCV camera
    space) can cover in ``view``: the box of the projected vertices, widened by ``margin`` pixels for rounding,
    within the image. A triangle lies in the box of its corners, so every pixel with a covered sample is inside.
    The whole image when a vertex is not in front of the near plane (clipping makes the projection meaningless)
    or not finite."""
    width, height = (int(s) for s in view.size)
    if vertices is None or not len(vertices):
        return 0, 0, 0, 0
    z = vertices[:, 2]
    if not np.all(z > ZNEAR * 1.001):
        return 0, 0, width, height
    (fx, _, cx), (_, fy, cy), _ = np.asarray(view.K, dtype=np.float64)     # the camera as _set_camera draws it
    u, v = fx * vertices[:, 0] / z + cx, fy * vertices[:, 1] / z + cy
    if not (np.isfinite(u).all() and np.isfinite(v).all()):
        return 0, 0, width, height
    # pixel c spans [c - 0.5, c + 0.5) (centres at integers)
    x0, x1 = math.floor(u.min() + 0.5) - margin, math.floor(u.max() + 0.5) + margin + 1
    y0, y1 = math.floor(v.min() + 0.5) - margin, math.floor(v.max() + 0.5) + margin + 1
    x0, x1, y0, y1 = max(x0, 0), min(x1, width), max(y0, 0), min(y1, height)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else (0, 0, 0, 0)


def smooth_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """The smooth vertex normals pyrender draws a trimesh with (``Trimesh.vertex_normals``: unit face normals
    from trimesh, degenerate faces left out, summed at each vertex weighted by the face's angle there, then
    unitised), without building a Trimesh and its caches. trimesh sums through a sparse matrix it builds per
    call; the same products are summed here in the same order with ``np.bincount`` (equal bits, tested)."""
    from trimesh import triangles, util

    corners = vertices[faces]
    normals, valid = triangles.normals(corners)
    angles = triangles.angles(corners)[valid]
    corner_vertex = faces[valid].ravel()
    summed = np.stack([np.bincount(corner_vertex, weights=angles.ravel() * np.repeat(normals[:, c], 3),
                                   minlength=len(vertices)) for c in range(3)], axis=1)
    return util.unitize(summed)


@dataclass(frozen=True)
class GLMesh:
    """A mesh as :meth:`HandRenderer.start` draws it: ``vertices`` (V, 3) float64 in OpenCV camera space, ``faces``
    wound outwards (:func:`oriented_faces`), ``positions`` and smooth ``normals`` (float32, as pyrender keeps them)
    in OpenGL camera space, and ``buffer``, the vertex data as pyrender uploads it (x, y, z, nx, ny, nz per
    vertex). ``start`` takes (vertices, faces) pairs too; a caller that builds these itself beforehand (while the
    driver draws something else) takes that work off the render call."""

    vertices: np.ndarray
    faces: np.ndarray
    positions: np.ndarray
    normals: np.ndarray
    buffer: np.ndarray

    @classmethod
    def of(cls, vertices: np.ndarray, faces: np.ndarray) -> GLMesh:
        vertices = np.asarray(vertices, dtype=np.float64)
        faces = oriented_faces(vertices, np.asarray(faces, dtype=np.int64))
        positions = vertices @ _CV_TO_GL.T
        normals = smooth_normals(positions, faces).astype(np.float32)
        positions = positions.astype(np.float32)
        return cls(vertices, faces, positions, normals, np.hstack((positions, normals)))


def _replace_vertices(mesh, new: GLMesh) -> None:
    """Give a one-primitive pyrender mesh the positions and normals of ``new``; when it is already in the GL
    context, overwrite its vertex buffer in place instead of deleting and re-creating its buffers."""
    from OpenGL import GL

    (primitive,) = mesh.primitives
    primitive.positions, primitive.normals = new.positions, new.normals
    mesh._bounds = None
    if primitive._in_context():
        _OFFSCREEN._platform.make_current()
        GL.glBindBuffer(GL.GL_ARRAY_BUFFER, primitive._buffers[0])
        GL.glBufferSubData(GL.GL_ARRAY_BUFFER, 0, new.buffer.nbytes, new.buffer)
        GL.glBindBuffer(GL.GL_ARRAY_BUFFER, 0)


_OFFSCREEN = None
_SCENE_CLASS = None
# pyrender.Renderer's framebuffer, as the attributes that hold it (pyrender 0.1.45, pinned in pyproject.toml).
_FRAMEBUFFER_ATTRS = ("_main_fb", "_main_cb", "_main_db", "_main_fb_ms", "_main_cb_ms", "_main_db_ms",
                      "_main_fb_dims")
_NO_FRAMEBUFFER = (None,) * 6 + ((None, None),)
MAX_KEPT_FRAMEBUFFERS = 6
_KEPT_FRAMEBUFFERS: dict[tuple[int, int, int], tuple] = {}     # (width, height, slot) -> framebuffer, not in use
_FRAMEBUFFER_KEY = "_handsynth_framebuffer"                   # attribute of pyrender's renderer: the key in use


def _select_framebuffer(offscreen, key: tuple[int, int, int]) -> None:
    """Put the framebuffer kept for ``key`` (width, height, slot) into pyrender's renderer, keeping the one in
    use for later.

    pyrender has one framebuffer and re-creates it whenever the viewport size changes (about 1/7 of a frame's
    rendering time when it alternates between two sizes). Instead, the framebuffer in use is set aside under its
    key, and the one of the key asked for is put back, or none, which pyrender then creates. Slots give views
    of the same size in one render their own framebuffers, so that no view is drawn over before it is read
    (:meth:`HandRenderer.start`). Up to MAX_KEPT_FRAMEBUFFERS are set aside; past that the one set aside
    longest ago is deleted (never one of the render in progress: a render has fewer views than that). Platforms
    without framebuffers (OSMesa) re-create their whole context on a size change and are left alone.
    """
    renderer = offscreen._renderer
    current = renderer.__dict__.get(_FRAMEBUFFER_KEY)
    if not offscreen._platform.supports_framebuffers() or (current == key and renderer._main_fb is not None):
        return
    if renderer._main_fb is not None:
        if current is None or tuple(renderer._main_fb_dims) != current[:2]:
            renderer._delete_main_framebuffer()       # made by a render that did not select one; not kept
        else:
            if len(_KEPT_FRAMEBUFFERS) >= MAX_KEPT_FRAMEBUFFERS:
                _delete_framebuffer(_KEPT_FRAMEBUFFERS.pop(next(iter(_KEPT_FRAMEBUFFERS))))
            _KEPT_FRAMEBUFFERS[current] = tuple(getattr(renderer, a) for a in _FRAMEBUFFER_ATTRS)
    for attr, value in zip(_FRAMEBUFFER_ATTRS, _KEPT_FRAMEBUFFERS.pop(key, _NO_FRAMEBUFFER)):
        setattr(renderer, attr, value)
    setattr(renderer, _FRAMEBUFFER_KEY, key)


def _delete_framebuffer(kept: tuple) -> None:
    """Delete the GL objects of a framebuffer set aside by :func:`_select_framebuffer` (as pyrender deletes its own)."""
    from OpenGL import GL

    fb, cb, db, fb_ms, cb_ms, db_ms, _ = kept
    GL.glDeleteFramebuffers(2, [fb, fb_ms])
    GL.glDeleteRenderbuffers(2, [cb, cb_ms])
    GL.glDeleteRenderbuffers(2, [db, db_ms])


def _ordered_scene_class(pyrender):
    """A pyrender.Scene whose meshes and lights iterate in the order they were added.

    pyrender keeps them in sets, which iterate in memory-address order that changes from run to
    run; the draw order of touching hands and the order in which the shader sums the lights would
    then change too, and with them a few pixels. Insertion order (or the order :meth:`draw_in_order`
    last gave) makes renders byte-identical. pyrender also forgets every node's cached path to the root
    whenever a node is added; in a tree that changes no other node's path, so the other paths are kept.
    """
    global _SCENE_CLASS
    if _SCENE_CLASS is None:
        class OrderedScene(pyrender.Scene):
            def add_node(self, node, parent_node=None):
                paths = self.__dict__.get("_path_cache", {})
                super().add_node(node, parent_node=parent_node)
                self._path_cache = paths
                added = self.__dict__.setdefault("_added", {})
                added.setdefault(node, next(self.__dict__.setdefault("_next_index", itertools.count())))

            def _remove_node(self, node):
                super()._remove_node(node)
                self.__dict__.get("_added", {}).pop(node, None)

            def _in_order(self, nodes):
                return sorted(nodes, key=self.__dict__.get("_added", {}).__getitem__)

            def draw_in_order(self, nodes):
                """Draw (and iterate) ``nodes`` after every other node, in the order given."""
                added, counter = self.__dict__["_added"], self.__dict__["_next_index"]
                for node in nodes:
                    added[node] = next(counter)

            @property
            def mesh_nodes(self):
                return self._in_order(self._mesh_nodes)

            @property
            def light_nodes(self):
                return self._in_order(self._point_light_nodes | self._spot_light_nodes
                                      | self._directional_light_nodes)

        _SCENE_CLASS = OrderedScene
    return _SCENE_CLASS


def _gl_unavailable(platform: str, exc: BaseException) -> MissingResourceError:
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return MissingResourceError(
        f"headless OpenGL through '{platform}' is not available on this machine: {reason}",
        where="HANDSYNTH_GL_PLATFORM / PYOPENGL_PLATFORM",
        fix="install the library (Debian/Ubuntu: apt-get install libegl1 libgl1-mesa-dri for egl, libosmesa6 for "
            "osmesa), or choose the other platform with HANDSYNTH_GL_PLATFORM=egl|osmesa; `handsynth doctor` "
            "checks it")


def _import_pyrender():
    """pyrender, imported with the configured GL platform; MissingResourceError when that library is missing."""
    platform = configure_platform()
    try:
        import pyrender
    except (ImportError, OSError, AttributeError) as exc:
        raise _gl_unavailable(platform, exc) from None
    return pyrender


def _offscreen(pyrender):
    """The process's one OffscreenRenderer (created on first use, deleted at exit)."""
    global _OFFSCREEN
    if _OFFSCREEN is None:
        import atexit

        try:
            _OFFSCREEN = pyrender.OffscreenRenderer(64, 64)
        except Exception as exc:  # noqa: BLE001 - each GL platform fails its own way (ImportError, RuntimeError, ...)
            raise _gl_unavailable(configure_platform(), exc) from None
        atexit.register(_release)
    return _OFFSCREEN


def max_render_size() -> int:
    """The largest image side this process's GL context can render (renderbuffer and viewport limits)."""
    _offscreen(_import_pyrender())         # creating the renderer makes its context current
    from OpenGL import GL

    return int(min(GL.glGetIntegerv(GL.GL_MAX_RENDERBUFFER_SIZE), *GL.glGetIntegerv(GL.GL_MAX_VIEWPORT_DIMS)))


def _release() -> None:
    global _OFFSCREEN
    if _OFFSCREEN is not None:
        try:
            _OFFSCREEN.delete()
        except Exception:  # noqa: BLE001 - at exit the display may already be gone; nothing to clean then
            pass
        _OFFSCREEN = None
        _KEPT_FRAMEBUFFERS.clear()                    # they belonged to the context just deleted


def depth_image(depth: np.ndarray) -> np.ndarray:
    """The depth-style RGB uint8 image of a Z buffer (camera Z in metres, 0 = no mesh).

    MiDaS-style relative inverse depth, as depth ControlNets were trained on: per mesh pixel the disparity
    d = 1/Z, normalised over THIS image's mesh pixels, t = (d - d_min) / (d_max - d_min), grey level
    rint(64 + 191 t): the nearest pixel 255, the farthest 64 (:data:`DEPTH_FAR_LEVEL`), every pixel
    without mesh 0 (black, infinitely far). A flat image (one depth) is 255. Grey in all three channels.
    """
    depth = np.asarray(depth, dtype=np.float64)
    mesh = depth > 0
    grey = np.zeros(depth.shape, dtype=np.uint8)
    if mesh.any():
        disparity = 1.0 / depth[mesh]
        near, far = disparity.max(), disparity.min()
        t = (disparity - far) / (near - far) if near > far else np.ones_like(disparity)
        grey[mesh] = np.rint(DEPTH_FAR_LEVEL + (255 - DEPTH_FAR_LEVEL) * t).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)

"""The pixel frame of every generated image: which part of the source frame it shows, at what size.

A recipe's ``image.fit`` chooses the generated frame of each sample from its source frame (W x H):

- ``crop`` (default): the largest square inside the source frame (side min(W, H)), centred on the union
  of the frame's hand boxes and clamped to the frame (its edges on source pixel edges), resized to
  ``image.size`` x ``image.size``;
- ``native``: the whole frame at its own aspect: long side ``image.size``, each side rounded to a
  multiple of 8 (SD's latent factor). The rounding changes the aspect a little; the scale is then
  raised to the smallest one whose resized source covers the rounded frame (at most a few pixels are
  cut at two opposite borders). The recorded map is that exact scale and offset;
- ``stretch``: the whole frame squashed into ``image.size`` x ``image.size`` (the public AttentionHand
  code's behaviour). It DISTORTS: x and y scale differ, so no camera with square pixels explains the
  image; it is recorded honestly, with one scale per axis.

The map from source pixels to generated pixels is ``p' = s * p + offset`` per axis (pixel centres at
integers on both sides, as render uses: a w x h image spans [-0.5, w - 0.5] x [-0.5, h - 0.5]); ``s``
is one number except for ``stretch``. The mesh image given to the model is cut and resampled with
exactly that map (:func:`resample`), and :func:`image_block` writes the labels of the generated image
in its own frame - the one place the per-image block that generate records and export ships is made::

    {"size": [W, H], "K": [[fx, 0, cx], [0, fy, cy], [0, 0, 1]],
     "from_source": {"scale": s, "offset": [ox, oy]},
     "hands": [{"side": "right" | "left", "joints_2d": [[u, v] x 21], "box": [x0, y0, x1, y1]}]}

``K`` = A @ K_source with A = [[s, 0, ox], [0, s, oy], [0, 0, 1]], so K maps render's camera-space
``joints_cam`` onto ``joints_2d``. ``hands`` follows the render label's hands (same order); joints and
boxes are NOT clipped to the image (a hand may reach past the border). The local image's block maps
source pixels onto the generated local image (render's square crop box, resized to ``image.size``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

FITS = ("crop", "native", "stretch")
SIDE_MULTIPLE = 8           # generated sides are multiples of SD's VAE factor


@dataclass(frozen=True)
class FrameMap:
    """Source pixels -> pixels of a ``size`` (W, H) frame: ``p' = scale * p + offset`` per axis."""

    size: tuple[int, int]
    scale: tuple[float, float]
    offset: tuple[float, float]

    @property
    def uniform(self) -> bool:
        return self.scale[0] == self.scale[1]

    def matrix(self) -> np.ndarray:
        """The 3x3 pixel map A (homogeneous): K_frame = A @ K_source."""
        (sx, sy), (ox, oy) = self.scale, self.offset
        return np.array([[sx, 0.0, ox], [0.0, sy, oy], [0.0, 0.0, 1.0]])

    def apply(self, points: Any) -> np.ndarray:
        """Map (..., 2) source pixel coordinates into this frame."""
        return np.asarray(points, dtype=np.float64) * np.asarray(self.scale) + np.asarray(self.offset)

    def source_box(self) -> np.ndarray:
        """The region of the source (x0, y0, x1, y1, pixel-centre coordinates) the frame shows: the
        inverse map of the frame's edges (-0.5 and W - 0.5, -0.5 and H - 0.5)."""
        lo = (np.array([-0.5, -0.5]) - self.offset) / np.asarray(self.scale)
        hi = (np.asarray(self.size, dtype=np.float64) - 0.5 - self.offset) / np.asarray(self.scale)
        return np.concatenate([lo, hi])

    def record(self) -> dict[str, Any]:
        """``from_source`` as recorded: one scale when uniform, [sx, sy] (stretch) otherwise."""
        scale = self.scale[0] if self.uniform else list(self.scale)
        return {"scale": scale, "offset": list(self.offset)}


def resize_map(source_size: Sequence[int], size: Sequence[int]) -> FrameMap:
    """The whole ``source_size`` image resized to ``size``: s = size / source_size per axis,
    offset = s / 2 - 1/2 (edges onto edges, pixel centres at integers)."""
    sx, sy = (float(n) / float(m) for n, m in zip(size, source_size))
    return FrameMap((int(size[0]), int(size[1])), (sx, sy), (0.5 * sx - 0.5, 0.5 * sy - 0.5))


def crop_map(source_size: Sequence[int], hand_boxes: Sequence[Sequence[float]], size: int) -> FrameMap:
    """``fit: crop``: the largest square of the source frame about the hands, resized to ``size``."""
    W, H = (int(v) for v in source_size)
    side = min(W, H)
    dims = np.array([W, H], dtype=np.float64)
    if len(hand_boxes):
        boxes = np.asarray(hand_boxes, dtype=np.float64).reshape(-1, 4)
        lo = np.clip(boxes[:, :2].min(axis=0) + 0.5, 0.0, dims)      # pixel-edge coordinates, in the frame
        hi = np.clip(boxes[:, 2:].max(axis=0) + 0.5, 0.0, dims)
        centre = (lo + hi) / 2.0
    else:
        centre = dims / 2.0
    start = [min(max(math.floor(c - side / 2.0 + 0.5), 0), int(d) - side) for c, d in zip(centre, dims)]
    s = float(size) / side
    return FrameMap((size, size), (s, s), (s * (0.5 - start[0]) - 0.5, s * (0.5 - start[1]) - 0.5))


def native_map(source_size: Sequence[int], size: int) -> FrameMap:
    """``fit: native``: the whole frame, long side ``size``, sides rounded to multiples of 8 (see the
    module docstring); one scale, the source centred in the rounded frame."""
    W, H = (float(v) for v in source_size)
    first = size / max(W, H)
    frame = [max(SIDE_MULTIPLE, SIDE_MULTIPLE * math.floor(n * first / SIDE_MULTIPLE + 0.5)) for n in (W, H)]
    s = max(frame[0] / W, frame[1] / H)
    offset = [0.5 * s - 0.5 + (f - n * s) / 2.0 for f, n in zip(frame, (W, H))]
    return FrameMap((frame[0], frame[1]), (s, s), (offset[0], offset[1]))


def global_map(fit: str, source_size: Sequence[int], hand_boxes: Sequence[Sequence[float]], size: int) -> FrameMap:
    """The generated image's map for ``fit`` (see :data:`FITS`)."""
    if fit == "crop":
        return crop_map(source_size, hand_boxes, size)
    if fit == "native":
        return native_map(source_size, size)
    if fit == "stretch":
        return resize_map(source_size, (size, size))
    raise ValueError(f"unknown image.fit {fit!r}; use one of {FITS}")


def local_map(crop_box: Sequence[float], size: int) -> FrameMap:
    """Source pixels -> the generated local image: render's square crop box (its edges onto the image's
    edges, as :func:`handsynth.render.geometry.crop_intrinsics`) at ``size`` x ``size``."""
    x0, y0, x1, y1 = (float(v) for v in crop_box)
    s = float(size) / (x1 - x0)
    return FrameMap((size, size), (s, s), (-s * x0 - 0.5, -s * y0 - 0.5))


def frame_of(block: dict[str, Any]) -> FrameMap:
    """The map an image block records (its ``size`` and ``from_source``)."""
    scale, offset = block["from_source"]["scale"], block["from_source"]["offset"]
    sx, sy = (scale, scale) if isinstance(scale, (int, float)) else scale
    return FrameMap((int(block["size"][0]), int(block["size"][1])), (float(sx), float(sy)),
                    (float(offset[0]), float(offset[1])))


def intrinsics(camera: dict[str, Any]) -> np.ndarray:
    """K (3, 3) of a render label's ``camera`` (focal, princpt)."""
    (fx, fy), (cx, cy) = camera["focal"], camera["princpt"]
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=np.float64)


def image_block(frame: FrameMap, K: np.ndarray | None, hands: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The labels of an image in its own pixel frame (the block recorded by generate, shipped by export).

    ``K``: the source camera's intrinsics (None when the source has no camera); ``hands``: render label
    hands (side, joints_2d, box in source pixels)."""
    out_hands = []
    for hand in hands:
        box = np.asarray(hand["box"], dtype=np.float64).reshape(2, 2)
        out_hands.append({"side": hand["side"], "joints_2d": frame.apply(hand["joints_2d"]).tolist(),
                          "box": frame.apply(box).reshape(4).tolist()})
    return {"size": list(frame.size), "K": None if K is None else (frame.matrix() @ K).tolist(),
            "from_source": frame.record(), "hands": out_hands}


@dataclass(frozen=True)
class SampleFrames:
    """The frames of one sample: the generated image (``image``, its block ``image_block``), and with a
    local mesh image the generated local image (``local``, ``local_block``) plus ``local_mesh``: the map
    from render's local mesh image onto the generated local image."""

    image: FrameMap
    image_block: dict[str, Any]
    local: FrameMap | None = None
    local_block: dict[str, Any] | None = None
    local_mesh: FrameMap | None = None


def sample_frames(label: dict[str, Any] | None, fit: str, size: int, source_size: Sequence[int],
                  local: bool) -> SampleFrames:
    """The frames of a sample whose source frame is ``source_size`` and whose render label is ``label``
    (None for inputs without labels: no camera, no hands, a crop about the frame's centre). ``local``:
    whether a local image is generated (it needs the label's crop box and local camera)."""
    if label is None:
        frame = global_map(fit, source_size, [], size)
        return SampleFrames(frame, image_block(frame, None, []))
    hands, K = label["hands"], intrinsics(label["camera"])
    frame = global_map(fit, label["image_size"], [h["box"] for h in hands], size)
    if not local:
        return SampleFrames(frame, image_block(frame, K, hands))
    local_frame = local_map(label["crop_box"], size)
    return SampleFrames(frame, image_block(frame, K, hands), local_frame, image_block(local_frame, K, hands),
                        resize_map(label["local_camera"]["size"], (size, size)))


def resample(image, frame: FrameMap, resample: int | None = None):
    """Cut and resample a PIL image given in the map's source frame into ``frame`` (exactly the map:
    output pixel centre i shows source point (i - offset) / scale). Lanczos by default, as diffusers
    resizes conditioning images."""
    from PIL import Image

    box = frame.source_box() + 0.5                              # PIL measures from pixel edges
    limit = np.array([*image.size, *image.size], dtype=np.float64)
    if np.any(box < -1e-6) or np.any(box > limit + 1e-6):
        raise ValueError(f"the frame {frame} reaches outside the {image.size[0]}x{image.size[1]} image")
    box = np.clip(box, 0.0, limit)
    method = Image.Resampling.LANCZOS if resample is None else resample
    return image.resize(frame.size, method, box=tuple(float(v) for v in box))

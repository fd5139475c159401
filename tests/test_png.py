"""The render stage's PNG encoder: every reader gets the exact pixels back; same pixels, same bytes."""

import io
import zlib

import numpy as np
import pytest
from PIL import Image

from handsynth.render.png import encode_png


def _mesh_like(height=48, width=64, seed=0):
    """Mostly black with a shaded blob, plus a few random pixels (filter wrap-around modulo 256)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    blob = np.clip(255 - 3 * np.hypot(yy - 20, xx - 30), 0, 255)
    image = np.where((blob > 0)[..., None], blob[..., None] * [1.0, 1.0, 0.9], 0).astype(np.uint8)
    image[rng.integers(0, height, 20), rng.integers(0, width, 20)] = rng.integers(0, 256, (20, 3))
    return image


@pytest.mark.parametrize("shape", [(48, 64), (1, 1), (1, 7), (9, 1), (31, 17)])
def test_pillow_decodes_the_same_pixels(shape):
    image = _mesh_like(*shape) if shape == (48, 64) else \
        np.random.default_rng(1).integers(0, 256, (*shape, 3), dtype=np.uint8)
    data = encode_png(image)
    with Image.open(io.BytesIO(data)) as decoded:
        assert decoded.format == "PNG" and decoded.mode == "RGB" and decoded.size == shape[::-1]
        assert not decoded.info                     # no metadata chunks
        np.testing.assert_array_equal(np.asarray(decoded), image)


def test_bytes_depend_only_on_the_pixels():
    image = _mesh_like()
    assert encode_png(image) == encode_png(image.copy()) == encode_png(np.asfortranarray(image))
    other = image.copy()
    other[0, 0, 0] ^= 1
    assert encode_png(other) != encode_png(image)


def test_mostly_black_images_compress_well():
    image = np.zeros((480, 640, 3), dtype=np.uint8)
    image[200:260, 300:360] = _mesh_like(60, 60)
    data = encode_png(image)
    assert len(data) < 0.02 * image.nbytes
    # the stored stream is the Up-filtered rows (filter byte 2 on each row)
    idat = data[data.index(b"IDAT") + 4:data.index(b"IEND") - 8]
    rows = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(480, 640 * 3 + 1)
    assert (rows[:, 0] == 2).all()


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8),
                                 np.zeros((4, 4, 3), np.float32)])
def test_other_arrays_are_refused(bad):
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        encode_png(bad)

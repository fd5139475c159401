"""Fast, deterministic PNG encoding of rendered images (mostly black, smoothly shaded).

Pillow chooses a PNG filter per row by trying all five, which costs about 15 ms per 640x480 RGB image
- more than rendering it on a GPU. Mesh and depth images are mostly black with smooth shading, so one
fixed filter does as well: every row is stored with the "Up" filter (difference to the row above, which
is zero on black rows and small on shaded ones) and deflated with the run-length strategy by zlib-ng
(python-zlib-ng, zlib's API over the SIMD rewrite of zlib), which on a rendered 640x480 mesh image is about
3.5x faster than the standard library's zlib with the same strategy, at the same size. Together that is about
8x faster than Pillow at ``compress_level=1`` (0.8 vs 7 ms) and gives about 20% smaller files. The file is a
plain 8-bit RGB PNG (IHDR, one IDAT, IEND; no metadata), so every PNG reader decodes exactly the pixels given,
and the same pixels always give the same bytes with the same zlib-ng build.
"""

from __future__ import annotations

import struct

import numpy as np
from zlib_ng import zlib_ng

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_FILTER_UP = 2
_ZLIB_LEVEL = 6                  # with Z_RLE the level barely changes speed or size; 6 is zlib's default


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib_ng.crc32(kind + data))


def encode_png(color: np.ndarray) -> bytes:
    """PNG bytes of an RGB uint8 image (H, W, 3): fixed options, no metadata (byte-identical reruns)."""
    color = np.ascontiguousarray(color)
    if color.dtype != np.uint8 or color.ndim != 3 or color.shape[2] != 3:
        raise ValueError(f"encode_png needs an (H, W, 3) uint8 image, got {color.dtype} {color.shape}")
    height, width = color.shape[:2]
    rows = color.reshape(height, width * 3)
    filtered = np.empty((height, width * 3 + 1), dtype=np.uint8)
    filtered[:, 0] = _FILTER_UP
    filtered[0, 1:] = rows[0]                          # the row above the first is taken as zeros
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])   # modulo 256, as PNG defines it
    deflate = zlib_ng.compressobj(_ZLIB_LEVEL, zlib_ng.DEFLATED, zlib_ng.MAX_WBITS, 9, zlib_ng.Z_RLE)
    idat = deflate.compress(filtered) + deflate.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)   # 8-bit RGB, deflate, filter method 0, no interlace
    return _SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")

"""InceptionV3 for FID/KID, with the weights read from a local file.

The network is the "FID Inception" (the TensorFlow 2015-12-05 graph that FID and KID are defined on,
as torch-fidelity, pytorch-fid and torchmetrics use it): torchvision-style InceptionV3 blocks with
batch-norm eps 0.001, average pools that leave the padding out of the mean, a max pool in the last
block's pool branch and a 1008-way fc layer (unused: features are the 2048 pool3 activations).
torchmetrics reaches this network through torch-fidelity, which imports torchvision; PyPI's
torchvision does not import beside the CPU build of torch, so the network is defined here and handed
to torchmetrics' FID/KID as a custom feature extractor.

Weights: torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (a plain state dict; the same
tensors as pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``), read with
``torch.load(weights_only=True)`` - nothing in the file is executed.

Resize (FID values depend on it): images arrive as uint8 RGB (N, 3, H, W); they are resized to
299 x 299 with ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False,
antialias=True)`` in float32 and mapped to [-1, 1) by (x - 128) / 128: torchmetrics' default for its
FID/KID (``antialias=True``). The original TensorFlow code (torch-fidelity's default) resizes without
antialiasing, which gives different values for images far from 299 px.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from handsynth.errors import InputError, MissingResourceError

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
INPUT_SIZE = 299
NUM_FEATURES = 2048
RESIZE = ("torch.nn.functional.interpolate to 299x299, bilinear, align_corners=False, antialias=True, float32; "
          "then (x - 128) / 128 (torchmetrics' FID/KID default)")


class _Conv(nn.Module):
    """Conv (no bias) + batch norm (eps 0.001) + ReLU; parameter names as in the weights file."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _BlockA(nn.Module):          # Mixed_5b..5d: 35x35
    def __init__(self, cin: int, pool: int):
        super().__init__()
        self.branch1x1 = _Conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = _Conv(cin, 48, 1), _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = _Conv(64, 96, 3, padding=1), _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(cin, pool, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg3(x))], 1)


class _BlockB(nn.Module):          # Mixed_6a: 35x35 -> 17x17
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = _Conv(64, 96, 3, padding=1), _Conv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class _BlockC(nn.Module):          # Mixed_6b..6e: 17x17 with factorised 7x7 convolutions
    def __init__(self, cin: int, c7: int):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = _Conv(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2, self.branch7x7_3 = _Conv(cin, c7, 1), _Conv(c7, c7, **row), \
            _Conv(c7, 192, **col)
        self.branch7x7dbl_1 = _Conv(cin, c7, 1)
        self.branch7x7dbl_2, self.branch7x7dbl_3 = _Conv(c7, c7, **col), _Conv(c7, c7, **row)
        self.branch7x7dbl_4, self.branch7x7dbl_5 = _Conv(c7, c7, **col), _Conv(c7, 192, **row)
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x):
        dbl = x
        for k in range(1, 6):
            dbl = getattr(self, f"branch7x7dbl_{k}")(dbl)
        return torch.cat([self.branch1x1(x), self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))), dbl,
                          self.branch_pool(_avg3(x))], 1)


class _BlockD(nn.Module):          # Mixed_7a: 17x17 -> 8x8
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = _Conv(cin, 192, 1), _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _Conv(cin, 192, 1)
        self.branch7x7x3_2 = _Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, 3, stride=2)

    def forward(self, x):
        b = x
        for k in range(1, 5):
            b = getattr(self, f"branch7x7x3_{k}")(b)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b, F.max_pool2d(x, 3, stride=2)], 1)


class _BlockE(nn.Module):          # Mixed_7b (average pool) and Mixed_7c (max pool, as in the FID graph)
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        self.branch1x1 = _Conv(cin, 320, 1)
        self.branch3x3_1 = _Conv(cin, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = _Conv(384, 384, **row), _Conv(384, 384, **col)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = _Conv(cin, 448, 1), _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = _Conv(384, 384, **row), _Conv(384, 384, **col)
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """uint8 RGB images (N, 3, H, W) -> 2048 pool3 features (N, 2048) float32; always in eval mode.

    ``num_features`` tells torchmetrics' FID/KID the feature size (their custom-extractor interface).
    """

    num_features = NUM_FEATURES

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _BlockA(192, 32), _BlockA(256, 64), _BlockA(288, 64)
        self.Mixed_6a = _BlockB(288)
        self.Mixed_6b, self.Mixed_6c = _BlockC(768, 128), _BlockC(768, 160)
        self.Mixed_6d, self.Mixed_6e = _BlockC(768, 160), _BlockC(768, 192)
        self.Mixed_7a = _BlockD(768)
        self.Mixed_7b, self.Mixed_7c = _BlockE(1280, max_pool=False), _BlockE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)     # part of the weights file; not used for features
        self.eval()

    def train(self, mode: bool = True) -> "FIDInceptionV3":
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError("FIDInceptionV3 expects uint8 RGB images shaped (N, 3, H, W)")
        x = F.interpolate(images.float(), size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False,
                          antialias=True)
        x = (x - 128.0) / 128.0
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def cache_path() -> Path:
    """Where torch-fidelity / torchmetrics keep the weights after a download: torch hub's checkpoints folder."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def find_weights(path: str | Path | None = None) -> Path | None:
    """The weights file to use: ``path`` (must exist), else the library cache's copy, else None."""
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise MissingResourceError(f"the Inception weights file {path} does not exist", where="--inception",
                                       fix=weights_hint())
        return path
    cached = cache_path()
    return cached if cached.is_file() else None


def weights_hint() -> str:
    """How to provide the weights, for errors, warnings and `handsynth doctor`."""
    return (f"download {INCEPTION_FILE} (torch-fidelity's InceptionV3 for FID, 95 MB) from {INCEPTION_URL} on a "
            f"machine with internet and put it at {cache_path()} (torch hub's cache; TORCH_HOME moves it), or pass "
            f"--inception PATH")


def load_inception(path: str | Path, device: str | torch.device = "cpu") -> FIDInceptionV3:
    """The FID InceptionV3 with the weights in ``path`` (a state dict saved by torch.save)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refused, truncated file, not a torch file
        raise InputError(f"cannot read the Inception weights: {type(exc).__name__}: {str(exc)[:200]}", where=path,
                         fix=weights_hint()) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    model = FIDInceptionV3()
    if not isinstance(state, dict):
        raise InputError("the Inception weights file holds no state dict", where=path, fix=weights_hint())
    expected = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    given = {k for k in state if not k.endswith("num_batches_tracked")}
    if expected != given:
        missing, extra = sorted(expected - given), sorted(given - expected)
        raise InputError(f"the file is not the FID InceptionV3's weights ({len(missing)} tensors missing, e.g. "
                         f"{missing[:2]}; {len(extra)} unexpected, e.g. {extra[:2]})", where=path, fix=weights_hint())
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise InputError(f"the Inception weights have wrong shapes: {str(exc)[:200]}", where=path,
                         fix=weights_hint()) from None
    return model.to(device)

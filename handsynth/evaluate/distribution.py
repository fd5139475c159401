"""FID and KID between two sets of features, computed by torchmetrics.

Features come from any extractor with torchmetrics' custom-feature interface (a module mapping uint8
images (N, 3, H, W) to (N, F) with a ``num_features`` attribute): the FID InceptionV3 for real runs,
a small random network in tests. They are extracted once per image (and cached by the evaluation),
then handed to torchmetrics' FrechetInceptionDistance and KernelInceptionDistance through a
pass-through module, so FID and KID share one forward pass.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000      # torchmetrics' default; lowered to the smaller set's size for small sets
KID_SEED = 0                # KID draws random subsets: a fixed seed makes reruns give the same value
FEED = 4096                 # features handed to torchmetrics per update call
BATCH = 32                  # images per extractor call


class _Features(nn.Module):
    """Pass-through 'extractor': the inputs already are features."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def extract(extractor: nn.Module, images: list[np.ndarray], device: str | torch.device = "cpu") -> np.ndarray:
    """Features (N, F) float32 of uint8 RGB images (H, W, 3); images of one size run in batches of BATCH."""
    out = np.zeros((len(images), int(extractor.num_features)), dtype=np.float32)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        by_shape.setdefault(image.shape, []).append(i)
    with torch.no_grad():
        for same in by_shape.values():
            for start in range(0, len(same), BATCH):
                indices = same[start:start + BATCH]
                batch = torch.from_numpy(np.stack([images[i] for i in indices])).permute(0, 3, 1, 2).to(device)
                out[indices] = extractor(batch).float().cpu().numpy()
    return out


def fid_kid(real: np.ndarray, fake: np.ndarray, *, subsets: int = KID_SUBSETS,
            subset_size: int = KID_SUBSET_SIZE, seed: int = KID_SEED) -> dict[str, Any]:
    """FID and KID (mean, std over ``subsets`` random subsets, polynomial kernel of degree 3) of two
    feature sets (N, F); the subset size is lowered to the smaller set's size. Needs >= 2 per set."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = np.asarray(real, dtype=np.float32), np.asarray(fake, dtype=np.float32)
    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"FID/KID need at least 2 images per set (got {len(real)} real, {len(fake)} generated)")
    size = min(subset_size, len(real), len(fake))
    features = _Features(real.shape[1])
    fid = FrechetInceptionDistance(feature=features)
    with warnings.catch_warnings():     # "KID keeps all features in memory": the caller holds them anyway
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=features, subsets=subsets, subset_size=size)
    for metric in (fid, kid):
        for flag, data in ((True, real), (False, fake)):
            for start in range(0, len(data), FEED):
                metric.update(torch.from_numpy(data[start:start + FEED]), real=flag)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std),
            "n_real": int(len(real)), "n_generated": int(len(fake)), "kid_subsets": subsets,
            "kid_subset_size": size}

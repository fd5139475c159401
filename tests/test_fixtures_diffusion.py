"""The tiny SD folder loads back through diffusers' real loading code and generates deterministically."""

import torch
from diffusers import StableDiffusionPipeline


def test_tiny_sd_roundtrip(tiny_sd_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    assert (tiny_sd_dir / "model_index.json").exists()
    kwargs = dict(num_inference_steps=2, height=64, width=64, output_type="np")
    a = pipe("a hand", generator=torch.Generator().manual_seed(0), **kwargs).images
    b = pipe("a hand", generator=torch.Generator().manual_seed(0), **kwargs).images
    c = pipe("a hand", generator=torch.Generator().manual_seed(1), **kwargs).images
    assert a.shape == (1, 64, 64, 3)
    assert (a == b).all() and not (a == c).all()

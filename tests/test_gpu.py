"""GPU checks of the model (run with `pytest -m gpu` on a CUDA machine; deselected elsewhere).

They cover what CPU tests cannot: half precision with PyTorch SDPA on CUDA, with TAS on (the same test
body passes on the CPU in fp16/bf16).
"""

import numpy as np
import pytest

from tests.fixtures.attentionhand_pipeline import make_pipeline, mesh_images

import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _run(pipe, device, tas):
    gens = [torch.Generator(device).manual_seed(s) for s in (0, 1)]
    out = pipe(["a woman holding a cup with her hand", "a man waving his hand"], mesh_images(2),
               hand_token_indices=[[3, 8], [3, 5]], generator=gens, num_inference_steps=3, tas=tas,
               output_type="np", return_attention=True)
    return out.images, out.attention_maps


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_with_tas_on_cuda_matches_fp32(clip_tokenizer_dir, dtype):
    from handsynth.attentionhand.tas import TASConfig

    tas = TASConfig(max_steps=2, iterations=2, step_size_start=20.0, step_size_end=10.0)
    reference = make_pipeline(clip_tokenizer_dir).to("cuda")
    half = make_pipeline(clip_tokenizer_dir).to("cuda", getattr(torch, dtype))
    ref_images, ref_maps = _run(reference, "cuda", tas)
    images, maps = _run(half, "cuda", tas)
    assert np.isfinite(images).all() and all(torch.isfinite(m).all() for m in maps)
    assert np.abs(images - ref_images).mean() < 0.03
    assert all(m.shape == r.shape for m, r in zip(maps, ref_maps))

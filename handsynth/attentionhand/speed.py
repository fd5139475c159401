"""Optional speed settings of a loaded pipeline (GPU options; all off by default).

Each one is measured by ``benchmarks/generate.py --mode scale`` (flags of the same names) and stays off
until it pays on the GPU at hand:

- ``channels_last``: the UNet, guidance module and VAE in NHWC memory format (cuDNN's preferred layout
  for fp16/bf16 convolutions);
- ``vae_dtype``: decode with the VAE in another dtype (e.g. bf16: fp16's range can overflow in SD's VAE;
  latents are cast to the VAE's dtype by the pipeline);
- ``fuse_qkv``: one matmul for the query, key and value projections of self-attention (diffusers'
  ``fuse_qkv_projections``; only with TAS off, as TAS installs its own attention processors);
- ``compile``: ``torch.compile`` of the UNet and the guidance module (first batches slow while it compiles).

Scaled dot-product attention (``F.scaled_dot_product_attention``) is diffusers' default processor with
torch 2, so there is no switch for it.
"""

from __future__ import annotations

import torch


def apply(pipe, *, channels_last: bool = False, vae_dtype: torch.dtype | None = None, fuse_qkv: bool = False,
          compile: bool = False):
    """Apply the chosen settings to ``pipe`` in place; returns it."""
    modules = [m for m in (pipe.unet, pipe.controlnet, pipe.vae) if m is not None]
    if channels_last:
        for module in modules:
            module.to(memory_format=torch.channels_last)
    if vae_dtype is not None:
        pipe.vae.to(dtype=vae_dtype)
    if fuse_qkv:
        for module in (pipe.unet, pipe.controlnet):
            if module is not None:
                module.fuse_qkv_projections()
    if compile:
        pipe.unet = torch.compile(pipe.unet)
        if pipe.controlnet is not None:
            pipe.controlnet = torch.compile(pipe.controlnet)
    return pipe

"""The guidance module (AttentionHand's VAS phi_g): a ControlNet initialised from the SD UNet.

It is a plain diffusers ``ControlNetModel``: a trainable copy of the UNet's encoder and middle block,
a hint encoder for the 3-channel mesh image (values in [0, 1]), and zero-initialised 1x1 output
convolutions, so a fresh module adds exactly zero to the UNet. One module serves both the global and
the local branch. It saves and loads with ``save_pretrained`` / ``ControlNetModel.from_pretrained``.
"""

from __future__ import annotations

import math

import torch

MESH_CHANNELS = 3
# Hint-encoder widths of SD1.5's ControlNet: three stride-2 stages take 512x512 to the 64x64 latent.
HINT_CHANNELS = (16, 32, 96, 256)


def build_guidance_module(unet, vae_scale_factor: int = 8):
    """A fresh ``ControlNetModel`` copying ``unet``'s encoder and middle block (zero-output residuals).

    ``vae_scale_factor`` (image pixels per latent pixel, a power of two; SD1.5: 8) sets how many
    stride-2 stages the mesh-image hint encoder has. The module gets the UNet's dtype and device.
    """
    stages = int(math.log2(vae_scale_factor))
    if 2**stages != vae_scale_factor or not 1 <= stages < len(HINT_CHANNELS):
        raise ValueError(f"vae_scale_factor must be 2, 4 or 8, not {vae_scale_factor}")
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(unet, conditioning_channels=MESH_CHANNELS,
                                           conditioning_embedding_out_channels=HINT_CHANNELS[: stages + 1])
    controlnet.to(unet.device)
    return controlnet if unet.dtype == controlnet.dtype else controlnet.to(dtype=unet.dtype)


def freeze(*modules: torch.nn.Module) -> None:
    """Put modules in eval mode and stop their parameters from receiving gradients (UNet, VAE, text encoder)."""
    for module in modules:
        module.eval()
        module.requires_grad_(False)


def residuals_are_zero(controlnet) -> bool:
    """True when every output convolution of the guidance module is all zeros (a fresh, untrained module)."""
    outputs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
    return all(not p.any() for block in outputs for p in block.parameters())

"""AttentionHandPipeline: Stable Diffusion 1.5 + the mesh-image guidance module + TAS, as a diffusers pipeline.

Components (``register_modules``; ``save_pretrained`` / ``AttentionHandPipeline.from_pretrained`` work on
the whole folder): ``vae``, ``text_encoder``, ``tokenizer``, ``unet``, ``controlnet`` (the guidance
module, one for both branches: any SD1.5 ``ControlNetModel``, or None for plain Stable Diffusion - the
mesh images are then not used), ``scheduler``.

Sampling follows the public AttentionHand inference (DDIM, 20 steps, eta 0, guidance 9.0, control
strength 1.0 on all residuals) and diffusers' ControlNet pipeline conventions: the mesh image is
resized to (height, width), RGB, values in [0, 1], and is given to BOTH classifier-free-guidance
branches (the unconditional branch keeps the mesh, prompt ""). The global and the optional local branch
run as one batch through the guidance module and the UNet, rows ordered
``[uncond global | uncond local | cond global | cond local]``. With a fresh (zero-output) guidance module
and TAS off, or with no guidance module (``controlnet=None``), the images equal
``StableDiffusionPipeline``'s for the same components and generators. TAS reads the UNet's cross-attention,
so it works the same with any guidance module or none; by default (``tas.maps_from: unet``) from a UNet pass
without the guidance residuals, as paper and public code.

Randomness: each sample's initial latent comes from its own ``torch.Generator`` (``generator[i]``), so a
batch equals single runs. The local branch's latent comes from ``local_generator[i]`` if given, otherwise
from ``generator[i]`` drawn right after the global latent (the global image is then the same with or
without the local branch).

Precision: pass components already cast (``torch_dtype`` at loading); latents and text embeddings take
the UNet's dtype. TAS gradients are computed in that dtype (float16 with loss scaling, see
``tas.FP16_LOSS_SCALE``) and applied in float32; attention probabilities are float32.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from handsynth.attentionhand.tas import (AttentionStore, TASConfig, attention_pass, check_token_indices, refine,
                                         step_sizes, tas_processors, tas_update)


@dataclass
class AttentionHandOutput(BaseOutput):
    """``images``: global images; ``local_images``: local-branch images (None without a local mesh);
    ``attention_maps``: with ``return_attention``, one float32 tensor (K_i, h, w) per sample - the refined
    maps of its hand tokens in the global branch (latent grid at ``tas.attention_res`` rows), computed from
    the cross-attention averaged over all denoising steps."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    local_images: list[PIL.Image.Image] | np.ndarray | torch.Tensor | None = None
    attention_maps: list[torch.Tensor] | None = None


MeshImage = PIL.Image.Image | np.ndarray | torch.Tensor


class AttentionHandPipeline(DiffusionPipeline):
    """Text + hand-mesh-image to image generation (AttentionHand), optionally with TAS at inference."""

    model_cpu_offload_seq = "text_encoder->controlnet->unet->vae"

    def __init__(self, vae, text_encoder, tokenizer, unet, controlnet, scheduler):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                              controlnet=controlnet, scheduler=scheduler)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.mesh_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_convert_rgb=True,
                                                do_normalize=False)

    # ----------------------------------------------------------------------------------------------
    # Inputs

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP text embeddings (B, 77, D) in the UNet's dtype; prompts longer than 77 tokens are truncated."""
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        embeds = self.text_encoder(ids.to(self._execution_device))[0]
        return embeds.to(dtype=self.unet.dtype)

    def prepare_mesh_images(self, images: Sequence[MeshImage], height: int, width: int) -> torch.Tensor:
        """Mesh images -> (B, 3, height, width) in [0, 1], the guidance module's dtype and device.

        Accepts PIL images, uint8 arrays (H, W[, C]), float arrays (H, W, C) in [0, 1] and float tensors
        (C, H, W) in [0, 1]; grey images become 3 identical channels.
        """
        batch = []
        for image in images:
            if isinstance(image, np.ndarray) and image.dtype == np.uint8:
                image = PIL.Image.fromarray(image)
            elif isinstance(image, (np.ndarray, torch.Tensor)) and (image.min() < 0 or image.max() > 1):
                raise ValueError("float mesh images must hold values in [0, 1]; pass uint8 arrays or PIL images "
                                 "for 0..255 data")
            tensor = self.mesh_processor.preprocess(image, height=height, width=width)
            batch.append(tensor.expand(-1, 3, -1, -1) if tensor.shape[1] == 1 else tensor)
        dtype = (self.controlnet or self.unet).dtype
        return torch.cat(batch).to(device=self._execution_device, dtype=dtype)

    def prepare_latents(self, batch: int, height: int, width: int, generator) -> torch.Tensor:
        shape = (batch, self.unet.config.in_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        latents = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=self.unet.dtype)
        return latents * self.scheduler.init_noise_sigma

    # ----------------------------------------------------------------------------------------------
    # The denoiser: guidance module + UNet

    def denoise(self, latents: torch.Tensor, t, text_embeds: torch.Tensor, mesh: torch.Tensor,
                control_scale: float) -> torch.Tensor:
        """Noise prediction of the UNet with the guidance module's residuals for the (scaled) ``latents``
        (the UNet alone without a guidance module)."""
        if self.controlnet is None:
            return self.unet(latents, t, encoder_hidden_states=text_embeds, return_dict=False)[0]
        down, mid = self.controlnet(latents, t, encoder_hidden_states=text_embeds, controlnet_cond=mesh,
                                    conditioning_scale=control_scale, return_dict=False)
        return self.unet(latents, t, encoder_hidden_states=text_embeds, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid, return_dict=False)[0]

    def decode(self, latents: torch.Tensor, output_type: str):
        latents = latents.to(self.vae.dtype)          # the VAE may run in its own dtype (attentionhand.speed)
        images = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        return self.image_processor.postprocess(images, output_type=output_type)

    # ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        mesh_image: MeshImage | Sequence[MeshImage],
        local_mesh_image: MeshImage | Sequence[MeshImage] | None = None,
        hand_token_indices: Sequence[Sequence[int]] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        local_generator: list[torch.Generator] | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 9.0,
        controlnet_conditioning_scale: float = 1.0,
        eta: float = 0.0,
        negative_prompt: str = "",
        tas: TASConfig | None = None,
        height: int | None = None,
        width: int | None = None,
        output_type: str = "pil",
        return_attention: bool = False,
    ) -> AttentionHandOutput:
        """Generate one image per prompt (and one local image per prompt when ``local_mesh_image`` is given).

        ``hand_token_indices``: per prompt, the CLIP token positions (1..75) of its hand words; TAS acts
        on these only (an empty list: no TAS for that sample). ``tas``: None or disabled = plain sampling;
        otherwise ``tas.iterations`` updates of the latents before each of the first ``tas.max_steps``
        steps. ``generator``: one per prompt for per-sample reproducibility. Height and width default to
        the UNet's sample size times the VAE factor (512 for SD1.5) and must be multiples of that factor.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        batch = len(prompts)
        globals_ = _as_list(mesh_image, batch, "mesh_image")
        locals_ = None if local_mesh_image is None else _as_list(local_mesh_image, batch, "local_mesh_image")
        tokens = [list(t) for t in hand_token_indices] if hand_token_indices is not None else [[] for _ in prompts]
        check_token_indices(tokens, batch)
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(f"height and width must be multiples of {self.vae_scale_factor}")
        tas = tas or TASConfig(enabled=False)
        branches = 1 if locals_ is None else 2
        rows = branches * batch
        cfg = guidance_scale > 1.0

        for gens in (generator, local_generator):
            if isinstance(gens, list) and len(gens) != batch:
                raise ValueError(f"{len(gens)} generators for {batch} prompts: pass one per prompt")
        cond = self.encode_prompts(prompts).repeat(branches, 1, 1)
        mesh = self.prepare_mesh_images(globals_ + (locals_ or []), height, width)
        latents = self.prepare_latents(batch, height, width, generator)
        noise_generators = generator
        if locals_ is not None:
            local_generator = local_generator if local_generator is not None else generator
            latents = torch.cat([latents, self.prepare_latents(batch, height, width, local_generator)])
            if isinstance(generator, list):
                noise_generators = list(generator) + list(local_generator)
        text = cond
        if cfg:  # rows: [uncond global | uncond local | cond global | cond local]
            text = torch.cat([self.encode_prompts([negative_prompt] * batch).repeat(branches, 1, 1), cond])
        mesh_in = torch.cat([mesh, mesh]) if cfg else mesh
        row_tokens = tokens * branches

        self.scheduler.set_timesteps(num_inference_steps, device=self._execution_device)
        step_kwargs = self.prepare_extra_step_kwargs(noise_generators, eta)
        tas_steps = min(tas.max_steps, num_inference_steps) if tas.active() and any(tokens) else 0
        alphas = step_sizes(tas, tas_steps * tas.iterations)
        store = AttentionStore(tas.attention_res)
        attention_sum = None
        record_rows = slice(rows, rows + batch) if cfg else slice(0, batch)
        patched = tas_processors(self.unet, store) if tas_steps or return_attention else nullcontext()

        with patched:
            for i, t in enumerate(self.scheduler.timesteps):
                for j in range(tas.iterations if i < tas_steps else 0):
                    def forward(x, idx, t=t):
                        x = self.scheduler.scale_model_input(x, t)
                        return attention_pass(self.unet, self.controlnet, tas.maps_from, x, t, cond[idx], mesh[idx],
                                              controlnet_conditioning_scale)

                    latents, _ = tas_update(latents, forward, store, row_tokens, alphas[i * tas.iterations + j], tas)

                model_in = self.scheduler.scale_model_input(torch.cat([latents, latents]) if cfg else latents, t)
                recording = store.recording(tuple(latents.shape[-2:]), record_rows) if return_attention \
                    else nullcontext()
                with recording:
                    noise = self.denoise(model_in, t, text, mesh_in, controlnet_conditioning_scale)
                if return_attention:
                    maps = store.maps()
                    attention_sum = maps if attention_sum is None else attention_sum + maps
                if cfg:
                    noise_uncond, noise_text = noise.chunk(2)
                    noise = noise_uncond + guidance_scale * (noise_text - noise_uncond)
                latents = self.scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]

        images = self.decode(latents, output_type)
        local_images = None
        if locals_ is not None:
            images, local_images = images[:batch], images[batch:]
        attention = None
        if return_attention:
            attention = [m.cpu() for m in refine(attention_sum / num_inference_steps, tokens, tas)]
        self.maybe_free_model_hooks()
        return AttentionHandOutput(images=images, local_images=local_images, attention_maps=attention)

    def prepare_extra_step_kwargs(self, generator, eta: float) -> dict:
        """``eta`` and ``generator`` for schedulers whose ``step`` takes them (DDIM: both)."""
        params = set(inspect.signature(self.scheduler.step).parameters)
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs


def _as_list(images, batch: int, name: str) -> list:
    stacked = isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4
    items = list(images) if isinstance(images, (list, tuple)) or stacked else [images]
    if len(items) == 1 and batch > 1:
        items = items * batch
    if len(items) != batch:
        raise ValueError(f"{name}: {len(items)} images for {batch} prompts")
    return items

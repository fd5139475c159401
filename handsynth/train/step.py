"""One training step of AttentionHand (paper Eq. 2-9), on any batch of :class:`~handsynth.train.data.Sample`.

For each sample (its own torch generator, :func:`handsynth.train.data.sample_generator`):

1. the global and the local RGB image are encoded to latents X0_G, X0_L (a sample of the VAE's posterior,
   times its scaling factor);
2. one timestep t ~ U{0, ..., T-1} serves both branches; each branch gets its OWN noise eps_G, eps_L:
   X_t = sqrt(abar_t) X0 + sqrt(1 - abar_t) eps;
3. TAS moves both noisy latents: ``tas.iterations`` updates X_t <- X_t - alpha_j grad L_TAS at t, with
   alpha_j from ``tas.step_size_start`` down to ``tas.step_size_end`` (``tas.step_sizes``), the maps read
   as ``tas.maps_from`` says (default: the UNet alone);
4. the target is the residual noise of the updated latent, eps_hat = (X_t_hat - sqrt(abar_t) X0) /
   sqrt(1 - abar_t) (``target: residual``, the paper), or the sampled noise (``target: noise``, the public
   code);
5. the frozen UNet plus the guidance module's residuals (ONE module for both branches, conditioned on the
   global / local mesh image) predicts the noise of X_t_hat; L = lambda_G MSE_G + lambda_L MSE_L.

Only the guidance module has trainable parameters; a branch whose lambda is 0 is not computed at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from handsynth.attentionhand.tas import (FP16_LOSS_SCALE, AttentionStore, TASConfig, attention_pass, step_sizes,
                                         tas_update)


@dataclass
class Models:
    """The frozen SD parts (in ``weight_dtype``) and the trained guidance module (float32)."""

    vae: Any
    text_encoder: Any
    tokenizer: Any
    unet: Any
    controlnet: Any
    alphas_cumprod: torch.Tensor        # (T,) float32, from the base model's scheduler config
    weight_dtype: torch.dtype = torch.float32
    store: AttentionStore | None = None  # with tas_processors installed on the UNet when TAS is on

    @property
    def device(self) -> torch.device:
        return self.unet.device


@dataclass
class StepResult:
    """The loss and what it was made of (rows: the computed branches, global rows first)."""

    loss: torch.Tensor
    loss_global: torch.Tensor | None
    loss_local: torch.Tensor | None
    tas_loss: torch.Tensor              # per row, before the first TAS update (0 without hand tokens)
    timesteps: torch.Tensor
    x0: torch.Tensor
    noise: torch.Tensor
    noisy: torch.Tensor                 # X_t before TAS
    updated: torch.Tensor               # X_t_hat after TAS
    target: torch.Tensor
    prediction: torch.Tensor


def alphas_cumprod(scheduler_config) -> torch.Tensor:
    """abar_t of the base model's training noise schedule (a scheduler config; SD1.5: scaled-linear betas)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler_config).alphas_cumprod.to(torch.float32)


def encode_text(models: Models, prompts: Sequence[str]) -> torch.Tensor:
    ids = models.tokenizer(list(prompts), padding="max_length", max_length=models.tokenizer.model_max_length,
                           truncation=True, return_tensors="pt").input_ids
    return models.text_encoder(ids.to(models.device))[0]


def encode_images(models: Models, images: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Latents of images in [-1, 1]: one posterior sample per row, from that row's generator (float32)."""
    dist = models.vae.encode(images.to(models.device, models.weight_dtype)).latent_dist
    mean, std = dist.mean.float(), dist.std.float()
    eps = torch.stack([torch.randn(mean.shape[1:], generator=g, device=g.device) for g in generators])
    return (mean + std * eps.to(mean.device)) * models.vae.config.scaling_factor


def training_loss(models: Models, samples: Sequence, generators: Sequence[torch.Generator], tas: TASConfig,
                  *, target: str = "residual", lambda_global: float = 0.5, lambda_local: float = 0.5,
                  mixed_fp16: bool = False) -> StepResult:
    """The loss of one batch (see the module docstring). ``generators``: one per sample, consumed in a fixed
    order (timestep, global noise, local noise, global VAE sample, local VAE sample), so a sample's draws do
    not depend on its batch. ``mixed_fp16``: float16 autocast is on (TAS then scales its loss, see
    ``tas.FP16_LOSS_SCALE``)."""
    if target not in ("residual", "noise"):
        raise ValueError(f"target must be 'residual' or 'noise', not {target!r}")
    device, n = models.device, len(samples)
    T = models.alphas_cumprod.shape[0]
    t = torch.stack([torch.randint(0, T, (), generator=g, device=g.device) for g in generators]).to(device)
    noise_g = torch.stack([torch.randn(_latent_shape(models, samples[i]), generator=g, device=g.device)
                           for i, g in enumerate(generators)])
    noise_l = torch.stack([torch.randn(noise_g.shape[1:], generator=g, device=g.device) for g in generators])
    branches = [name for name, lam in (("global", lambda_global), ("local", lambda_local)) if lam > 0]

    with torch.no_grad():
        text = encode_text(models, [s.prompt.text for s in samples])
        x0_parts, mesh_parts = [], []
        vae_gens = {"global": [torch.Generator(g.device).manual_seed(int(torch.randint(0, 2**62, (), generator=g)))
                               for g in generators]}
        vae_gens["local"] = [torch.Generator(g.device).manual_seed(int(torch.randint(0, 2**62, (), generator=g)))
                             for g in generators]
        for name in branches:
            rgb = torch.stack([s.rgb if name == "global" else s.local_rgb for s in samples])
            x0_parts.append(encode_images(models, rgb, vae_gens[name]))
            mesh_parts.append(torch.stack([s.mesh if name == "global" else s.local_mesh for s in samples]))
    x0 = torch.cat(x0_parts)
    mesh = torch.cat(mesh_parts).to(device, models.weight_dtype)
    noise = torch.cat([noise_g if name == "global" else noise_l for name in branches]).to(device)
    rows_t = t.repeat(len(branches))
    text_rows = text.repeat(len(branches), 1, 1)
    abar = models.alphas_cumprod.to(device)[rows_t].view(-1, 1, 1, 1)
    noisy = abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    updated = noisy
    tas_losses = torch.zeros(noisy.shape[0])
    tokens = [list(s.token_indices) for s in samples] * len(branches)
    if tas.enabled and tas.iterations > 0 and any(tokens):
        if models.store is None:
            raise ValueError("TAS needs Models.store with tas_processors installed on the UNet")

        def forward(x, rows):
            return attention_pass(models.unet, models.controlnet, tas.maps_from, x.to(models.weight_dtype),
                                  rows_t[rows], text_rows[rows], mesh[rows])

        scale = FP16_LOSS_SCALE if mixed_fp16 else None
        for j, alpha in enumerate(step_sizes(tas, tas.iterations)):
            updated, losses = tas_update(updated, forward, models.store, tokens, alpha, tas, loss_scale=scale)
            if j == 0:
                tas_losses = losses.detach().cpu()
        updated = updated.float()
    updated = updated.detach()

    goal = (updated - abar.sqrt() * x0) / (1 - abar).sqrt() if target == "residual" else noise
    x_in = updated.to(models.weight_dtype)
    down, mid = models.controlnet(x_in, rows_t, encoder_hidden_states=text_rows, controlnet_cond=mesh,
                                  return_dict=False)
    prediction = models.unet(x_in, rows_t, encoder_hidden_states=text_rows,
                             down_block_additional_residuals=[d.to(models.weight_dtype) for d in down],
                             mid_block_additional_residual=mid.to(models.weight_dtype), return_dict=False)[0]
    parts = {}
    for k, name in enumerate(branches):
        rows = slice(k * n, (k + 1) * n)
        parts[name] = F.mse_loss(prediction[rows].float(), goal[rows].float())
    loss = sum(lam * parts[name] for name, lam in (("global", lambda_global), ("local", lambda_local))
               if name in parts)
    return StepResult(loss=loss, loss_global=parts.get("global"), loss_local=parts.get("local"),
                      tas_loss=tas_losses, timesteps=t, x0=x0, noise=noise, noisy=noisy, updated=updated,
                      target=goal, prediction=prediction)


def _latent_shape(models: Models, sample) -> tuple[int, int, int]:
    factor = 2 ** (len(models.vae.config.block_out_channels) - 1)
    _, h, w = sample.rgb.shape
    return (models.unet.config.in_channels, h // factor, w // factor)

"""Text Attention Stage (TAS, AttentionHand Eq. 2-4), written once for inference and training.

Pieces, each usable alone:

- :class:`AttentionStore` + :class:`TASAttnProcessor`: record the UNet's cross-attention probabilities
  at one resolution (16x16 for SD1.5 at 512x512), averaged over heads and over the recorded layers.
  :func:`tas_processors` installs the processor on the UNet's cross-attention layers (``attn2``) for
  the duration of a ``with`` block. While not recording, the processor computes attention with
  ``F.scaled_dot_product_attention`` exactly like diffusers' default ``AttnProcessor2_0``, so the
  UNet's outputs are bit-identical to an unpatched UNet.
- :func:`token_probabilities`, :func:`smooth_tokens`, :func:`refine`: the map refinement - drop the
  start-token column (and the last, always end/padding, column), keep CLIP positions 1..75, multiply
  by ``softmax_scale``, softmax over the tokens, then a fixed 3x3 smoothing filter per requested token:
  ``kernel: public`` (default) is the public code's exp(-(x / (2 sigma))^2), the filter the released
  module was trained with; ``kernel: gaussian`` the textbook Gaussian of standard deviation ``sigma``
  (see :func:`smoothing_kernel`).
- :func:`tas_loss`: per sample, L = max over its hand tokens of (1 - max over pixels of the refined map).
- :func:`step_sizes`, :func:`tas_gradient` and :func:`tas_update`: the gradient step
  X_t <- X_t - alpha * dL/dX_t, batched with per-sample token lists, through the same UNet that generates
  (``maps_from: unet``, default, as paper and public code: the UNet without the guidance module's
  residuals, so the maps and their gradient do not depend on the guidance module; ``unet+guidance``: with
  them); float16 gradients are loss-scaled so that they do not underflow. The UNet is
  stopped right after its last recorded layer (see :meth:`AttentionStore.recording`): for SD1.5 at 512x512
  that skips ``up_blocks.2``, ``up_blocks.3`` and ``conv_out``, which cannot change L_TAS, in the forward
  and in the backward pass.

Conventions: hand-token indices are CLIP token positions (0 = start token, words from 1), one list per
sample; the refined map of position ``p`` is column ``p - 1`` of :func:`token_probabilities`' output.
Attention maps are laid out (batch, height, width, tokens) in latent-grid pixels.
"""

from __future__ import annotations

import math
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F

KERNELS = ("public", "gaussian")
MAPS_FROM = ("unet", "unet+guidance")
CLIP_LENGTH = 77
FIRST_TEXT_TOKEN = 1  # position 0 is the start token
LAST_TEXT_TOKEN = 75  # position 76 is always an end/padding token


@dataclass(frozen=True)
class TASConfig:
    """TAS settings; the recipe's ``tas:`` section has exactly these fields."""

    enabled: bool = True
    max_steps: int = 10  # apply TAS during the first K denoising steps (0 = never)
    iterations: int = 1  # gradient updates on the latents per TAS step
    step_size_start: float = 20.0  # alpha at the first TAS update ...
    step_size_end: float = 10.0  # ... decreasing (linearly in alpha^2, see step_sizes) to this at the last
    attention_res: int = 16  # record cross-attention at this resolution of the latent's longer side (SD1.5 at 512: 16)
    softmax_scale: float = 100.0
    kernel_size: int = 3
    sigma: float = 0.5  # the parameter of ``kernel`` (see smoothing_kernel)
    kernel: Literal["public", "gaussian"] = "public"
    maps_from: Literal["unet", "unet+guidance"] = "unet"  # the forward pass whose cross-attention TAS reads

    def __post_init__(self):
        if self.max_steps < 0 or self.iterations < 1:
            raise ValueError("TASConfig: max_steps must be >= 0 and iterations >= 1")
        if self.attention_res < 1 or self.kernel_size < 1 or self.kernel_size % 2 == 0 or self.sigma <= 0:
            raise ValueError("TASConfig: attention_res >= 1, an odd kernel_size >= 1 and sigma > 0 are required")
        if self.kernel not in KERNELS or self.maps_from not in MAPS_FROM:
            raise ValueError(f"TASConfig: kernel must be one of {KERNELS}, maps_from one of {MAPS_FROM}")

    def active(self) -> bool:
        return self.enabled and self.max_steps > 0


# --------------------------------------------------------------------------------------------------
# Recording cross-attention


class StopForward(Exception):
    """Raised out of the UNet by a truncated recording once its last recorded layer has run."""


# Per UNet (weakly held), the layers a complete recording recorded, in call order, per (latent size,
# attention_res): what a truncated recording of the same UNet waits for before it stops the forward.
_LAST_LAYERS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


class AttentionStore:
    """Collects head-averaged cross-attention probabilities of one forward pass.

    Use :meth:`recording` around a UNet call: it clears the store, sets the target resolution from
    the latent size (``attention_res`` along the latent's longer side; e.g. a 64x64 latent and
    attention_res=16 record the layers at 1/4 of the latent size, a 64x42 latent the 16x11 layers) and
    the batch rows to keep. Layers at other resolutions are ignored.
    """

    def __init__(self, attention_res: int = 16):
        self.attention_res = attention_res
        self.hw: tuple[int, int] | None = None  # map resolution of the current / last recording
        self.rows: slice | torch.Tensor | None = None
        self.active = False
        self.seen_lengths: set[int] = set()
        self._sum: torch.Tensor | None = None
        self._count = 0
        self._layers: list = []  # the layers recorded so far in this recording, in call order
        self._known: dict | None = None  # _LAST_LAYERS of the UNet, set by tas_processors
        self._stop_at: tuple | None = None  # the layers after which a truncated recording stops the forward
        self._stopped = False

    @contextmanager
    def recording(self, latent_hw: tuple[int, int], rows: slice | torch.Tensor | None = None,
                  truncate: bool = False) -> Iterator[None]:
        """Record the forward passes inside the block for a latent of ``latent_hw``; keep batch ``rows``.

        ``truncate``: raise :class:`StopForward` out of the (one) UNet forward in the block as soon as
        the last layer at the recorded resolution has run - the caller catches it (see
        :func:`tas_gradient`). Which layer is last is learned from the first complete recording of the
        same UNet (installed by :func:`tas_processors`) at the same latent size; until then, and for a
        UNet whose layers then differ, the forward runs to the end.
        """
        h, w = latent_hw
        if max(h, w) % self.attention_res:
            raise ValueError(f"attention_res {self.attention_res} does not divide the latent's longer side "
                             f"{max(h, w)}")
        factor = max(h, w) // self.attention_res
        self.hw, self.rows, self.active = (_downsampled(h, factor), _downsampled(w, factor)), rows, True
        self.seen_lengths, self._sum, self._count, self._layers = set(), None, 0, []
        key = (h, w, self.attention_res)
        self._stop_at = self._known.get(key) if truncate and self._known is not None else None
        self._stopped = False
        try:
            yield
        finally:
            self.active, self._stop_at = False, None
        if not self._stopped and self._known is not None and self._layers:
            self._known[key] = tuple(self._layers)  # a complete forward: its last recorded layer is the last

    def wants(self, query_length: int) -> bool:
        """Whether a layer with this query length (pixels) is recorded now."""
        if not self.active:
            return False
        self.seen_lengths.add(query_length)
        return query_length == self.hw[0] * self.hw[1]

    def add(self, probs: torch.Tensor, layer: object = None) -> None:
        """Add one ``layer``'s probabilities, shape (batch, heads, query, tokens), float32.

        Raises :class:`StopForward` when a truncated recording has now recorded all its layers.
        """
        probs = probs if self.rows is None else probs[self.rows]
        mean = probs.mean(dim=1)
        self._sum = mean if self._sum is None else self._sum + mean
        self._count += 1
        self._layers.append(layer)
        stop = self._stop_at
        if stop is not None and len(self._layers) == len(stop) and all(a is b for a, b in zip(self._layers, stop)):
            self._stopped = True
            raise StopForward

    def maps(self) -> torch.Tensor:
        """Average over the layers of the last recording: (batch, height, width, tokens), float32."""
        if not self._count:
            raise RuntimeError(
                f"no cross-attention layer was recorded at {self.hw} for this latent size (query lengths "
                f"seen: {sorted(self.seen_lengths)}); choose another attention_res")
        avg = self._sum / self._count
        return avg.reshape(avg.shape[0], *self.hw, avg.shape[-1])


def _downsampled(n: int, factor: int) -> int:
    """A latent side after the UNet's downsamplings by ``factor``: each stride-2 step rounds up (a 42-wide
    latent is 21 then 11 wide), so the shorter side of a non-square latent need not divide evenly."""
    if factor & (factor - 1):            # not a power of two: no UNet level has this resolution
        return n // factor
    while factor > 1:
        n, factor = -(-n // 2), factor // 2
    return n


class TASAttnProcessor:
    """Cross-attention processor that can record probabilities (diffusers AttnProcessor2_0 semantics).

    Not recording (or a layer at another resolution): ``F.scaled_dot_product_attention``, the same
    operations in the same order as diffusers' default, hence identical outputs. Recording: the
    probabilities softmax(QK^T * scale) are computed explicitly in float32, stored (head-averaged) in the
    :class:`AttentionStore` and used for the output, so gradients flow through them.
    """

    def __init__(self, store: AttentionStore):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (hidden_states.shape if encoder_hidden_states is None
                                          else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if self.store.wants(query.shape[2]):
            scores = (query.float() @ key.float().transpose(-1, -2)) * attn.scale
            if attention_mask is not None:
                scores = scores + attention_mask.float()
            probs = scores.softmax(dim=-1)
            self.store.add(probs, attn)
            hidden_states = (probs.to(value.dtype) @ value)
        else:
            hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=0.0, is_causal=False)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def cross_attention_resolutions(unet, latent_size: int) -> list[int]:
    """The sides of the cross-attention maps ``unet`` makes for a ``latent_size`` x ``latent_size`` latent
    (each UNet level halves the side; SD1.5 at a 64 latent: [8, 16, 32, 64])."""
    config = unet.config
    down, up = list(config.down_block_types), list(config.up_block_types)
    sides = {latent_size >> i for i, kind in enumerate(down) if "CrossAttn" in kind}
    sides |= {latent_size >> (len(up) - 1 - i) for i, kind in enumerate(up) if "CrossAttn" in kind}
    if "CrossAttn" in str(getattr(config, "mid_block_type", "") or ""):
        sides.add(latent_size >> (len(down) - 1))
    return sorted(s for s in sides if s > 0)


@contextmanager
def tas_processors(unet, store: AttentionStore) -> Iterator[AttentionStore]:
    """Install :class:`TASAttnProcessor` on every cross-attention layer (``attn2``) of ``unet``; restore after.

    Self-attention layers keep their processors. Whether a layer records is decided per call from its
    query length (see :meth:`AttentionStore.recording`).
    """
    store._known = _LAST_LAYERS.setdefault(unet, {})
    previous = dict(unet.attn_processors)
    processor = TASAttnProcessor(store)
    patched = {name: (processor if name.endswith("attn2.processor") else proc) for name, proc in previous.items()}
    unet.set_attn_processor(patched)
    try:
        yield store
    finally:
        unet.set_attn_processor(dict(previous))


# --------------------------------------------------------------------------------------------------
# Refinement and loss


def check_token_indices(token_indices: Sequence[Sequence[int]], batch: int) -> None:
    """One list per sample, every position a text token 1..75; ValueError otherwise."""
    if len(token_indices) != batch:
        raise ValueError(f"{len(token_indices)} hand-token lists for a batch of {batch}")
    for tokens in token_indices:
        for p in tokens:
            if not FIRST_TEXT_TOKEN <= p <= LAST_TEXT_TOKEN:
                raise ValueError(f"hand-token position {p} is outside the text tokens "
                                 f"{FIRST_TEXT_TOKEN}..{LAST_TEXT_TOKEN} (0 is the start token)")


def token_probabilities(maps: torch.Tensor, softmax_scale: float = 100.0) -> torch.Tensor:
    """(B, H, W, 77) attention -> (B, H, W, 75): CLIP positions 1..75, scaled, softmax over tokens.

    Column ``p - 1`` of the result belongs to CLIP position ``p``.
    """
    text = maps[..., FIRST_TEXT_TOKEN:LAST_TEXT_TOKEN + 1].float()
    return (text * softmax_scale).softmax(dim=-1)


def smoothing_kernel(kernel_size: int = 3, sigma: float = 0.5, kernel: str = "public") -> torch.Tensor:
    """The normalised 2D smoothing kernel (kernel_size x kernel_size, float32) of TAS's refinement.

    ``public``: the public AttentionHand code's filter (inherited from Attend-and-Excite), separable with
    1D weights exp(-(x / (2 sigma))^2) - a true Gaussian of standard deviation sigma * sqrt(2); at its
    sigma 0.5 the 3x3 centre weight is 0.332. The released module was trained with it. ``gaussian``: the
    textbook Gaussian exp(-x^2 / (2 sigma^2)) of standard deviation ``sigma`` (centre weight 0.619 at 0.5).
    """
    x = torch.arange(kernel_size, dtype=torch.float32) - (kernel_size - 1) / 2
    if kernel == "public":
        g = torch.exp(-((x / (2 * sigma)) ** 2))
    elif kernel == "gaussian":
        g = torch.exp(-(x**2) / (2 * sigma**2))
    else:
        raise ValueError(f"unknown TAS kernel {kernel!r}; use one of {KERNELS}")
    g = g / g.sum()
    return g[:, None] * g[None, :]


def smooth_tokens(probs: torch.Tensor, token_indices: Sequence[Sequence[int]], kernel_size: int = 3,
                  sigma: float = 0.5, kernel: str = "public") -> list[torch.Tensor]:
    """Smooth the maps of each sample's requested tokens with :func:`smoothing_kernel`.

    ``probs``: (B, H, W, 75) from :func:`token_probabilities`. Returns one (K_i, H, W) tensor per sample,
    map k belonging to CLIP position ``token_indices[i][k]``. The filter is fixed and normalised, with
    reflect padding (torch's 'reflect': the edge pixel is not repeated).
    """
    check_token_indices(token_indices, probs.shape[0])
    rows = [i for i, tokens in enumerate(token_indices) for _ in tokens]
    cols = [p - FIRST_TEXT_TOKEN for tokens in token_indices for p in tokens]
    if not rows:
        return [probs.new_zeros((0, *probs.shape[1:3])) for _ in token_indices]
    selected = probs[rows, :, :, cols].unsqueeze(1)  # (N, 1, H, W)
    pad = kernel_size // 2
    weights = smoothing_kernel(kernel_size, sigma, kernel).to(selected)[None, None]
    smoothed = F.conv2d(F.pad(selected, (pad, pad, pad, pad), mode="reflect"), weights)[:, 0]
    return list(smoothed.split([len(tokens) for tokens in token_indices]))


def refine(maps: torch.Tensor, token_indices: Sequence[Sequence[int]], config: TASConfig = TASConfig()
           ) -> list[torch.Tensor]:
    """Refined maps of the requested tokens: :func:`token_probabilities` then :func:`smooth_tokens`."""
    probs = token_probabilities(maps, config.softmax_scale)
    return smooth_tokens(probs, token_indices, config.kernel_size, config.sigma, config.kernel)


def tas_loss(refined: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-sample L_TAS = max over the sample's tokens of (1 - max over pixels); 0 with no tokens. Shape (B,)."""
    losses = [(1 - m.flatten(1).amax(dim=1)).max() if len(m) else m.new_zeros(()) for m in refined]
    return torch.stack(losses)


# --------------------------------------------------------------------------------------------------
# The latent update


def step_sizes(config: TASConfig, num_updates: int) -> list[float]:
    """Step sizes alpha_j of the ``num_updates`` TAS updates of one generation, decreasing.

    alpha_j = sqrt(lerp(start^2, end^2, j / (n - 1))): linear in alpha^2, which is the public code's
    ``20 * sqrt(linspace(1.0, 0.5, n))`` when start=20 and end=20*sqrt(0.5); the paper's 20 -> 10 is
    the default. A single update uses ``step_size_start``.
    """
    a2, b2 = config.step_size_start**2, config.step_size_end**2
    if num_updates <= 1:
        return [config.step_size_start] * num_updates
    return [math.sqrt(a2 + (b2 - a2) * j / (num_updates - 1)) for j in range(num_updates)]


def attention_pass(unet, controlnet, maps_from: str, latents: torch.Tensor, t, text_embeds: torch.Tensor,
                   mesh: torch.Tensor | None, control_scale: float = 1.0):
    """The forward pass whose cross-attention TAS reads (its output is not used).

    ``maps_from`` "unet" (default of :class:`TASConfig`, as paper and public code): the UNet alone, no
    guidance residuals - the maps and their latent gradient do not depend on the guidance module;
    "unet+guidance": the UNet with the guidance module's residuals (``controlnet`` on ``mesh``), as it
    denoises. Without a guidance module both are the UNet alone.
    """
    if maps_from == "unet" or controlnet is None:
        return unet(latents, t, encoder_hidden_states=text_embeds, return_dict=False)
    down, mid = controlnet(latents, t, encoder_hidden_states=text_embeds, controlnet_cond=mesh,
                           conditioning_scale=control_scale, return_dict=False)
    return unet(latents, t, encoder_hidden_states=text_embeds, down_block_additional_residuals=down,
                mid_block_additional_residual=mid, return_dict=False)


# float16 keeps only 5 exponent bits: per-element latent gradients of L_TAS (about 1e-6 on average) fall
# below its smallest normal value (6e-5) and partly flush to zero. As in mixed-precision training, the
# loss is multiplied by this factor for the backward pass and the gradient divided by it in float32.
# 2**10 still left about 1 in 10,000 elements at zero on CPUs with AVX-512 FP16 kernels; 2**14 leaves the
# mean element near 0.02, far from both float16 limits (a row that overflows is skipped, see below).
# bfloat16 and float32 have float32's exponent range and need no scaling.
FP16_LOSS_SCALE = 2.0**14


def tas_gradient(latents: torch.Tensor, forward: Callable[[torch.Tensor, list[int]], object],
                 store: AttentionStore, token_indices: Sequence[Sequence[int]], rows: list[int],
                 config: TASConfig = TASConfig(), loss_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample L_TAS of batch ``rows`` and its float32 gradient with respect to those latents.

    Returns ``(losses (R,), grad (R, C, h, w))``. Autograd is asked for the latents' gradient only, so
    model parameters never receive gradients. The recording is truncated: ``forward`` stops (with
    :class:`StopForward`, caught here) once the last layer L_TAS reads has run, so neither the forward
    nor the backward pass computes the rest of the UNet; the loss and gradient are those of the full pass.
    With float16 latents the loss is scaled by :data:`FP16_LOSS_SCALE` for the backward pass; a row whose
    gradient is then not finite (overflow) gets a zero gradient, i.e. no update, as a mixed-precision
    optimiser skips such a step. ``loss_scale`` overrides that choice (training under float16 autocast has
    float32 latents but float16 activations: it passes :data:`FP16_LOSS_SCALE`).
    """
    scale = loss_scale if loss_scale is not None else FP16_LOSS_SCALE if latents.dtype == torch.float16 else 1.0
    with torch.enable_grad():
        x = latents[rows].detach().requires_grad_(True)
        with store.recording(tuple(latents.shape[-2:]), truncate=True):
            try:
                forward(x, rows)
            except StopForward:
                pass
        losses = tas_loss(refine(store.maps(), [token_indices[i] for i in rows], config))
        (grad,) = torch.autograd.grad(losses.sum() * scale, x)
    grad = grad.float() / scale
    finite = torch.isfinite(grad).flatten(1).all(dim=1).view(-1, *([1] * (grad.dim() - 1)))
    return losses.detach(), torch.where(finite, grad, torch.zeros_like(grad))


def tas_update(latents: torch.Tensor, forward: Callable[[torch.Tensor, list[int]], object], store: AttentionStore,
               token_indices: Sequence[Sequence[int]], step_size: float, config: TASConfig = TASConfig(),
               loss_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One TAS gradient step on a batch of latents; returns (new latents, per-sample L_TAS before the step).

    ``forward(x, rows)`` must run :func:`attention_pass` (conditional text embeddings only) on ``x`` = the
    latents of batch ``rows``, with ``store``'s processors installed; its output is unused.
    Only samples with hand tokens enter the forward; the per-sample losses are summed, so each sample's
    gradient is its own. Samples with no tokens or zero loss keep their latents bit for bit. The
    gradient comes from :func:`tas_gradient` (float32, loss-scaled for float16 latents); the update is
    applied in float32 and cast back to the latents' dtype.
    """
    check_token_indices(token_indices, latents.shape[0])
    losses = latents.new_zeros(latents.shape[0], dtype=torch.float32)
    rows = [i for i, tokens in enumerate(token_indices) if tokens]
    if not rows:
        return latents, losses
    row_losses, grad = tas_gradient(latents, forward, store, token_indices, rows, config, loss_scale)
    move = (row_losses > 0).to(torch.float32).view(-1, *([1] * (grad.dim() - 1)))
    new = latents.clone()
    new[rows] = (latents[rows].float() - step_size * move * grad).to(latents.dtype)
    losses[rows] = row_losses
    return new, losses

"""Load an AttentionHandPipeline from a Stable Diffusion 1.5 base model and a guidance module.

Both may be Hugging Face ids (read from the local cache, or downloaded where the machine is online)
or local folders in diffusers' layout. Weights are read from safetensors only; pickled ``.bin`` /
``.ckpt`` files are never loaded (convert the public checkpoint with ``handsynth convert``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from handsynth.console import console
from handsynth.errors import MissingResourceError
from handsynth.hub import DEFAULT_BASE_MODEL, local_files_only, looks_like_path
from handsynth.tokenizer import load_clip_tokenizer

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "dpm++2m": "DPMSolverMultistepScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
}


def resolve_dtype(precision: str | torch.dtype) -> torch.dtype:
    """"fp32" | "fp16" | "bf16" (or a torch dtype) -> torch dtype."""
    if isinstance(precision, torch.dtype):
        return precision
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return PRECISIONS[precision]


def _check_scheduler(name: str) -> None:
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, not {name!r}")


def make_scheduler(name: str, config):
    """A diffusers scheduler by recipe name ("ddim", "dpm++2m", "euler-a", "unipc") from a scheduler config."""
    import diffusers

    _check_scheduler(name)
    return getattr(diffusers, SCHEDULERS[name]).from_config(config)


def _safe_kwargs(model: str | Path) -> dict:
    """diffusers loading options: safetensors only; disk only when the hub can't be asked; low-memory
    loading when accelerate is installed."""
    from diffusers.utils import is_accelerate_available

    return {"use_safetensors": True, "low_cpu_mem_usage": is_accelerate_available(),
            "local_files_only": local_files_only(model)}


def _missing(kind: str, model: str, exc: Exception) -> MissingResourceError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    local = Path(model).expanduser()
    offline = ("on a machine with internet run `huggingface-cli download {id}` and copy its cache "
               "(~/.cache/huggingface) here, or copy a folder written by save_pretrained; with HF_HUB_OFFLINE=1 "
               "only local folders and that cache are read. Weights must be .safetensors (convert an "
               "AttentionHand .ckpt with `handsynth convert`)")
    if local.exists():
        what = f"cannot load the {kind} from the folder '{model}': {reason}"
        fix = "point to a folder in diffusers layout (model_index.json or config.json + .safetensors): " + \
            offline.format(id="<model id>")
    elif looks_like_path(model):
        what = f"the {kind} folder '{model}' does not exist"
        fix = "check the path, or " + offline.format(id="<model id>")
    else:
        what = f"the {kind} '{model}' is neither a local folder nor in the Hugging Face cache ({reason})"
        fix = offline.format(id=model)
    return MissingResourceError(what, where=model, fix=fix)


def load_guidance_module(guidance: str | Path, *, dtype: torch.dtype = torch.float32):
    """A saved guidance module (``ControlNetModel``): a folder/id with its config.json, or a pipeline folder
    holding it under ``controlnet/``."""
    from diffusers import ControlNetModel

    path = Path(guidance).expanduser()
    subfolder = "controlnet" if (path / "controlnet" / "config.json").exists() else None
    try:
        return ControlNetModel.from_pretrained(str(guidance), subfolder=subfolder, torch_dtype=dtype,
                                               **_safe_kwargs(guidance))
    except (OSError, ValueError) as exc:
        raise _missing("guidance module", str(guidance), exc) from None


def load_pipeline(base: str | Path = DEFAULT_BASE_MODEL, guidance: str | Path | None = None, *,
                  dtype: str | torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  scheduler: str = "ddim"):
    """An :class:`AttentionHandPipeline` from an SD1.5-architecture ``base`` and a ``guidance`` module.

    ``base``: id or folder with subfolders vae/, text_encoder/, tokenizer/, unet/, scheduler/.
    ``guidance``: id or folder of a saved guidance module; None builds a fresh one from the UNet (its
    residuals are zero, so it does not steer by the mesh yet) and prints a warning. ``dtype``: "fp16",
    "bf16", "fp32" or a torch dtype. ``scheduler``: a :data:`SCHEDULERS` name. All components are frozen
    (eval, no parameter gradients). Missing models raise :class:`MissingResourceError` naming the offline fix;
    the guidance module is loaded first, so a wrong guidance path fails fast.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from handsynth.attentionhand.guidance import build_guidance_module, freeze
    from handsynth.attentionhand.pipeline import AttentionHandPipeline

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()      # handsynth shows its own progress; weight-loading bars are noise
    transformers_logging.disable_progress_bar()
    dtype = resolve_dtype(dtype)
    _check_scheduler(scheduler)
    controlnet = None if guidance is None else load_guidance_module(guidance, dtype=dtype)
    base = str(base)
    try:
        vae = AutoencoderKL.from_pretrained(base, subfolder="vae", torch_dtype=dtype, **_safe_kwargs(base))
        unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", torch_dtype=dtype, **_safe_kwargs(base))
        text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", dtype=dtype,
                                                     use_safetensors=True,
                                                     local_files_only=local_files_only(base))
        scheduler_config = DDIMScheduler.load_config(base, subfolder="scheduler",
                                                     local_files_only=local_files_only(base))
    except (OSError, ValueError) as exc:
        raise _missing("base model", base, exc) from None
    tokenizer = load_clip_tokenizer(base)
    if controlnet is None:
        console.print("[yellow]warning:[/yellow] no guidance module given: using a freshly initialised, UNTRAINED "
                      "one (images follow the prompt only, not the mesh); pass --guidance / model.guidance")
        controlnet = build_guidance_module(unet, 2 ** (len(vae.config.block_out_channels) - 1))
    freeze(vae, unet, text_encoder, controlnet)
    pipe = AttentionHandPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                 controlnet=controlnet, scheduler=make_scheduler(scheduler, scheduler_config))
    return pipe.to(device)

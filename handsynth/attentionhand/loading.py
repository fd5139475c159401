"""Load an AttentionHandPipeline from a Stable Diffusion 1.5 base model and a guidance module.

The base may be a Hugging Face id (read from the local cache, or downloaded where the machine is online)
or a local folder in diffusers' layout. The guidance module (``model.guidance``) may be any SD1.5
``ControlNetModel`` (see :func:`resolve_guidance`):

- a folder holding ``config.json`` + weights (``save_pretrained`` of a ControlNetModel, e.g. the
  ``controlnet/`` folder ``handsynth convert`` writes), or the folder holding such a ``controlnet/``;
- a hub id of a diffusers ControlNet (e.g. ``lllyasviel/control_v11f1p_sd15_depth``);
- one ``.safetensors`` file in the ORIGINAL ControlNet layout (``control_model.input_hint_block...``,
  e.g. HandRefiner's), read with diffusers' ``ControlNetModel.from_single_file``. diffusers finds the
  config of such a file by guessing the model family and reading that family's config from the hub
  (``lllyasviel/control_v11p_sd15_canny``), which fails offline. handsynth passes ``config=`` instead: a
  config built from the BASE model's UNet (a ControlNet copies the UNet's encoder) with the hint
  encoder's widths and input channels read from the file's tensor shapes, so no hub is needed;
- ``none``: no guidance module - plain Stable Diffusion (the paper's first baseline).

Weights are read from safetensors only; pickled ``.bin`` / ``.ckpt`` files are never loaded (convert the
public checkpoint with ``handsynth convert``).
"""

from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from handsynth.errors import InputError, MissingResourceError
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


OFFLINE_FIX = ("on a machine with internet run `huggingface-cli download {id}` and copy its cache "
               "(~/.cache/huggingface) here, or copy a folder written by save_pretrained; with HF_HUB_OFFLINE=1 "
               "only local folders and that cache are read. Weights must be .safetensors (convert an "
               "AttentionHand .ckpt with `handsynth convert`)")
GUIDANCE_FIX = ("for AttentionHand's weights run `handsynth convert --ckpt attentionhand.ckpt --out "
                "models/attentionhand`; without them name a hub ControlNet (e.g. lllyasviel/control_v11f1p_sd15_depth with model.condition: "
                "depth, see recipes/outdoor-depth-controlnet.yaml), an original-format .safetensors ControlNet file, "
                "or `none` (plain Stable Diffusion). Relative paths in a recipe are looked up beside the recipe, "
                "then in the working directory")


def _reason(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _missing(kind: str, model: str, exc: Exception) -> MissingResourceError:
    reason = _reason(exc)
    local = Path(model).expanduser()
    if local.exists():
        what = f"cannot load the {kind} from the folder '{model}': {reason}"
        fix = "point to a folder in diffusers layout (model_index.json or config.json + .safetensors): " + \
            OFFLINE_FIX.format(id="<model id>")
    elif looks_like_path(model):
        what = f"the {kind} folder '{model}' does not exist"
        fix = "check the path, or " + OFFLINE_FIX.format(id="<model id>")
    else:
        what = f"the {kind} '{model}' is neither a local folder nor in the Hugging Face cache ({reason})"
        fix = OFFLINE_FIX.format(id=model)
    return MissingResourceError(what, where=model, fix=fix)


# --- the guidance module ---------------------------------------------------------------------------

NO_GUIDANCE = "none"
PICKLED_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
HINT_PREFIX = "input_hint_block."


@dataclass(frozen=True)
class GuidanceSource:
    """What ``model.guidance`` names: ``kind`` is "none", "folder" (a ControlNet folder: config.json +
    weights), "pipeline" (a folder holding ``controlnet/``), "hub" (a hub id) or "single-file" (an
    original-format .safetensors file); ``location`` the path or id to load."""

    kind: str
    location: str

    def describe(self) -> str:
        return {
            "none": "none (plain Stable Diffusion, no guidance module)",
            "folder": f"ControlNet folder {self.location}",
            "pipeline": f"ControlNet in {self.location}/controlnet (the folder holding controlnet/)",
            "hub": f"hub ControlNet {self.location}",
            "single-file": f"original-format ControlNet file {self.location} (config from the base model's UNet)",
        }[self.kind]


def resolve_guidance(guidance: str | Path | None) -> GuidanceSource:
    """Which kind of guidance module ``guidance`` names (see :class:`GuidanceSource`); raises
    :class:`MissingResourceError` for a local path that does not exist and :class:`InputError` for a
    pickled weights file or a folder holding no ControlNet. A name that is no local path is a hub id."""
    if guidance is None or str(guidance).strip().lower() == NO_GUIDANCE:
        return GuidanceSource("none", NO_GUIDANCE)
    text = str(guidance)
    path = Path(text).expanduser()
    if path.suffix.lower() in PICKLED_SUFFIXES:
        raise InputError(f"the guidance weights '{text}' are a pickled {path.suffix} file, which handsynth never "
                         "loads (it could run code)", where=text,
                         fix="use the .safetensors release of the ControlNet (or re-save the weights as "
                             ".safetensors on a trusted machine); an AttentionHand .ckpt goes through "
                             "`handsynth convert`")
    if path.suffix.lower() == ".safetensors":
        if not path.is_file():
            raise MissingResourceError(f"the guidance file '{text}' does not exist (resolved to {path.resolve()})",
                                       where=text, fix="check the path or download the file; " + GUIDANCE_FIX)
        return GuidanceSource("single-file", str(path))
    if path.is_dir():
        if (path / "config.json").is_file():
            return GuidanceSource("folder", str(path))
        if (path / "controlnet" / "config.json").is_file():
            return GuidanceSource("pipeline", str(path))
        raise InputError(f"the guidance folder '{text}' holds neither config.json (a ControlNet folder) nor "
                         "controlnet/config.json (a folder holding one)", where=path.resolve(),
                         fix="name the folder `handsynth convert` wrote (or its controlnet/ subfolder), a "
                             "diffusers ControlNet folder, or an original-format .safetensors file")
    if looks_like_path(text) or path.exists():
        raise MissingResourceError(f"the guidance folder '{text}' does not exist (resolved to {path.resolve()})",
                                   where=text, fix="check the path; " + GUIDANCE_FIX)
    return GuidanceSource("hub", text)


def missing_guidance(source: GuidanceSource, exc: Exception) -> MissingResourceError:
    reason = _reason(exc)
    if source.kind != "hub":
        return MissingResourceError(f"cannot load the guidance module from {source.location}: {reason}",
                                    where=source.location,
                                    fix="point to a ControlNet saved by save_pretrained (config.json + .safetensors) "
                                        "or an original-format SD1.5 ControlNet .safetensors file; " + GUIDANCE_FIX)
    folder = Path(source.location).resolve()
    return MissingResourceError(
        f"the guidance module '{source.location}' is neither a local folder (no {folder}) nor a ControlNet in the "
        f"Hugging Face cache ({reason})", where=source.location,
        fix="if it is meant as a folder: " + GUIDANCE_FIX + "; if it is a hub id: "
            + OFFLINE_FIX.format(id=source.location))


def hint_shapes(file: Path) -> tuple[int, list[int]]:
    """(conditioning channels, hint-encoder widths) of an original-format ControlNet file, from tensor shapes.

    The hint encoder is ``input_hint_block.{0,2,...,14}``: conv_in (channels -> w0), then per stage a
    conv (w_i -> w_i) and a stride-2 conv (w_i -> w_i+1); the widths are the outputs of convs 0, 4, 8, 12.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            shapes = {k.split(HINT_PREFIX, 1)[1]: f.get_slice(k).get_shape() for k in f.keys() if HINT_PREFIX in k}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise InputError(f"cannot read the guidance file as safetensors: {_reason(exc)}", where=file,
                         fix="download the file again (it may be truncated)") from None
    try:
        channels = shapes["0.weight"][1]
        widths = [shapes[f"{i}.weight"][0] for i in (0, 4, 8, 12)]
    except KeyError:
        raise InputError("the file is not an SD1.5 ControlNet in the original layout (no input_hint_block.0/4/8/12 "
                         "weights)", where=file,
                         fix="pass an original-format ControlNet (keys control_model.input_hint_block..., "
                             "input_blocks..., zero_convs...) or a diffusers ControlNet folder") from None
    return int(channels), [int(w) for w in widths]


def controlnet_config_for(base: str, file: Path) -> dict:
    """The diffusers config of an original-format ControlNet ``file`` meant for the SD1.5-architecture ``base``:
    the base UNet's encoder (as ``ControlNetModel.from_unet`` copies it) with the file's hint encoder."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    channels, widths = hint_shapes(file)
    try:
        unet_config = UNet2DConditionModel.load_config(base, subfolder="unet", local_files_only=local_files_only(base))
    except (OSError, ValueError) as exc:
        raise _missing("base model", base, exc) from None
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        model = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tuple(widths),
                                          conditioning_channels=channels, load_weights_from_unet=False)
    return {k: v for k, v in model.config.items() if not k.startswith("_")}


def load_guidance_module(guidance: str | Path, *, dtype: torch.dtype = torch.float32,
                         base: str | Path = DEFAULT_BASE_MODEL):
    """A guidance module (``ControlNetModel``) from any source :func:`resolve_guidance` accepts; None for
    ``none``. ``base`` (the SD1.5 model it will run with) supplies the config of an original-format file."""
    from diffusers import ControlNetModel

    source = resolve_guidance(guidance)
    if source.kind == "none":
        return None
    try:
        if source.kind == "single-file":
            config = controlnet_config_for(str(base), Path(source.location))
            with tempfile.TemporaryDirectory(prefix="handsynth-controlnet-config-") as folder, _quiet_diffusers():
                Path(folder, "config.json").write_text(json.dumps(config))
                return ControlNetModel.from_single_file(source.location, config=folder, torch_dtype=dtype,
                                                        local_files_only=True, **_single_file_kwargs())
        subfolder = "controlnet" if source.kind == "pipeline" else None
        return ControlNetModel.from_pretrained(source.location, subfolder=subfolder, torch_dtype=dtype,
                                               **_safe_kwargs(source.location))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise missing_guidance(source, exc) from None


@contextmanager
def _quiet_diffusers():
    """diffusers' single-file loader casts with ``.to(dtype)`` and logs a warning about it; not the user's concern."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def _single_file_kwargs() -> dict:
    from diffusers.utils import is_accelerate_available

    return {"low_cpu_mem_usage": is_accelerate_available()}


def load_pipeline(base: str | Path = DEFAULT_BASE_MODEL, guidance: str | Path | None = None, *,
                  dtype: str | torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  scheduler: str = "ddim"):
    """An :class:`AttentionHandPipeline` from an SD1.5-architecture ``base`` and a ``guidance`` module.

    ``base``: id or folder with subfolders vae/, text_encoder/, tokenizer/, unet/, scheduler/.
    ``guidance``: anything :func:`resolve_guidance` accepts (ControlNet folder, the folder holding
    ``controlnet/``, hub id, original-format .safetensors file); None or "none" gives plain Stable Diffusion
    (no guidance module; mesh images are then ignored). ``dtype``: "fp16", "bf16", "fp32" or a torch dtype.
    ``scheduler``: a :data:`SCHEDULERS` name. All components are frozen (eval, no parameter gradients).
    Missing models raise :class:`MissingResourceError` naming the offline fix; the guidance module is
    resolved and loaded first, so a wrong guidance path fails fast.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from handsynth.attentionhand.guidance import MESH_CHANNELS, freeze
    from handsynth.attentionhand.pipeline import AttentionHandPipeline

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()      # handsynth shows its own progress; weight-loading bars are noise
    transformers_logging.disable_progress_bar()
    dtype = resolve_dtype(dtype)
    _check_scheduler(scheduler)
    base = str(base)
    controlnet = load_guidance_module(guidance, dtype=dtype, base=base)
    if controlnet is not None and controlnet.config.conditioning_channels != MESH_CHANNELS:
        raise InputError(f"the guidance module takes {controlnet.config.conditioning_channels}-channel condition "
                         f"images, but render writes {MESH_CHANNELS}-channel (RGB) mesh and depth images",
                         where=str(guidance), fix="use an SD1.5 ControlNet with an RGB condition (mesh, depth)")
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
    freeze(*(m for m in (vae, unet, text_encoder, controlnet) if m is not None))
    pipe = AttentionHandPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                 controlnet=controlnet, scheduler=make_scheduler(scheduler, scheduler_config))
    return pipe.to(device)

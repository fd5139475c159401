"""Convert the public AttentionHand checkpoint into handsynth's diffusers folders.

The released ``attentionhand.ckpt`` is a PyTorch Lightning checkpoint. Its ``state_dict`` holds

* ``VAS.*`` - the guidance module (the paper's visual attention stage), a ControlNet in the original
  ControlNet layout (``input_hint_block``, ``input_blocks``, ``zero_convs``, ``middle_block``,
  ``middle_block_out``): the keys original ControlNet checkpoints store under ``control_model.*``;
* ``model.diffusion_model.*`` (SD UNet, ldm layout), ``first_stage_model.*`` (VAE) and
  ``cond_stage_model.transformer.*`` (CLIP text encoder, Hugging Face layout) - the SD1.5 weights,
  locked during AttentionHand's training, so identical to the base model's;
* buffers of the training code (noise schedule, ``logvar``) that a diffusers scheduler recreates.

Only the guidance module is converted by default (``<out>/controlnet``, a diffusers
``ControlNetModel``); ``full=True`` also converts the SD parts into ``unet/``, ``vae/`` and
``text_encoder/`` and copies ``tokenizer/`` and ``scheduler/`` from a base SD1.5 model (a
checkpoint holds neither). Key renaming is diffusers' own converter for original ControlNet and
ldm checkpoints; this module adds safe loading, config inference, key accounting and atomic output.

Loading never runs code from the file: safetensors, or ``torch.load(weights_only=True)``. Globals of
Lightning's own bookkeeping (callback classes, hyper-parameter containers) are bound to an inert
placeholder class instead of being imported; any other pickled object makes the load fail.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from handsynth import rundir
from handsynth.errors import InputError, MissingResourceError, OutputError
from handsynth.hub import DEFAULT_BASE_MODEL
from handsynth.io import ensure_writable_dir, sha256_file, write_json_atomic

GUIDANCE = "controlnet"
GUIDANCE_PREFIX = "VAS."
REPORT = "conversion_report.json"

#: Source prefix of each SD part converted with ``full=True`` (output subfolder -> key prefix).
SD_PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.",
}
#: Keys deliberately not converted, with the reason shown in the report.
IGNORED: list[tuple[str, str]] = [
    (r"^(betas|alphas_cumprod(_prev)?|sqrt_(alphas_cumprod|one_minus_alphas_cumprod|recip_alphas_cumprod"
     r"|recipm1_alphas_cumprod)|log_one_minus_alphas_cumprod|posterior_(variance|log_variance_clipped"
     r"|mean_coef1|mean_coef2))$",
     "noise-schedule buffers (SD1.5's linear schedule; the scheduler config recreates them)"),
    (r"^logvar$", "per-timestep loss weights of the training code"),
    (r"^model_ema\.", "EMA copy of the UNet (AttentionHand trains without EMA)"),
    (r"^TAS\.", "the public code's separate SD v1.4 copy, used only by its training-time TAS"),
    (r"^cond_stage_model\.transformer\.text_model\.embeddings\.position_ids$",
     "constant position-id buffer of the text encoder"),
]
LOCKED_SD = (r"^(model\.diffusion_model|first_stage_model|cond_stage_model)\.",
             "SD1.5 weights, locked during training (identical to the base model); convert them with --full")
#: Pickle globals of Lightning's bookkeeping: bound to an inert placeholder, never imported.
INERT_GLOBAL_PREFIXES = ("pytorch_lightning.", "lightning.", "lightning_fabric.", "omegaconf.",
                         "argparse.Namespace", "pathlib.")


class _Inert:
    """Stand-in for a Lightning bookkeeping object in a checkpoint: runs none of its code, keeps nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Inert":
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


# --- loading -----------------------------------------------------------------------------------

def load_checkpoint(path: str | Path) -> tuple[dict[str, Any], list[str]]:
    """Read a checkpoint's tensors without executing anything it holds.

    Returns ``(state_dict, top_level)``: the ``state_dict`` of a Lightning checkpoint (or the file's
    mapping itself when it is a bare state dict) and the names of the other top-level entries
    (``epoch``, ``optimizer_states``, ...), which are not weights and are not converted.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingResourceError("the checkpoint is a folder, not a file" if path.is_dir() else
                                   "the checkpoint file does not exist", where=path,
                                   fix="download attentionhand.ckpt (see the AttentionHand README) and pass its path "
                                       "with --ckpt")
    obj = _load_safetensors(path) if path.suffix == ".safetensors" else _load_torch(path)
    if not isinstance(obj, dict):
        raise InputError(f"the checkpoint holds a {type(obj).__name__}, not a dictionary of weights", where=path,
                         fix="pass the AttentionHand Lightning checkpoint (a .ckpt) or a .safetensors state dict")
    state = obj.get("state_dict") if isinstance(obj.get("state_dict"), dict) else obj
    top_level = sorted(str(k) for k in obj if k != "state_dict") if state is not obj else []
    bad = [k for k in state if not isinstance(k, str)]
    if bad:
        raise InputError(f"the checkpoint's state_dict has non-text keys such as {bad[0]!r}", where=path,
                         fix="pass a checkpoint whose state_dict maps parameter names to tensors")
    return state, top_level


def _load_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"the file is not a readable safetensors file: {exc}", where=path,
                         fix="download the file again (a truncated download is a common cause)") from None


def _load_torch(path: Path) -> Any:
    import pickle

    import torch

    is_zip = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError:
        pass
    except Exception as exc:  # any other failure on arbitrary bytes (KeyError, EOFError, RuntimeError, ...)
        raise InputError(f"the file is not a readable PyTorch checkpoint: {type(exc).__name__}: {exc}", where=path,
                         fix="download the file again (a truncated download is a common cause)") from None
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # a legacy (non-zip) file: its globals cannot be listed without unpickling it
        unsafe = ["(objects in a legacy, non-zip torch.save file)"]
    foreign = [g for g in unsafe if not g.startswith(INERT_GLOBAL_PREFIXES)]
    if foreign or not unsafe:
        raise InputError(
            "the checkpoint holds pickled objects beyond tensors (" + ", ".join(foreign or ["unknown"]) + "); "
            "loading them would execute code from the file, which handsynth refuses to do",
            where=path,
            fix="use the official attentionhand.ckpt, or re-save the weights alone on a trusted machine "
                "(safetensors.torch.save_file(ckpt['state_dict'], 'attentionhand.safetensors')) and pass that")
    with torch.serialization.safe_globals([(_Inert, name) for name in unsafe]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
        except Exception as exc:
            raise InputError(f"the checkpoint cannot be read safely: {type(exc).__name__}: {exc}", where=path,
                             fix="re-save the weights alone as .safetensors on a trusted machine and pass "
                                 "that") from None


# --- base model ----------------------------------------------------------------------------------

def resolve_base(base: str) -> Path:
    """A local folder in diffusers' SD layout for ``base`` (a folder, or a model id in the HF cache)."""
    folder = Path(base).expanduser()
    if not folder.exists():
        try:
            from huggingface_hub import snapshot_download

            from handsynth.hub import local_files_only

            folder = Path(snapshot_download(base, allow_patterns=["*.json", "*.txt"],
                                            local_files_only=local_files_only(base)))
        except Exception as exc:
            raise MissingResourceError(
                f"the base model {base!r} is neither a local folder nor available from the Hugging Face cache "
                f"({type(exc).__name__})",
                where="--base",
                fix=f"on a machine with internet run `huggingface-cli download {base}` and copy ~/.cache/huggingface "
                    "here, or pass a local folder written by save_pretrained") from None
    if not (folder / "unet" / "config.json").is_file():
        raise MissingResourceError("the base model folder has no unet/config.json", where=folder,
                                   fix="pass a Stable Diffusion 1.5 folder in diffusers' layout (model_index.json, "
                                       "unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
    return folder


def _read_config(folder: Path, sub: str) -> dict[str, Any]:
    from handsynth.io import read_json

    return read_json(folder / sub / "config.json", what=f"{sub} config of the base model")


# --- conversion of one part ----------------------------------------------------------------------

@dataclass
class PartResult:
    """One converted component: its model (weights loaded), the source keys it used, what it lacked."""

    name: str
    model: Any
    used: set[str]
    missing: list[str]
    expected: int
    missing_from: dict[str, str] = field(default_factory=dict)  # missing weight -> the source key it needs


def _origin_map(state: dict[str, Any]) -> dict[int, str]:
    """id of each source tensor -> its key, to learn which keys a converter consumed."""
    return {id(v): k for k, v in state.items()}


def _source_of(value: Any, origins: dict[int, str]) -> str | None:
    """The source key a converted tensor came from (converters return the tensor itself or a view of it)."""
    for candidate in (value, getattr(value, "_base", None)):
        if candidate is not None and id(candidate) in origins:
            return origins[id(candidate)]
    return None


def _convert_part(name: str, converted: dict[str, Any], origins: dict[int, str],
                  build: Callable[[], Any], allow_missing: bool) -> PartResult:
    """Check ``converted`` against the model ``build()`` makes and load it (meta tensors when complete)."""
    import torch

    converted = {k: v for k, v in converted.items() if v is not None}
    with torch.device("meta"):
        skeleton = build()
    expected = skeleton.state_dict()
    for key, value in converted.items():
        if key in expected and tuple(expected[key].shape) != tuple(value.shape):
            source = _source_of(value, origins) or key
            raise InputError(
                f"{name}: weight {source} has shape {tuple(value.shape)} but the {name} built from the config "
                f"expects {tuple(expected[key].shape)} for {key}",
                where=source,
                fix="pass --base with the Stable Diffusion 1.5 model the checkpoint was trained on")
    sources = {k: src for k, v in converted.items() if k in expected and (src := _source_of(v, origins))}
    accepted = {k: v.contiguous() for k, v in converted.items() if k in expected}
    missing = sorted(set(expected) - set(accepted))
    if missing and allow_missing:
        model = build()  # real tensors: the missing weights keep their initial values
        model.load_state_dict(accepted, strict=False)
    else:
        model = skeleton
        if not missing:
            model.load_state_dict(accepted, strict=True, assign=True)
    return PartResult(name, model, set(sources.values()), missing, len(expected), _guess_sources(missing, sources))


def _guess_sources(missing: list[str], sources: dict[str, str]) -> dict[str, str]:
    """The source key each missing weight would come from, read off a converted sibling (weight <-> bias)."""
    by_parent = {}
    for target, source in sources.items():
        parent, leaf = target.rsplit(".", 1)
        if source.endswith("." + leaf):
            by_parent.setdefault(parent, source[: -len(leaf)])
    guesses = {}
    for key in missing:
        parent, leaf = key.rsplit(".", 1)
        if parent in by_parent:
            guesses[key] = by_parent[parent] + leaf
    return guesses


def _ldm_layers_per_block(ldm: dict[str, Any], where: str) -> int:
    """Residual layers per resolution level, from the ldm ``input_blocks`` numbering."""
    blocks = {int(k.split(".")[1]) for k in ldm if re.match(r"^input_blocks\.\d+\.", k)}
    if not blocks:
        raise InputError("the guidance module has no input_blocks weights", where=where,
                         fix="pass the AttentionHand checkpoint (its guidance module is stored under VAS.*)")
    levels = 1 + sum(f"input_blocks.{i}.0.op.weight" in ldm for i in blocks)
    per_level, rest = divmod(max(blocks) + 1, levels)
    if rest:
        raise InputError(f"the guidance module's input_blocks 0..{max(blocks)} do not split into {levels} "
                         "resolution levels", where=where, fix="check that the checkpoint is complete")
    return per_level - 1


def infer_controlnet_config(sd: dict[str, Any], layers_per_block: int, defaults: dict[str, Any]) -> dict[str, Any]:
    """A ControlNetModel config: channel counts and layout from the weights, everything else from ``defaults``.

    ``defaults`` supplies what weights cannot tell (group-norm groups, attention heads, ...): SD1.5's
    values, or those of the base model. ``sd`` holds diffusers-named tensors.
    """
    emb = "controlnet_cond_embedding."
    try:
        n_emb = len({k for k in sd if re.match(rf"^{re.escape(emb)}blocks\.\d+\.weight$", k)})
        levels = sorted({int(k.split(".")[1]) for k in sd if k.startswith("down_blocks.")})
        config = dict(defaults)
        config.update(
            in_channels=sd["conv_in.weight"].shape[1],
            conditioning_channels=sd[emb + "conv_in.weight"].shape[1],
            conditioning_embedding_out_channels=[sd[emb + "conv_in.weight"].shape[0]]
            + [sd[f"{emb}blocks.{i}.weight"].shape[0] for i in range(1, n_emb, 2)],
            block_out_channels=[sd[f"down_blocks.{b}.resnets.0.conv1.weight"].shape[0] for b in levels],
            layers_per_block=layers_per_block,
        )
    except KeyError as exc:
        raise InputError(f"the guidance module lacks {exc.args[0]} (diffusers name), needed to infer its shape",
                         where=GUIDANCE_PREFIX + "*", fix="check that the checkpoint is complete") from None
    config["down_block_types"] = [
        "CrossAttnDownBlock2D" if any(k.startswith(f"down_blocks.{b}.attentions.") for k in sd) else "DownBlock2D"
        for b in levels]
    to_k = [v for k, v in sd.items() if k.endswith("attn2.to_k.weight")]
    if to_k:
        config["cross_attention_dim"] = to_k[0].shape[1]
    proj_in = [v for k, v in sd.items() if k.endswith(".proj_in.weight")]
    if proj_in:
        config["use_linear_projection"] = proj_in[0].ndim == 2
    depths = [len({m.group(1) for k in sd if (m := re.match(rf"^down_blocks\.{b}\.attentions\.0\."
                                                               r"transformer_blocks\.(\d+)\.", k))}) or 1
              for b in levels]
    config["transformer_layers_per_block"] = depths[0] if len(set(depths)) == 1 else depths
    return config


def _fix_short_hint_encoder(ldm: dict[str, Any], converted: dict[str, Any]) -> None:
    """Map the last hint-encoder conv to ``conv_out`` when the hint encoder is shorter than SD1.5's.

    diffusers' converter takes ``conv_out`` from ``input_hint_block.14`` (SD1.5: 8 convs, 3 stride-2
    stages). Models with fewer stages (tiny test models, latent factor 2 or 4) end earlier, and the
    converter files their last conv under ``blocks``; move it where the model expects it.
    """
    prefix = "control_model.input_hint_block."
    last = max((int(k[len(prefix):].split(".")[0]) for k in ldm if k.startswith(prefix)), default=14)
    if last >= 14:
        return
    for param in ("weight", "bias"):
        key = f"controlnet_cond_embedding.blocks.{last // 2 - 1}.{param}"
        if key in converted:
            converted[f"controlnet_cond_embedding.conv_out.{param}"] = converted.pop(key)


def _controlnet_defaults(base: Path | None) -> tuple[dict[str, Any], str]:
    """ControlNet config fields weights cannot tell: from the base UNet, or diffusers' SD1.5 defaults."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    with torch.device("meta"):
        if base is None:
            model, origin = ControlNetModel(), "SD1.5 defaults"
        else:
            unet = UNet2DConditionModel.from_config(_read_config(base, "unet"))
            model, origin = ControlNetModel.from_unet(unet, load_weights_from_unet=False), f"base model {base}"
    return {k: v for k, v in model.config.items() if not k.startswith("_")}, origin


def convert_guidance(state: dict[str, Any], origins: dict[int, str], base: Path | None,
                     allow_missing: bool, source: str | Path = "checkpoint") -> tuple[PartResult, str]:
    """``VAS.*`` -> a diffusers ControlNetModel, via diffusers' converter for original ControlNet files.

    ``source`` names the checkpoint file in error messages."""
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import LDM_CONTROLNET_KEY, convert_controlnet_checkpoint

    ldm = {LDM_CONTROLNET_KEY + k[len(GUIDANCE_PREFIX):]: v for k, v in state.items()
           if k.startswith(GUIDANCE_PREFIX)}
    if not ldm:
        raise InputError("the checkpoint holds no guidance module (no VAS.* keys)",
                         where=f"{source}, field state_dict",
                         fix="pass the AttentionHand checkpoint attentionhand.ckpt (sd15_ini.ckpt is the untrained "
                             "starting point and holds no trained guidance module)")
    lpb = _ldm_layers_per_block({k[len(LDM_CONTROLNET_KEY):]: v for k, v in ldm.items()}, GUIDANCE_PREFIX + "*")
    converted = {k: v for k, v in convert_controlnet_checkpoint(ldm, {"layers_per_block": lpb}).items()
                 if v is not None}
    _fix_short_hint_encoder(ldm, converted)
    defaults, origin = _controlnet_defaults(base)
    config = infer_controlnet_config(converted, lpb, defaults)
    try:
        part = _convert_part(GUIDANCE, converted, origins, lambda: ControlNetModel.from_config(config), allow_missing)
    except (ValueError, TypeError) as exc:  # an inconsistent config, e.g. channels not divisible by the groups
        raise InputError(f"the guidance module's inferred config is not buildable: {exc}", where=GUIDANCE_PREFIX + "*",
                         fix="pass --base with the Stable Diffusion 1.5 model the checkpoint was trained on") from None
    return part, origin


def convert_sd_parts(state: dict[str, Any], origins: dict[int, str], base: Path,
                     allow_missing: bool, source: str | Path = "checkpoint") -> list[PartResult]:
    """The SD1.5 UNet, VAE and text encoder, with diffusers' ldm converters and the base model's configs.

    ``source`` names the checkpoint file in error messages."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_cfg, vae_cfg = _read_config(base, "unet"), _read_config(base, "vae")
    text_cfg = CLIPTextConfig.from_pretrained(base / "text_encoder")
    jobs = {
        "unet": (lambda sd: convert_ldm_unet_checkpoint(sd, unet_cfg),
                 lambda: UNet2DConditionModel.from_config(unet_cfg)),
        "vae": (lambda sd: convert_ldm_vae_checkpoint(sd, vae_cfg), lambda: AutoencoderKL.from_config(vae_cfg)),
        "text_encoder": (convert_ldm_clip_checkpoint, lambda: CLIPTextModel(text_cfg)),
    }
    parts = []
    for name, (convert, build) in jobs.items():
        subset = {k: v for k, v in state.items() if k.startswith(SD_PREFIXES[name])}
        if not subset:
            raise InputError(f"the checkpoint holds no {name} weights (no {SD_PREFIXES[name]}* keys)",
                             where=f"{source}, field state_dict",
                             fix="convert without --full (the guidance module alone)")
        parts.append(_convert_part(name, convert(subset), origins, build, allow_missing))
    return parts


# --- accounting and report -----------------------------------------------------------------------

@dataclass
class ConversionReport:
    """What happened to every key of the source checkpoint."""

    source: str
    sha256: str
    full: bool
    config_from: str
    top_level: list[str]
    n_source_keys: int
    parts: dict[str, dict[str, Any]] = field(default_factory=dict)
    ignored: dict[str, dict[str, Any]] = field(default_factory=dict)
    unused: list[str] = field(default_factory=list)

    @property
    def missing(self) -> dict[str, list[str]]:
        return {name: p["missing"] for name, p in self.parts.items() if p["missing"]}

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source, "sha256": self.sha256, "full": self.full, "config_from": self.config_from,
            "top_level_entries_ignored": self.top_level, "source_keys": self.n_source_keys,
            "converted_keys": sum(p["converted"] for p in self.parts.values()),
            "ignored_keys": sum(i["count"] for i in self.ignored.values()),
            "unused_keys": len(self.unused), "parts": self.parts, "ignored": self.ignored,
            "unused": self.unused, "missing": self.missing,
        }


def account(state: dict[str, Any], parts: list[PartResult], full: bool) -> tuple[dict, dict, list[str]]:
    """Sort every source key into converted (per part), ignored (per pattern) or unused."""
    used = set().union(*(p.used for p in parts))
    patterns = IGNORED + ([] if full else [LOCKED_SD])
    ignored: dict[str, dict[str, Any]] = {}
    unused = []
    for key in sorted(state):
        if key in used:
            continue
        hit = next(((pat, why) for pat, why in patterns if re.search(pat, key)), None)
        if hit is None:
            unused.append(key)
        else:
            entry = ignored.setdefault(hit[0], {"reason": hit[1], "count": 0})
            entry["count"] += 1
    summary = {p.name: {"converted": len(p.used), "expected": p.expected, "missing": p.missing,
                        "missing_from": p.missing_from} for p in parts}
    return summary, ignored, unused


# --- output ----------------------------------------------------------------------------------------

def _write_output(tmp: Path, parts: list[PartResult], base: Path | None, full: bool) -> None:
    for part in parts:
        part.model.save_pretrained(tmp / part.name)
    if full and base is not None:
        for sub in ("tokenizer", "scheduler"):
            if not (base / sub).is_dir():
                raise MissingResourceError(f"the base model has no {sub}/ folder", where=base,
                                           fix="pass a complete Stable Diffusion 1.5 folder or id with --base")
            shutil.copytree(base / sub, tmp / sub)
        write_json_atomic(tmp / "model_index.json", _model_index(base))


def _model_index(base: Path) -> dict[str, Any]:
    """model_index.json of an AttentionHandPipeline folder; tokenizer and scheduler classes as in the base."""
    import diffusers

    index_path = base / "model_index.json"
    base_index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    return {
        "_class_name": "AttentionHandPipeline",
        "_diffusers_version": diffusers.__version__,
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": base_index.get("tokenizer", ["transformers", "CLIPTokenizer"]),
        "unet": ["diffusers", "UNet2DConditionModel"],
        "controlnet": ["diffusers", "ControlNetModel"],
        "scheduler": base_index.get("scheduler", ["diffusers", "DDIMScheduler"]),
    }


# What a conversion folder may hold: --overwrite replaces only a folder of nothing else.
CONVERTED_ENTRIES = {REPORT, "model_index.json", GUIDANCE, *SD_PREFIXES, "tokenizer", "scheduler"}


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` that exists, unless ``overwrite`` and it is a folder an earlier conversion wrote
    (a readable conversion report and nothing but conversion output); a plain file is never replaced."""
    if not (out.exists() or out.is_symlink()):
        return
    if out.is_symlink() or not out.is_dir():
        raise OutputError("--out names a file, not a folder; convert never replaces a file", where=out,
                          fix="choose another --out, or move the file away")
    if not overwrite:
        raise OutputError("the output folder already exists", where=out, fix="pass --overwrite or another --out")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in CONVERTED_ENTRIES)
    try:
        report = json.loads((out / REPORT).read_text(encoding="utf-8"))
        ours = isinstance(report, dict) and {"source", "sha256", "parts"} <= set(report)
    except (OSError, ValueError):
        ours = False
    if not ours or foreign:
        why = f"it holds '{foreign[0]}'" if ours else f"it has no readable {REPORT}"
        raise OutputError(f"--overwrite replaces only a folder an earlier `handsynth convert` wrote, and {out} is "
                          f"not one ({why})", where=out,
                          fix="choose another --out, or move the folder's contents away yourself")


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` folder to ``out``; an old ``out`` (checked again) is removed only after the
    swap."""
    check_out(out, overwrite)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.{secrets.token_hex(8)}.tmp")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old)


def convert_checkpoint(ckpt: str | Path, out: str | Path, *, full: bool = False, base: str | None = None,
                       overwrite: bool = False, allow_missing: bool = False) -> ConversionReport:
    """Convert ``ckpt`` into ``out`` (``controlnet/`` [+ SD parts]) and write ``conversion_report.json``.

    Raises InputError when a part lacks weights (unless ``allow_missing``: they keep their initial
    values, zero for the guidance module's output convolutions) and OutputError when ``out`` exists
    (unless ``overwrite``). ``full`` without ``base`` uses the default SD1.5 model id, which must be
    in the Hugging Face cache (or downloadable). Nothing is written to ``out`` unless the whole conversion succeeds.
    """
    ckpt, out = Path(ckpt), Path(out)
    if full and base is None:
        base = DEFAULT_BASE_MODEL
    check_out(out, overwrite)
    state, top_level = load_checkpoint(ckpt)
    tensors = {k: v for k, v in state.items() if hasattr(v, "shape")}
    base_dir = resolve_base(base) if base is not None else None
    origins = _origin_map(tensors)
    guidance, config_from = convert_guidance(tensors, origins, base_dir, allow_missing, ckpt)
    parts = [guidance] + (convert_sd_parts(tensors, origins, base_dir, allow_missing, ckpt) if full else [])
    summary, ignored, unused = account(state, parts, full)
    report = ConversionReport(str(ckpt), sha256_file(ckpt), full, config_from, top_level, len(state),
                              summary, ignored, unused)
    if report.missing and not allow_missing:
        listed = [f"{name} {key}" + (f" (from {p['missing_from'][key]})" if key in p["missing_from"] else "")
                  for name, p in report.parts.items() for key in p["missing"]]
        raise InputError(
            f"the checkpoint lacks {len(listed)} weight(s) the converted model needs (diffusers names): "
            + ", ".join(listed[:8]) + (", ..." if len(listed) > 8 else ""),
            where=ckpt, fix="use a complete checkpoint, or pass --allow-missing to keep those weights at their "
                            "initial values (listed in conversion_report.json)")
    ensure_writable_dir(out.parent, what="folder that holds --out")
    lock = rundir.Lock(out.parent / f".{out.name}.lock")
    if not lock.acquire(sys.argv):
        raise rundir.busy(out, lock)
    with lock:
        for stray in out.parent.glob(f".{out.name}.*.tmp"):     # left by a killed conversion
            shutil.rmtree(stray, ignore_errors=True)
        tmp = out.parent / f".{out.name}.{secrets.token_hex(8)}.tmp"
        tmp.mkdir()                 # default permissions (0o777 less the umask), unlike mkdtemp's 0o700
        try:
            _write_output(tmp, parts, base_dir, full)
            write_json_atomic(tmp / REPORT, report.to_json())
            _publish(tmp, out, overwrite)
        except OSError as exc:
            raise OutputError(f"cannot write the converted model: {exc.strerror or exc}", where=out,
                              fix="free disk space or choose another --out; nothing was written to --out") from None
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    return report

"""``handsynth doctor``: check what a run needs and say how to provide each missing piece."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from handsynth.console import stdout
from handsynth.hub import DEFAULT_BASE_MODEL, DEFAULT_GUIDANCE, local_files_only, looks_like_path


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


def check_renderer() -> Check:
    from handsynth.render.backend import configure_platform

    platform = configure_platform()
    try:
        import numpy as np

        from handsynth.render.renderer import HandRenderer, View

        # a tetrahedron 0.5 m in front of a 32x32 camera must cover the image centre
        vertices = np.array([[0, 0, 0.45], [0.1, -0.1, 0.55], [-0.1, -0.1, 0.55], [0, 0.1, 0.55]])
        faces = np.array([[0, 1, 2], [0, 2, 3], [0, 3, 1], [1, 3, 2]])
        K = np.array([[40.0, 0, 15.5], [0, 40.0, 15.5], [0, 0, 1]])
        (image,) = HandRenderer().render([(vertices, faces)], [View(K, (32, 32))])
        if not image.mask[16, 16]:
            raise RuntimeError("a test mesh rendered as an empty image")
        return Check("renderer", True, f"pyrender offscreen via {platform}")
    except Exception as exc:  # any failure to create a GL context lands here
        return Check(
            "renderer", False, f"pyrender could not render through {platform}: {exc}",
            "install Mesa's EGL (Debian/Ubuntu: apt-get install libegl1 libgl1-mesa-dri) or set "
            "PYOPENGL_PLATFORM=osmesa with libosmesa6 and PyOpenGL>=3.1.4",
        )


def check_mano(mano_dir: Optional[Path]) -> Check:
    from handsynth.errors import HandsynthError
    from handsynth.hand_model import load_mano_arrays, resolve_mano_dir

    try:
        root = resolve_mano_dir(mano_dir)
        sides = [load_mano_arrays(root, side)["path"].name for side in ("right", "left")]
    except HandsynthError as exc:
        return Check("MANO model", False, exc.what + (f" ({exc.where})" if exc.where else ""), exc.fix or "")
    return Check("MANO model", True, f"{', '.join(sides)} in {root}")


def check_gpu() -> Check:
    import torch

    if not torch.cuda.is_available():
        return Check("GPU", False, f"no CUDA device visible to torch {torch.__version__} "
                     "(rendering runs on the CPU; generation at real sizes needs a GPU)",
                     "on a GPU machine run HANDSYNTH_TORCH=cuda ./setup.sh in a fresh venv", required=False)
    name = torch.cuda.get_device_name(0)
    dtypes = ["fp16"] + (["bf16"] if torch.cuda.is_bf16_supported() else [])
    mem = torch.cuda.get_device_properties(0).total_memory / 2**30
    return Check("GPU", True, f"{name}, {mem:.0f} GiB, dtypes {'/'.join(dtypes)}")


def check_model(model: str) -> Check:
    path = Path(model).expanduser()
    if looks_like_path(model) and not path.exists():
        return Check(f"model {model}", False, "no such folder",
                     "pass the folder a diffusers save_pretrained wrote, or a hub id such as "
                     f"{DEFAULT_BASE_MODEL}")
    if path.exists():
        ok = (path / "model_index.json").exists() or (path / "config.json").exists()
        return Check(f"model {model}", ok, "local folder" + ("" if ok else " without model_index.json/config.json"),
                     "point to a folder written by save_pretrained (diffusers layout)")
    try:
        from huggingface_hub import snapshot_download

        where = snapshot_download(model, local_files_only=True, allow_patterns=["model_index.json", "config.json"])
        return Check(f"model {model}", True, f"in the Hugging Face cache ({where})")
    except Exception:
        pass
    if local_files_only(model):
        return Check(f"model {model}", False, "not in the local Hugging Face cache, and the hub cannot be reached "
                     "(no network, or HF_HUB_OFFLINE=1)",
                     f"on a machine with internet run `huggingface-cli download {model}` and copy the cache "
                     "(~/.cache/huggingface) here, or pass a local folder")
    return Check(f"model {model}", False, "not cached locally (it would be downloaded on first use)",
                 f"run `huggingface-cli download {model}` once, or pass a local diffusers folder", required=False)


def check_guidance(guidance: str) -> Check:
    """Whether the guidance module generate would load (a recipe's model.guidance) is here: anything
    ``loading.resolve_guidance`` accepts (converted folder or its controlnet/, ControlNet folder, hub id in the
    local cache, original-format .safetensors file, none)."""
    from handsynth.attentionhand.loading import hint_shapes, missing_guidance, resolve_guidance
    from handsynth.errors import HandsynthError

    name = f"guidance module {guidance}"
    try:
        source = resolve_guidance(guidance)
        if source.kind == "single-file":
            channels, widths = hint_shapes(Path(source.location))
            return Check(name, True, f"{source.describe()}; {channels}-channel condition, hint encoder "
                                     f"{'/'.join(map(str, widths))}")
    except HandsynthError as exc:
        return Check(name, False, exc.what + (f" ({exc.where})" if exc.where else ""), exc.fix or "")
    if source.kind == "hub":
        hub = check_model(source.location)
        if hub.ok or not hub.required:
            return Check(name, hub.ok, f"hub ControlNet: {hub.detail}", hub.fix, hub.required)
        error = missing_guidance(source, RuntimeError(hub.detail))   # the advice for a folder and for a hub id
        return Check(name, False, f"no such folder ({Path(guidance).resolve()}), and no hub ControlNet of that name "
                                  "in the local Hugging Face cache (generate would stop with exit code 3)",
                     error.fix or "")
    if source.kind in ("folder", "pipeline"):
        return Check(name, True, f"local folder: {source.describe()}")
    return Check(name, True, source.describe())


def check_inception() -> Check:
    from handsynth.evaluate.inception import INCEPTION_FILE, find_weights, weights_hint

    found = find_weights(None)
    if found is None:
        return Check("Inception weights (evaluate: FID/KID)", False, f"{INCEPTION_FILE} is not in torch hub's cache",
                     weights_hint(), required=False)
    return Check("Inception weights (evaluate: FID/KID)", True, str(found))


def check_hand_model() -> Check:
    from handsynth.evaluate.landmarker import build_hint, find_hand_model, mediapipe_version

    name = "hand model (evaluate: hand confidence, keypoint errors)"
    if mediapipe_version() is None:
        return Check(name, False, "mediapipe is not installed", "pip install 'handsynth[eval]'", required=False)
    found = find_hand_model(None)
    if found is None:
        return Check(name, False, "no hand_landmarker.task built yet", build_hint(), required=False)
    return Check(name, True, f"{found} (mediapipe {mediapipe_version()})")


def check_disk(path: Path, need_gib: float = 5.0) -> Check:
    path = path if path.exists() else Path.cwd()
    free = shutil.disk_usage(path).free / 2**30
    return Check("disk", free >= need_gib, f"{free:.1f} GiB free at {path.resolve()}",
                 f"free space or choose another --out: a 10k-image run needs about {need_gib:.0f} GiB")


def doctor(
    mano_dir: Annotated[Optional[Path], typer.Option(help="Folder with MANO_RIGHT.pkl/MANO_LEFT.pkl "
                                                     "(default: $HANDSYNTH_MANO_DIR).")] = None,
    model: Annotated[str, typer.Option(help="Base Stable Diffusion 1.5 model id or folder.")] = DEFAULT_BASE_MODEL,
    guidance: Annotated[str, typer.Option(
        help="Guidance module: converted AttentionHand folder, ControlNet folder or hub id, original-format "
             ".safetensors ControlNet file, or none.")] = DEFAULT_GUIDANCE,
    recipe: Annotated[Optional[Path], typer.Option(
        help="Check the base model and guidance this recipe names (instead of --model / --guidance).")] = None,
    out: Annotated[Path, typer.Option(help="Where outputs will go (for the disk check).")] = Path("."),
) -> None:
    """Check the renderer, MANO files, GPU, base model, guidance module, evaluation models and disk space; say how
    to fix what is missing."""
    if recipe is not None:
        from handsynth.prompts.recipe import load_recipe

        loaded = load_recipe(recipe)
        model, guidance = loaded.model.base, loaded.model.guidance
    checks: list[Callable[[], Check]] = [
        check_renderer, lambda: check_mano(mano_dir), check_gpu, lambda: check_model(model),
        lambda: check_guidance(guidance), check_inception, check_hand_model, lambda: check_disk(out),
    ]
    failed = 0
    for make in checks:
        c = make()
        word, style = ("ok", "green") if c.ok else (("MISSING", "red") if c.required else ("warn", "yellow"))
        stdout.print(f"[{style}]{word:>7}[/{style}]  [bold]{c.name}[/bold]: {c.detail}", soft_wrap=True)
        if not c.ok:
            stdout.print(f"{'':>9}fix: {c.fix}", soft_wrap=True)
            failed += c.required
    if failed:
        stdout.print(f"{failed} required piece(s) missing.")
        raise typer.Exit(1)
    stdout.print("everything a run needs is in place.")

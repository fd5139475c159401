"""Generation throughput of AttentionHandPipeline, with and without TAS, on random SD1.5-size weights.

Builds the Stable Diffusion 1.5 architecture (UNet, guidance module from it, VAE, CLIP ViT-L/14 text
encoder) from configs written below with random weights - nothing is downloaded - and times
``--repeats`` generations per batch size at 512x512 (``--size WxH`` for other frames, e.g. 336x512 as
``image.fit: native`` makes of a 334x512 source), 20 DDIM steps, TAS off and TAS on (first 10
steps, one update each), off and on interleaved (one generation each, in alternating order) so that
both see the same machine load. The TAS share is ``1 - t_off / t_on``, the fraction of a TAS-on
generation spent in TAS.

    python benchmarks/generate.py                       # CUDA, fp16, batch sizes 1 and 4
    python benchmarks/generate.py --dtype bf16 --local  # bf16, global + local branch
    python benchmarks/generate.py --device cpu --tiny   # tiny models (64x64) on CPU, same schedule
    python benchmarks/generate.py --device cpu --tiny --threads 1 --batch-sizes 1   # the README's CPU figure

Output, one line per batch size (parsed by tests/test_pipeline.py), then the median over the repeats of
(TAS-on time / TAS-off time), all batch sizes together:
    batch=4 tas_off_images_per_s=1.2345 tas_on_images_per_s=0.8765 tas_time_share=0.2900
    tas_ratio: 1.4100

``--mode scale`` measures, on the same components, TAS off and the global branch only, interleaved per
repeat: AttentionHandPipeline vs diffusers' StableDiffusionControlNetPipeline (same steps, size, batch,
guidance scale, output tensors), and ``handsynth generate``'s worker end to end (reading and decoding
mesh image files, generating, encoding and writing JPEGs and sample files: Runner.run with its read-ahead
thread and writer pool) vs the pipeline alone on the same prompts and in-memory mesh images (PIL output).
GPU options (``--channels-last``, ``--vae-bf16``, ``--fuse-qkv``, ``--compile``; see
handsynth.attentionhand.speed) apply to the shared components, so both pipelines get them:

    python benchmarks/generate.py --mode scale --dtype bf16 --batch-sizes 1 8 16 --peak-tflops 989
    python benchmarks/generate.py --mode scale --device cpu --tiny --steps 4      # the script itself, on CPU

    batch=8 handsynth_images_per_s=2.1 diffusers_images_per_s=2.0 end_to_end_images_per_s=2.05 pipeline_images_per_s=2.1 flop_share=0.31
    pipeline_vs_diffusers: 1.0100
    end_to_end_vs_pipeline: 0.9800

(ratios: medians over batch sizes and repeats of the per-repeat speed ratios; ``flop_share`` only with
``--peak-tflops``: images/s x FLOP per image / peak, FLOP per image from the SD1.5 count below.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from handsynth.attentionhand.guidance import build_guidance_module, freeze  # noqa: E402
from handsynth.attentionhand.pipeline import AttentionHandPipeline  # noqa: E402
from handsynth.attentionhand.tas import TASConfig  # noqa: E402

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1,
)
SD15_VAE = dict(
    sample_size=512, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32, act_fn="silu", scaling_factor=0.18215,
)
CLIP_VIT_L14_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                      set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)
# The tiny stand-ins of tests/fixtures/diffusion.py (latent = image / 2).
TINY_UNET = dict(
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
)
TINY_VAE = dict(
    sample_size=64, in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
)
TINY_TEXT = dict(CLIP_VIT_L14_TEXT, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                 num_attention_heads=4, projection_dim=32, hidden_act="gelu")

PROMPT = "The woman is holding a pink umbrella with her hand."
HAND_TOKENS = [4, 10]  # "holding", "hand" with the real CLIP vocabulary


def clip_tokenizer(workdir: Path):
    """The real CLIP tokenizer from open_clip's BPE file when one is at hand, else a character-level stand-in
    (same special tokens and length; token positions then differ, which does not change the timing)."""
    from handsynth.tokenizer import build_clip_tokenizer, load_clip_tokenizer

    cache = Path(os.environ.get("HANDSYNTH_TEST_CACHE", Path.home() / ".cache" / "handsynth-tests"))
    bpe = Path(os.environ.get("HANDSYNTH_CLIP_BPE", cache / "bpe_simple_vocab_16e6.txt.gz"))
    if bpe.exists():
        return load_clip_tokenizer(build_clip_tokenizer(bpe, workdir / "tokenizer"))
    print(f"note: {bpe} not found, using a character-level stand-in tokenizer", file=sys.stderr)
    symbols = [chr(c) for c in range(33, 127)]
    folder = workdir / "tokenizer"
    folder.mkdir()
    vocab = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer"}))
    return load_clip_tokenizer(folder)


def build_pipeline(tiny: bool, device: str, dtype: torch.dtype, workdir: Path) -> AttentionHandPipeline:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.utils import logging
    from transformers import CLIPTextConfig, CLIPTextModel

    logging.set_verbosity_error()  # casting random-weight models with .to(dtype) is intended here
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET))
        vae = AutoencoderKL(**(TINY_VAE if tiny else SD15_VAE))
        text_encoder = CLIPTextModel(CLIPTextConfig(**(TINY_TEXT if tiny else CLIP_VIT_L14_TEXT)))
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    controlnet = build_guidance_module(unet, vae_factor)
    modules = [m.to(dtype=dtype) for m in (unet, vae, text_encoder, controlnet)]
    freeze(*modules)
    return AttentionHandPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(workdir), unet=unet,
                                 controlnet=controlnet, scheduler=DDIMScheduler(**SD15_SCHEDULER))


def timed(pipe, batch: int, size: tuple[int, int], steps: int, tas: TASConfig | None, local: bool, repeats: int,
          device: str) -> float:
    """Seconds for ``repeats`` generations of ``batch`` images of ``size`` (W, H)."""
    rng = np.random.default_rng(0)
    meshes = [rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8) for _ in range(batch)]
    kwargs = dict(local_mesh_image=meshes if local else None, hand_token_indices=[HAND_TOKENS] * batch,
                  num_inference_steps=steps, tas=tas, height=size[1], width=size[0], output_type="pt")
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    for r in range(repeats):
        gens = [torch.Generator(device).manual_seed(1000 * r + i) for i in range(batch)]
        pipe([PROMPT] * batch, meshes, generator=gens, **kwargs)
    sync()
    return time.perf_counter() - start


# FLOP of one SD1.5 512x512 image (FlopCounterMode, see issue 9): UNet 0.80 + guidance module 0.28 TFLOP per
# latent row and step (classifier-free guidance: 2 rows), VAE decode 2.5 TFLOP; scaled with the pixel count.
UNET_GUIDANCE_TFLOP_PER_ROW_STEP, VAE_DECODE_TFLOP = 0.80 + 0.28, 2.5


def flop_per_image(steps: int, size: tuple[int, int]) -> float:
    return 1e12 * (2 * steps * UNET_GUIDANCE_TFLOP_PER_ROW_STEP + VAE_DECODE_TFLOP) * size[0] * size[1] / 512**2


def diffusers_pipeline(pipe):
    """diffusers' StableDiffusionControlNetPipeline on the same component objects as ``pipe``."""
    from diffusers import StableDiffusionControlNetPipeline

    return StableDiffusionControlNetPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
        controlnet=pipe.controlnet, scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def end_to_end_setup(workdir: Path, batch: int, size: tuple[int, int], steps: int, device: str, pipe):
    """A generate worker (Runner) over ``batch`` mesh image files, and the same work for the pipeline alone."""
    from PIL import Image

    from handsynth.generate.plan import FrameInput, Inputs
    from handsynth.generate.runner import Job, Runner
    from handsynth.prompts.recipe import Recipe

    rng = np.random.default_rng(1)
    frames = []
    for i in range(batch):
        path = workdir / "meshes" / f"f{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        frames.append(FrameInput(key=f"f{i:05d}", mesh=path, mesh_ref=str(path), text=PROMPT))
    recipe = Recipe(sampler={"steps": steps}, tas={"enabled": False}, batch_size=batch,
                    image={"size": size[0], "fit": "stretch", "format": "jpg"})
    inputs = Inputs(kind="modalities", path=workdir, frames=frames, sha256="-", record={})
    counter = [0]

    def end_to_end() -> None:        # a fresh run directory each time: every sample is generated and written
        counter[0] += 1
        out = workdir / f"run{counter[0]}"
        out.mkdir()
        runner = Runner(Job(recipe, inputs, out, 0, batch, batch, "fp32"), device, pipe)
        for _ in runner.run(range(1)):
            pass

    meshes = [Image.open(f.mesh).convert("RGB") for f in frames]
    runner = Runner(Job(recipe, inputs, workdir, 0, batch, batch, "fp32"), device, pipe)
    specs = [runner.plan(i) for i in range(batch)]

    def alone() -> None:
        runner._call(specs, meshes, [s.seed for s in specs], size)

    return end_to_end, alone


def scale_mode(args, pipe, size: tuple[int, int], workdir: Path) -> int:
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    sd = diffusers_pipeline(pipe)
    sd.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)

    def clock(fn) -> float:
        sync()
        t = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t

    ratios_sd, ratios_e2e = [], []
    for batch in args.batch_sizes:
        meshes = [rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8) for _ in range(batch)]
        gens = lambda: [torch.Generator(args.device).manual_seed(i) for i in range(batch)]  # noqa: E731
        common = dict(num_inference_steps=args.steps, guidance_scale=9.0, height=size[1], width=size[0],
                      output_type="pt")
        ours = lambda: pipe([PROMPT] * batch, meshes, generator=gens(), tas=None, **common)  # noqa: E731
        theirs = lambda: sd([PROMPT] * batch, [Image.fromarray(m) for m in meshes], generator=gens(),  # noqa: E731
                            negative_prompt=[""] * batch, eta=0.0, controlnet_conditioning_scale=1.0, **common)
        end_to_end, alone = end_to_end_setup(workdir / f"b{batch}", batch, size, args.steps, args.device, pipe)
        for fn in (ours, theirs, end_to_end, alone):                     # warm-up
            fn()
        times = {name: [] for name in ("ours", "theirs", "e2e", "alone")}
        for r in range(args.repeats):
            order = [("ours", ours), ("theirs", theirs), ("e2e", end_to_end), ("alone", alone)]
            for name, fn in order if r % 2 == 0 else order[::-1]:
                times[name].append(clock(fn))
        t = {name: np.asarray(v) for name, v in times.items()}
        ratios_sd += list(t["theirs"] / t["ours"])
        ratios_e2e += list(t["alone"] / t["e2e"])
        speed = {name: batch * args.repeats / v.sum() for name, v in t.items()}
        line = (f"batch={batch} handsynth_images_per_s={speed['ours']:.4f} diffusers_images_per_s="
                f"{speed['theirs']:.4f} end_to_end_images_per_s={speed['e2e']:.4f} "
                f"pipeline_images_per_s={speed['alone']:.4f}")
        if args.peak_tflops:
            line += f" flop_share={speed['ours'] * flop_per_image(args.steps, size) / (args.peak_tflops * 1e12):.4f}"
        print(line, flush=True)
    print(f"pipeline_vs_diffusers: {float(np.median(ratios_sd)):.4f}")
    print(f"end_to_end_vs_pipeline: {float(np.median(ratios_e2e)):.4f}")
    return 0


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not WxH, e.g. 336x512") from None
    if w % 8 or h % 8 or w < 8 or h < 8:
        raise argparse.ArgumentTypeError(f"{text}: both sides must be positive multiples of 8")
    return w, h


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny random models (64x64) instead of SD1.5 size")
    ap.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="default: fp16 on CUDA, fp32 on CPU")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    ap.add_argument("--tas-steps", type=int, default=10, help="TAS during the first K steps (default 10)")
    ap.add_argument("--repeats", type=int, default=3, help="timed generations per setting (default 3)")
    ap.add_argument("--local", action="store_true", help="also run the local branch (2 images per sample)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 on a busy shared CPU)")
    ap.add_argument("--size", type=_size, help="generated frame WxH, multiples of 8 (default 512x512; tiny: 64x64)")
    ap.add_argument("--mode", choices=["tas", "scale"], default="tas",
                    help="tas: TAS off vs on (default); scale: vs diffusers, end to end vs the pipeline alone")
    ap.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s at --dtype, for flop_share")
    ap.add_argument("--channels-last", action="store_true", help="UNet, guidance module and VAE in NHWC")
    ap.add_argument("--vae-bf16", action="store_true", help="decode with the VAE in bf16")
    ap.add_argument("--fuse-qkv", action="store_true", help="fused QKV projections (scale mode: TAS is off)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet and the guidance module")
    args = ap.parse_args(argv)

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device is visible to torch; this benchmark needs a GPU. To check the script itself "
              "on CPU run: python benchmarks/generate.py --device cpu --tiny", file=sys.stderr)
        return 2
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[
        args.dtype or ("fp16" if args.device.startswith("cuda") else "fp32")]
    if args.threads:
        torch.set_num_threads(args.threads)
    steps, tas_steps, repeats = args.steps, args.tas_steps, args.repeats
    size = args.size or ((64, 64) if args.tiny else (512, 512))
    tas = TASConfig(max_steps=tas_steps)

    from handsynth.attentionhand import speed

    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_pipeline(args.tiny, args.device, dtype, Path(tmp))
        speed.apply(pipe, channels_last=args.channels_last, vae_dtype=torch.bfloat16 if args.vae_bf16 else None,
                    fuse_qkv=args.fuse_qkv, compile=args.compile)
        pipe.set_progress_bar_config(disable=True)
        name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
        options = [o for o in ("channels_last", "vae_bf16", "fuse_qkv", "compile") if getattr(args, o)]
        print(f"device={name} dtype={dtype} size={size[0]}x{size[1]} steps={steps} tas_steps={tas_steps} "
              f"repeats={repeats} local={args.local} {'tiny' if args.tiny else 'sd15'} mode={args.mode} "
              f"options={','.join(options) or 'none'}")
        if args.mode == "scale":
            return scale_mode(args, pipe, size, Path(tmp))
    t_off = np.zeros((len(args.batch_sizes), repeats))
    t_on = np.zeros_like(t_off)
    for b, batch in enumerate(args.batch_sizes):
        # warm-up (kernel selection, allocator, autograd): one TAS-on generation
        timed(pipe, batch, size, steps, tas, args.local, 1, args.device)
        for r in range(repeats):
            order = [(t_off, None), (t_on, tas)]
            for times, setting in order if r % 2 == 0 else order[::-1]:
                times[b, r] = timed(pipe, batch, size, steps, setting, args.local, 1, args.device)
        n = batch * repeats
        off, on = t_off[b].sum(), t_on[b].sum()
        print(f"batch={batch} tas_off_images_per_s={n / off:.4f} tas_on_images_per_s={n / on:.4f} "
              f"tas_time_share={1 - off / on:.4f}", flush=True)
    if args.device.startswith("cuda"):
        print(f"peak_gpu_memory_gib={torch.cuda.max_memory_allocated() / 2**30:.2f}")
    print(f"tas_ratio: {float(np.median(t_on.sum(axis=0) / t_off.sum(axis=0))):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

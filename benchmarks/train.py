"""Training throughput and peak memory of ``handsynth train``'s step, on random SD1.5-size weights.

Builds the SD1.5 architecture with random weights exactly as benchmarks/generate.py does (nothing is
downloaded), a fresh guidance module (float32, trained) and synthetic 512x512 samples with hand words, and
times full optimiser steps (handsynth.train.step.training_loss: VAE encoding of both branches, TAS on both
noisy latents, guidance module + UNet, backward, AdamW) under the chosen mixed precision. Each batch size
runs TAS-off and TAS-on steps interleaved; the reference is the TAS-off step of the same run, so
``tas_ratio`` (TAS-on time / TAS-off time) is comparable across machines.

    python benchmarks/train.py                                  # CUDA, fp16 mixed precision, batch 1 + largest
    python benchmarks/train.py --dtype bf16 --checkpointing     # bf16, gradient checkpointing
    python benchmarks/train.py --device cpu --tiny              # tiny models (64x64) on CPU, same code path

Output, one line per batch size, then the largest batch that fitted (CUDA; found by doubling until out of
memory, up to --max-batch):
    batch=1 steps_per_s=1.2345 samples_per_s=1.2345 tas_off_steps_per_s=2.3456 tas_ratio=1.9000 peak_memory_gib=12.34
    largest_batch: 8
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from handsynth.attentionhand.tas import AttentionStore, TASConfig, tas_processors  # noqa: E402
from handsynth.prompts.templates import Prompt  # noqa: E402
from handsynth.train.data import Sample  # noqa: E402
from handsynth.train.step import Models, alphas_cumprod, training_loss  # noqa: E402

_spec = importlib.util.spec_from_file_location("generate_benchmark", Path(__file__).with_name("generate.py"))
generate_benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate_benchmark)


def samples(batch: int, size: int, seed: int) -> list[Sample]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(batch):
        def image():
            return torch.rand((3, size, size), generator=gen)
        out.append(Sample(key=f"s{i}", position=seed * 1000 + i, rgb=image() * 2 - 1, mesh=image(),
                          local_rgb=image() * 2 - 1, local_mesh=image(), prompt=Prompt(generate_benchmark.PROMPT, ()),
                          token_indices=list(generate_benchmark.HAND_TOKENS)))
    return out


def peak_memory_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20       # Linux: KiB


def timed_steps(models, optimizer, batch: int, size: int, steps: int, tas_iterations: int, autocast, device: str):
    """Seconds per optimiser step, TAS off and on interleaved (after one warm-up step of each)."""
    on = TASConfig(iterations=tas_iterations, attention_res=16)     # SD1.5 at 512 and the tiny UNet at 64
    off = TASConfig(enabled=False)
    times = {"off": [], "on": []}
    for k in range(steps + 1):
        for name, tas in (("off", off), ("on", on)):
            data = samples(batch, size, k)
            generators = [torch.Generator(device).manual_seed(s.position) for s in data]
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            with tas_processors(models.unet, models.store), autocast():
                loss = training_loss(models, data, generators, tas).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if k:
                times[name].append(time.perf_counter() - start)
    return float(np.median(times["off"])), float(np.median(times["on"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp16",
                        help="mixed precision: frozen weights in this type, the guidance module in float32")
    parser.add_argument("--tiny", action="store_true", help="tiny models at 64x64 (for CPUs and tests)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per batch size and TAS setting")
    parser.add_argument("--tas-iterations", type=int, default=1, help="TAS updates per step (the recipe: 50)")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device: pass --device cpu --tiny")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    if args.device == "cpu" and dtype == torch.float16:
        dtype = torch.float32                                   # CPU autocast has no useful float16
    size = 64 if args.tiny else 512
    with tempfile.TemporaryDirectory() as workdir:
        pipe = generate_benchmark.build_pipeline(args.tiny, args.device, dtype, Path(workdir))
    controlnet = pipe.controlnet.float().train().requires_grad_(True)
    if args.checkpointing:
        controlnet.enable_gradient_checkpointing()
        pipe.unet.enable_gradient_checkpointing()
    models = Models(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
                    controlnet=controlnet, alphas_cumprod=alphas_cumprod(pipe.scheduler.config), weight_dtype=dtype,
                    store=AttentionStore(16))
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=1e-5)

    def autocast():
        if dtype == torch.float32:
            return torch.autocast(args.device.split(":")[0], enabled=False)
        return torch.autocast(args.device.split(":")[0], dtype=dtype)

    batch, largest = 1, None
    while batch <= args.max_batch:
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            off, on = timed_steps(models, optimizer, batch, size, args.steps, args.tas_iterations, autocast,
                                  args.device)
        except torch.cuda.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            break
        largest = batch
        print(f"batch={batch} steps_per_s={1 / on:.4f} samples_per_s={batch / on:.4f} "
              f"tas_off_steps_per_s={1 / off:.4f} tas_ratio={on / off:.4f} "
              f"peak_memory_gib={peak_memory_gib(args.device):.2f}", flush=True)
        if not args.device.startswith("cuda"):
            break                                               # the CPU path: batch 1 only
        batch *= 2
    print(f"largest_batch: {largest}")


if __name__ == "__main__":
    main()

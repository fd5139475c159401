"""AttentionHandPipeline on tiny random components: equivalence with SD, per-sample determinism, branches,
TAS at inference, save/load round trips, loading errors and the benchmark script's tiny mode."""

import importlib.util
import re
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableDiffusionPipeline

from handsynth.attentionhand.loading import load_pipeline
from handsynth.attentionhand.pipeline import AttentionHandPipeline
from handsynth.attentionhand.tas import TASConfig
from handsynth.errors import MissingResourceError
from tests.fixtures.attentionhand_pipeline import make_pipeline, mesh_images

PROMPTS = ["The woman is holding a pink umbrella with her hand.", "a man waving his hands",
           "a child pointing at a kite", "two hands on a table"]
TOKENS = [[4, 10], [3, 5], [3], [2]]
FAST = dict(num_inference_steps=2, output_type="np")


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_fresh_guidance_equals_stable_diffusion(clip_tokenizer_dir):
    pipe = make_pipeline(clip_tokenizer_dir, trained=False)
    sd = StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                 unet=pipe.unet, scheduler=pipe.scheduler, safety_checker=None,
                                 feature_extractor=None, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    ours = pipe(PROMPTS[:2], mesh_images(2), generator=gens(1, 2), **FAST).images
    theirs = sd(PROMPTS[:2], generator=gens(1, 2), guidance_scale=9.0, height=64, width=64, **FAST).images
    assert ours.shape == (2, 64, 64, 3)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_batch_equals_single_runs_and_mesh_matters(ah_pipe):
    meshes = mesh_images(4)
    batch = ah_pipe(PROMPTS, meshes, generator=gens(10, 11, 12, 13), **FAST).images
    for i in range(4):
        single = ah_pipe(PROMPTS[i], meshes[i], generator=gens(10 + i), **FAST).images
        np.testing.assert_allclose(batch[i], single[0], atol=1e-5)
    other_mesh = ah_pipe(PROMPTS[0], meshes[1], generator=gens(10), **FAST).images
    assert np.abs(other_mesh[0] - batch[0]).max() > 1e-3


def test_ancestral_sampler_batch_equals_single_runs(ah_pipe):
    from handsynth.attentionhand.loading import make_scheduler

    ddim = ah_pipe.scheduler
    ah_pipe.scheduler = make_scheduler("euler-a", ddim.config)  # draws fresh noise at every step
    try:
        meshes = mesh_images(2)
        batch = ah_pipe(PROMPTS[:2], meshes, generator=gens(7, 8), **FAST).images
        singles = [ah_pipe(PROMPTS[i], meshes[i], generator=gens(7 + i), **FAST).images[0] for i in range(2)]
    finally:
        ah_pipe.scheduler = ddim
    np.testing.assert_allclose(batch, np.stack(singles), atol=1e-5)


def test_global_and_local_in_one_batch_equal_separate_runs(ah_pipe):
    meshes, crops = mesh_images(2, seed=1), mesh_images(2, seed=2)
    tokens = dict(hand_token_indices=TOKENS[:2], return_attention=True)
    both = ah_pipe(PROMPTS[:2], meshes, local_mesh_image=crops, generator=gens(1, 2), local_generator=gens(5, 6),
                   **tokens, **FAST)
    alone = ah_pipe(PROMPTS[:2], meshes, generator=gens(1, 2), **tokens, **FAST)
    glob = alone.images
    loc = ah_pipe(PROMPTS[:2], crops, generator=gens(5, 6), **FAST).images
    np.testing.assert_allclose(both.images, glob, atol=1e-5)
    np.testing.assert_allclose(both.local_images, loc, atol=1e-5)
    for a, b in zip(both.attention_maps, alone.attention_maps):  # maps come from the global text rows
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # default local stream: the same generator, drawn after the global latent -> the global image is unchanged
    default = ah_pipe(PROMPTS[:2], meshes, local_mesh_image=crops, generator=gens(1, 2), **FAST)
    np.testing.assert_allclose(default.images, glob, atol=1e-5)
    assert np.abs(default.local_images - loc).max() > 1e-3


def test_tas_at_inference(ah_pipe):
    meshes = mesh_images(2)
    tas = TASConfig(max_steps=1, step_size_start=1000.0, step_size_end=1000.0)
    plain = ah_pipe(PROMPTS[:2], meshes, generator=gens(1, 2), **FAST).images
    none = ah_pipe(PROMPTS[:2], meshes, hand_token_indices=[[], []], tas=tas, generator=gens(1, 2), **FAST).images
    assert np.array_equal(none, plain)  # no hand tokens: TAS is a no-op, bit for bit
    out = ah_pipe(PROMPTS[:2], meshes, hand_token_indices=[TOKENS[0], []], tas=tas, generator=gens(1, 2),
                  return_attention=True, **FAST)
    assert np.abs(out.images[0] - plain[0]).max() > 1e-4  # sample 0 was steered ...
    np.testing.assert_allclose(out.images[1], plain[1], atol=1e-5)  # ... sample 1 (no tokens) was not
    maps = out.attention_maps
    assert [m.shape for m in maps] == [(2, 16, 16), (0, 16, 16)]
    assert (maps[0] > 0).all() and (maps[0] < 1).all()


def test_attention_maps_come_from_the_text_rows(ah_pipe):
    # one step: the first step's latents do not depend on the guidance scale, so the text rows of the
    # classifier-free-guidance batch must give exactly the maps of a run without the unconditional half
    kwargs = dict(hand_token_indices=TOKENS[:2], return_attention=True, num_inference_steps=1, output_type="np")
    cfg = ah_pipe(PROMPTS[:2], mesh_images(2), generator=gens(1, 2), guidance_scale=9.0, **kwargs)
    text_only = ah_pipe(PROMPTS[:2], mesh_images(2), generator=gens(1, 2), guidance_scale=1.0, **kwargs)
    for a, b in zip(cfg.attention_maps, text_only.attention_maps):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_bf16_with_tas_follows_fp32(clip_tokenizer_dir):
    pipe = make_pipeline(clip_tokenizer_dir)
    kwargs = dict(hand_token_indices=[TOKENS[0]], tas=TASConfig(max_steps=1, step_size_start=1000.0), **FAST)
    full = pipe(PROMPTS[0], mesh_images(1), generator=gens(0), **kwargs).images
    pipe.to(dtype=torch.bfloat16)
    half = pipe(PROMPTS[0], mesh_images(1), generator=gens(0), **kwargs).images
    plain = pipe(PROMPTS[0], mesh_images(1), generator=gens(0), **FAST).images
    assert np.isfinite(half).all() and np.abs(half - full).mean() < 0.02  # random images differ by ~0.3
    assert np.abs(half - plain).max() > 1e-3  # TAS acted in bf16 too


def test_mesh_image_formats_agree(ah_pipe):
    img = mesh_images(1)[0]
    as_pil = ah_pipe.prepare_mesh_images([PIL.Image.fromarray(img)], 64, 64)
    as_uint8 = ah_pipe.prepare_mesh_images([img], 64, 64)
    as_tensor = ah_pipe.prepare_mesh_images([torch.from_numpy(img).permute(2, 0, 1) / 255.0], 64, 64)
    grey = ah_pipe.prepare_mesh_images([img[..., 0]], 64, 64)
    assert as_pil.shape == (1, 3, 64, 64) and as_pil.min() >= 0 and as_pil.max() <= 1
    assert torch.equal(as_pil, as_uint8)
    assert torch.equal(grey[:, 0], as_pil[:, 0]) and torch.equal(grey[:, 2], grey[:, 0])
    torch.testing.assert_close(as_tensor, as_uint8)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ah_pipe.prepare_mesh_images([img.astype(np.float32)], 64, 64)


def test_pipeline_save_load_round_trip(ah_pipe, tmp_path):
    ah_pipe.save_pretrained(tmp_path / "pipe")
    assert not list((tmp_path / "pipe").rglob("*.bin"))
    loaded = AttentionHandPipeline.from_pretrained(tmp_path / "pipe")
    kwargs = dict(hand_token_indices=[TOKENS[0]], generator=gens(3), **FAST)
    a = ah_pipe(PROMPTS[0], mesh_images(1), **kwargs).images
    b = loaded(PROMPTS[0], mesh_images(1), hand_token_indices=[TOKENS[0]], generator=gens(3), **FAST).images
    assert np.array_equal(a, b)


def test_load_pipeline_from_base_and_guidance_folders(clip_tokenizer_dir, tiny_sd_dir, tmp_path):
    reference = make_pipeline(clip_tokenizer_dir)  # the same seed as the tiny SD folder's components
    reference.controlnet.save_pretrained(tmp_path / "guidance")
    loaded = load_pipeline(tiny_sd_dir, tmp_path / "guidance", dtype="fp32")
    assert type(loaded.scheduler).__name__ == "DDIMScheduler"
    assert all(not p.requires_grad for p in loaded.unet.parameters())
    a = reference(PROMPTS[1], mesh_images(1), generator=gens(4), **FAST).images
    b = loaded(PROMPTS[1], mesh_images(1), generator=gens(4), **FAST).images
    assert np.array_equal(a, b)


@pytest.mark.parametrize("which", ["base", "guidance"])
def test_missing_model_folder_says_how_to_provide_it(tiny_sd_dir, tmp_path, which):
    missing = tmp_path / "no-such-model"
    with pytest.raises(MissingResourceError) as err:
        load_pipeline(missing if which == "base" else tiny_sd_dir, missing if which == "guidance" else None)
    msg = err.value.message
    assert str(missing) in msg and "does not exist" in msg
    if which == "base":
        assert "huggingface-cli download" in msg and "HF_HUB_OFFLINE=1" in msg and "~/.cache/huggingface" in msg
    else:   # a missing guidance folder gets advice about that folder, not a hub download of its path
        assert "handsynth convert --ckpt attentionhand.ckpt" in msg and "huggingface-cli download" not in msg


def test_missing_hub_id_names_the_download_command():
    # tests run with HF_HUB_OFFLINE=1 (tests/conftest.py): an id that is not cached cannot load
    with pytest.raises(MissingResourceError, match="huggingface-cli download someone/not-cached-sd15"):
        load_pipeline("someone/not-cached-sd15")


def test_benchmark_tiny_mode_prints_parsable_figures(capsys):
    # in-process (the script's main(argv)): a subprocess would spend most of its time importing torch
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "generate.py"
    spec = importlib.util.spec_from_file_location("handsynth_benchmark_generate", script)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    assert benchmark.main(["--device", "cpu", "--tiny", "--batch-sizes", "1", "2", "--steps", "2", "--tas-steps", "1",
                           "--repeats", "1", "--size", "40x64"]) == 0
    stdout = capsys.readouterr().out
    assert "size=40x64" in stdout                          # a non-square frame, as image.fit native makes
    rows = re.findall(r"^batch=(\d+) tas_off_images_per_s=([\d.]+) tas_on_images_per_s=([\d.]+) "
                      r"tas_time_share=(-?[\d.]+)$", stdout, re.M)
    assert [int(r[0]) for r in rows] == [1, 2], stdout
    for _, off, on, share in rows:
        off, on, share = float(off), float(on), float(share)
        assert off > 0 and on > 0 and share < 1  # (a busy CPU may even show TAS-on faster)
        assert share == pytest.approx(1 - on / off, abs=2e-3)
    # the last line: TAS-on over TAS-off time of all batch sizes together (one repeat: total over total)
    assert stdout.rstrip().splitlines()[-1].startswith("tas_ratio: ")
    ratio = float(stdout.rstrip().splitlines()[-1].split()[1])
    off_time = sum(int(b) / float(off) for b, off, _, _ in rows)
    on_time = sum(int(b) / float(on) for b, _, on, _ in rows)
    assert ratio == pytest.approx(on_time / off_time, rel=2e-3)


def test_speed_options_keep_the_images(clip_tokenizer_dir):
    """The GPU options' CPU path: channels_last, a bf16 VAE and fused QKV projections give the same images
    up to rounding (bf16 decode: a few 8-bit levels), and the VAE really runs in bf16."""
    from handsynth.attentionhand import speed

    args = dict(prompt=PROMPTS[:2], mesh_image=mesh_images(2), hand_token_indices=TOKENS[:2], **FAST)
    plain = make_pipeline(clip_tokenizer_dir)(generator=gens(1, 2), **args).images
    fast = speed.apply(make_pipeline(clip_tokenizer_dir), channels_last=True, vae_dtype=torch.bfloat16, fuse_qkv=True)
    assert fast.vae.dtype == torch.bfloat16 and fast.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    got = fast(generator=gens(1, 2), **args).images
    assert got.shape == plain.shape and np.abs(got - plain).max() < 0.05 and np.abs(got - plain).mean() < 0.01


def test_benchmark_scale_mode_prints_parsable_ratios(capsys):
    """``--mode scale``: handsynth vs diffusers and end to end vs the pipeline alone, per batch, then ratios
    that are the medians of what the lines imply (one repeat: the ratio of the speeds)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "generate.py"
    spec = importlib.util.spec_from_file_location("handsynth_benchmark_generate_scale", script)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    assert benchmark.main(["--mode", "scale", "--device", "cpu", "--tiny", "--batch-sizes", "2", "--steps", "1",
                           "--repeats", "1", "--peak-tflops", "1"]) == 0
    stdout = capsys.readouterr().out
    row = re.search(r"^batch=2 handsynth_images_per_s=([\d.]+) diffusers_images_per_s=([\d.]+) "
                    r"end_to_end_images_per_s=([\d.]+) pipeline_images_per_s=([\d.]+) flop_share=([\d.]+)$",
                    stdout, re.M)
    assert row, stdout
    ours, theirs, e2e, alone, share = (float(v) for v in row.groups())
    assert min(ours, theirs, e2e, alone) > 0
    lines = dict(line.split(": ") for line in stdout.splitlines() if ": " in line)
    assert float(lines["pipeline_vs_diffusers"]) == pytest.approx(ours / theirs, rel=5e-3)
    assert float(lines["end_to_end_vs_pipeline"]) == pytest.approx(e2e / alone, rel=5e-3)
    assert share == pytest.approx(ours * benchmark.flop_per_image(1, (64, 64)) / 1e12, rel=5e-3)

"""handsynth train on tiny random models: data, the training step (Eq. 2-9), exact resume, the command."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from handsynth.cli import main
from handsynth.errors import InputError
from tests.conftest import SHARED, TRAIN_RECIPES

PROMPTS = """\
prompts:
  templates:
    right: ["a woman [holding] a cup with her right [hand]"]
    left: ["a man [waving] his left [hand]"]
    both: ["a child [clapping] both [hands]"]
"""


TRAIN_DEFAULTS = {"steps": 3, "learning_rate": 1.0e-3, "checkpoint_every": 2, "validate_every": 0, "log_every": 1}


def write_train_recipe(folder: Path, base: Path, *, train: dict | None = None, extra: str = "",
                       guidance: str = "none", name: str = "train.yaml", batch_size: int = 1) -> Path:
    """A training recipe for the tiny model (64 px, TAS at 16x16, one iteration); ``train`` overrides
    :data:`TRAIN_DEFAULTS`."""
    settings = {**TRAIN_DEFAULTS, **(train or {})}
    text = textwrap.dedent(f"""\
        seed: 3
        model:
          base: {base}
          guidance: {guidance}
        tas:
          iterations: 1
          step_size_start: 20.0
          step_size_end: 10.0
          attention_res: 16
        image:
          size: 64
          format: png
        sampler:
          steps: 2
        batch_size: {batch_size}
        train:
        """) + "".join(f"  {k}: {v}\n" for k, v in settings.items())
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text + PROMPTS + extra)
    return path


@pytest.fixture(scope="module")
def tiny_parts(tiny_sd_dir):
    """The tiny SD pipeline (frozen) loaded by the real loading code, for step-level tests."""
    from handsynth.attentionhand.loading import load_pipeline

    return load_pipeline(str(tiny_sd_dir), "none")


def _data(recipe_path, run):
    from handsynth.train.data import TrainData, read_frames
    from handsynth.train.recipe import load_train_recipe
    from handsynth.tokenizer import load_clip_tokenizer

    recipe = load_train_recipe(recipe_path)
    _, frames, missing, _ = read_frames(recipe, run)
    return recipe, TrainData(frames, recipe, load_clip_tokenizer(str(recipe.model.base))), missing


def _models(pipe, controlnet, tas_res=16):
    from handsynth.attentionhand.tas import AttentionStore
    from handsynth.train.step import Models, alphas_cumprod

    return Models(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
                  controlnet=controlnet, alphas_cumprod=alphas_cumprod(pipe.scheduler.config),
                  store=AttentionStore(tas_res))


# --- data --------------------------------------------------------------------------------------


def test_render_run_samples_are_cut_as_generation_cuts(tiny_sd_dir, small_render_run, tmp_path):
    """The global RGB and mesh come out of the SAME frame map generation uses (frame.sample_frames +
    resample); the local RGB is render's crop box of the source image (checked against render's own
    rgb_local crop, made from the same box), the local mesh render's local view resampled."""
    from PIL import Image

    from handsynth.generate.frame import resample, sample_frames
    from handsynth.render import layout

    recipe, data, missing = _data(write_train_recipe(tmp_path, tiny_sd_dir), small_render_run)
    assert missing == 0 and len(data) == len(data.frames) >= 3
    frame = data.frames[0]
    label = json.loads(frame.label.read_text())
    assert Path(label["image_path"]) == frame.rgb and frame.rgb.is_file()
    rgb, mesh, local_rgb, local_mesh = data.images(frame)
    assert rgb.size == mesh.size == local_rgb.size == local_mesh.size == (64, 64)
    source = Image.open(frame.rgb).convert("RGB")
    frames = sample_frames(label, "crop", 64, source.size, local=True)
    assert np.array_equal(np.asarray(rgb), np.asarray(resample(source, frames.image)))
    assert np.array_equal(np.asarray(mesh), np.asarray(resample(Image.open(frame.mesh).convert("RGB"),
                                                                 frames.image)))
    # render's rgb_local is the same crop box (64 px there too) - up to its JPEG encoding
    render_crop = np.asarray(Image.open(small_render_run / layout.image_ref("rgb_local", frame.key)), np.float64)
    assert np.abs(np.asarray(local_rgb, np.float64) - render_crop).mean() < 4.0
    # the local mesh image sits where the local RGB's hand is: bright mesh pixels are not black in the RGB
    hand = np.asarray(local_mesh).max(-1) > 127
    assert hand.mean() > 0.02 and np.asarray(local_rgb, np.float64)[hand].mean() > 20

    sample = data[5]
    assert sample.rgb.shape == (3, 64, 64) and -1.0 <= sample.rgb.min() and sample.rgb.max() <= 1.0
    assert 0.0 <= sample.local_mesh.min() and sample.local_mesh.max() <= 1.0
    assert sample.token_indices and all(1 <= p <= 75 for p in sample.token_indices)
    # order: each epoch visits every frame once; positions are reproducible
    first_epoch = sorted(data.frame_index(p) for p in range(len(data)))
    assert first_epoch == list(range(len(data)))
    assert [data.frame_index(p) for p in range(12)] == [data.frame_index(p) for p in range(12)]


def test_modalities_with_rgb(tiny_sd_dir, tmp_path):
    """An AttentionHand modalities file with `rgb`: caption from the text file, hand box from the mesh pixels
    brighter than 127, local crops of both images by render's square box about it."""
    from PIL import Image

    from handsynth.render.geometry import DEFAULT_CROP_SCALE, square_crop_box
    from handsynth.render.stage import crop_image

    official = SHARED / "samples" / "attentionhand-official"
    line = json.loads((official / "modalities.json").read_text().splitlines()[0])
    mesh_path = official / line["mesh"].removeprefix("samples/")
    mesh = Image.open(mesh_path).convert("RGB")
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (mesh.size[1], mesh.size[0], 3), dtype=np.uint8))
    (tmp_path / "rgb").mkdir()
    rgb.save(tmp_path / "rgb" / "a.png")
    modalities = tmp_path / "modalities.json"
    modalities.write_text(json.dumps({**line, "rgb": str(tmp_path / "rgb" / "a.png")}) + "\n"
                          + json.dumps(json.loads((official / "modalities.json").read_text().splitlines()[1])) + "\n")
    recipe_path = write_train_recipe(tmp_path, tiny_sd_dir, extra=f"inputs:\n  modalities: {modalities}\n  root: "
                                                                  f"{official}\n")
    recipe, data, missing = _data(recipe_path, None)
    assert missing == 1 and len(data) == 1                      # the line without rgb is left out
    frame = data.frames[0]
    text = (official / line["text"].removeprefix("samples/")).read_text().splitlines()[0].strip()
    assert frame.text == text and data[0].prompt.text == text
    pixels = np.asarray(mesh).max(-1) > 127
    ys, xs = np.nonzero(pixels)
    box = np.array([xs.min(), ys.min(), xs.max(), ys.max()], float)
    np.testing.assert_allclose(frame.crop_box, square_crop_box([box], DEFAULT_CROP_SCALE))
    _, _, local_rgb, local_mesh = data.images(frame)
    assert np.array_equal(np.asarray(local_rgb), np.asarray(crop_image(rgb, np.asarray(frame.crop_box), 64)))
    assert np.array_equal(np.asarray(local_mesh), np.asarray(crop_image(mesh, np.asarray(frame.crop_box), 64)))


def test_a_run_without_source_images_is_refused(tiny_sd_dir, small_render_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(small_render_run, run)
    for label_file in (run / "labels").glob("*.json"):
        label = json.loads(label_file.read_text())
        label["image_path"] = str(tmp_path / "gone.jpg")
        label_file.write_text(json.dumps(label))
    with pytest.raises(InputError, match="source image"):
        _data(write_train_recipe(tmp_path, tiny_sd_dir), run)


# --- the step ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def step_setup(tiny_sd_dir, small_render_run, tiny_parts, tmp_path_factory):
    from handsynth.attentionhand.guidance import build_guidance_module
    from tests.fixtures.attentionhand_pipeline import pretend_trained

    recipe, data, _ = _data(write_train_recipe(tmp_path_factory.mktemp("step"), tiny_sd_dir), small_render_run)
    controlnet = pretend_trained(build_guidance_module(tiny_parts.unet, tiny_parts.vae_scale_factor), seed=2)
    return recipe, data, _models(tiny_parts, controlnet)


def _loss(models, samples, seed, tas, **kwargs):
    from handsynth.attentionhand.tas import tas_processors
    from handsynth.train.data import sample_generator
    from handsynth.train.step import training_loss

    generators = [sample_generator(seed, s.position) for s in samples]
    with tas_processors(models.unet, models.store):
        return training_loss(models, samples, generators, tas, **kwargs)


def test_residual_target_is_the_noise_of_the_tas_updated_latent(step_setup):
    from handsynth.attentionhand.tas import TASConfig

    recipe, data, models = step_setup
    samples = [data[0], data[1]]
    tas = TASConfig(iterations=2, step_size_start=3000.0, step_size_end=2000.0)
    result = _loss(models, samples, recipe.seed, tas)
    abar = models.alphas_cumprod[result.timesteps].repeat(2).view(-1, 1, 1, 1).double()
    x0, updated = result.x0.double(), result.updated.double()
    expected = (updated - abar.sqrt() * x0) / (1 - abar).sqrt()
    torch.testing.assert_close(result.target.double(), expected, atol=1e-4, rtol=1e-4)
    assert (result.updated - result.noisy).abs().max() > 1e-4          # TAS moved the latents ...
    assert (result.target - result.noise).abs().max() > 1e-4            # ... so eps_hat is not the plain noise
    # both branches share the timestep but not the noise; X_t is the forward process of X0
    n = len(samples)
    assert not torch.equal(result.noise[:n], result.noise[n:])
    torch.testing.assert_close(result.noisy.double(), abar.sqrt() * x0 + (1 - abar).sqrt() * result.noise.double(),
                               atol=1e-5, rtol=1e-5)
    plain = _loss(models, samples, recipe.seed, tas, target="noise")
    torch.testing.assert_close(plain.target, plain.noise)
    torch.testing.assert_close(plain.updated, result.updated)           # the same draws for the same positions
    expected_loss = 0.5 * torch.mean((result.prediction[:n].float() - result.target[:n]) ** 2) + \
        0.5 * torch.mean((result.prediction[n:].float() - result.target[n:]) ** 2)
    torch.testing.assert_close(result.loss, expected_loss)


def test_the_local_branch_uses_the_local_crop(step_setup):
    """Changing the local RGB changes the local loss and leaves the global loss bit-identical; the local
    branch does not see the global image (changing the global RGB leaves the local loss alone)."""
    import dataclasses

    from handsynth.attentionhand.tas import TASConfig

    recipe, data, models = step_setup
    tas = TASConfig(enabled=False)
    sample = data[2]
    base = _loss(models, [sample], recipe.seed, tas)
    local_changed = dataclasses.replace(sample, local_rgb=-sample.local_rgb)
    changed = _loss(models, [local_changed], recipe.seed, tas)
    assert torch.equal(changed.loss_global, base.loss_global) and torch.equal(changed.x0[0], base.x0[0])
    assert (changed.x0[1] - base.x0[1]).abs().mean() > 0.01             # the local latent is the local crop's
    assert abs(float((changed.loss_local - base.loss_local).detach())) > 1e-5 * float(base.loss_local.detach())  # rounding: ~1e-7
    global_changed = _loss(models, [dataclasses.replace(sample, rgb=-sample.rgb)], recipe.seed, tas)
    assert torch.equal(global_changed.loss_local, base.loss_local) and torch.equal(global_changed.x0[1], base.x0[1])
    assert abs(float((global_changed.loss_global - base.loss_global).detach())) > 1e-5 * float(base.loss_global.detach())
    only_global = _loss(models, [sample], recipe.seed, tas, lambda_local=0.0)
    assert only_global.loss_local is None and torch.equal(only_global.loss_global, base.loss_global)


# --- the command: training, resume, outputs ---------------------------------------------------


def _state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


def test_train_resume_and_generate_with_the_result(tiny_sd_dir, small_render_run, tmp_path, monkeypatch, capsys):
    """An interrupted run (crash in step 3, checkpoint at 2) resumed by the same command ends with weights
    bit-identical to an uninterrupted run; frozen weights stay bit-identical; the folder loads as
    model.guidance in a generate recipe."""
    from handsynth.train import loop
    from tests.fixtures.generate import write_gen_recipe

    recipe = write_train_recipe(tmp_path, tiny_sd_dir)
    frozen_files = {p: p.read_bytes() for p in tiny_sd_dir.rglob("*.safetensors")}
    args = ["train", "--recipe", str(recipe), "--run", str(small_render_run), "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0, capsys.readouterr().err
    straight = _state(tmp_path / "straight")

    real_step = loop.Trainer.train_step

    def crashing(self):
        if self.step == 2:
            raise RuntimeError("power cut")
        return real_step(self)

    monkeypatch.setattr(loop.Trainer, "train_step", crashing)
    with pytest.raises(RuntimeError, match="power cut"):
        main([*args, "--out", str(tmp_path / "resumed")])
    manifest = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["step"] == 2
    monkeypatch.setattr(loop.Trainer, "train_step", real_step)
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "resumed")]) == 0
    assert "resuming from" in capsys.readouterr().err
    resumed = _state(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    fresh = _fresh_guidance(tiny_sd_dir)
    assert any(not torch.equal(straight[k], fresh[k]) for k in straight)        # it did learn something
    log = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == ["step-0000002",
                                                                                    "step-0000003"]
    assert {p: p.read_bytes() for p in tiny_sd_dir.rglob("*.safetensors")} == frozen_files

    # nothing left to do: the same command again trains no step and keeps the weights
    assert main([*args, "--out", str(tmp_path / "resumed")]) == 0
    assert all(torch.equal(_state(tmp_path / "resumed")[k], resumed[k]) for k in resumed)

    gen = write_gen_recipe(tmp_path / "gen", tiny_sd_dir, tmp_path / "resumed")
    assert main(["generate", "--recipe", str(gen), "--run", str(small_render_run), "--count", "2", "--device",
                 "cpu", "--out", str(tmp_path / "gen-out")]) == 0
    assert len(list((tmp_path / "gen-out" / "samples").glob("*.json"))) == 2


def _fresh_guidance(tiny_sd_dir):
    from diffusers import UNet2DConditionModel

    from handsynth.attentionhand.guidance import build_guidance_module

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    return build_guidance_module(unet, 2).state_dict()


def test_the_loss_falls(tiny_sd_dir, small_render_run, tiny_parts, tmp_path):
    """Twenty steps on the tiny data set lower the loss on fixed draws (the same sample positions, hence the
    same timesteps and noises) by a clear margin."""
    from handsynth.attentionhand.guidance import build_guidance_module
    from handsynth.attentionhand.tas import TASConfig
    from handsynth.train.data import sample_generator
    from handsynth.train.step import training_loss

    recipe, data, _ = _data(write_train_recipe(tmp_path, tiny_sd_dir), small_render_run)
    torch.manual_seed(0)
    controlnet = build_guidance_module(tiny_parts.unet, tiny_parts.vae_scale_factor)
    controlnet.train().requires_grad_(True)
    models = _models(tiny_parts, controlnet)
    tas = TASConfig(enabled=False)
    samples = [data[p] for p in range(len(data))]          # one epoch: every frame once

    def evaluate():
        with torch.no_grad():
            return float(training_loss(models, samples, [sample_generator(99, p) for p in range(len(samples))],
                                       tas).loss)

    before = evaluate()
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=3e-3)
    for step in range(20):
        sample = samples[step % len(samples)]
        loss = training_loss(models, [sample], [sample_generator(0, step)], tas).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = evaluate()
    assert after < 0.8 * before, (before, after)


def test_shipped_train_recipe_loads():
    from handsynth.train.recipe import load_train_recipe

    (path,) = TRAIN_RECIPES
    recipe = load_train_recipe(path)
    assert recipe.train.learning_rate == 1e-5 and recipe.image.size == 512 and recipe.batch_size == 1
    assert (recipe.train.lambda_global, recipe.train.lambda_local, recipe.train.target) == (0.5, 0.5, "residual")
    assert recipe.tas.kernel == "public" and recipe.tas.maps_from == "unet" and recipe.tas.iterations == 50
    assert recipe.model.guidance == "none" and recipe.model.precision == "fp32"


def test_bad_train_recipes_are_reported(tiny_sd_dir, tmp_path, capsys):
    bad = write_train_recipe(tmp_path, tiny_sd_dir, train={"lerning_rate": 0.1})
    assert main(["train", "--recipe", str(bad), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'lerning_rate'" in err and "learning_rate" in err and "line" in err
    native = write_train_recipe(tmp_path, tiny_sd_dir, name="native.yaml")
    native.write_text(native.read_text().replace("  format: png\n", "  format: png\n  fit: native\n"))
    assert main(["train", "--recipe", str(native), "--device", "cpu"]) == 2
    assert "one size" in capsys.readouterr().err
    import importlib.util

    eight_bit = write_train_recipe(tmp_path, tiny_sd_dir, train={"optimizer": "adamw-8bit"}, name="8bit.yaml")
    if importlib.util.find_spec("bitsandbytes") is None:        # not a dependency: the error says how to get it
        assert main(["train", "--recipe", str(eight_bit), "--device", "cpu", "--out", str(tmp_path / "o")]) == 3
        assert "pip install bitsandbytes" in capsys.readouterr().err and not (tmp_path / "o").exists()
    else:
        from handsynth.train.loop import make_optimizer
        from handsynth.train.recipe import load_train_recipe

        optimizer = make_optimizer(load_train_recipe(eight_bit).train, [torch.nn.Parameter(torch.zeros(4))])
        assert type(optimizer).__name__ == "AdamW8bit"


def test_gradient_accumulation_validation_and_a_foreign_out(tiny_sd_dir, small_render_run, tmp_path, capsys):
    """Two micro-batches of one sample accumulate to the step of one batch of both (same positions, same
    draws; float rounding apart); validation images are written at validate_every; an --out trained with
    another recipe is refused."""
    common = {"steps": 1, "checkpoint_every": 1}
    acc = write_train_recipe(tmp_path / "acc", tiny_sd_dir, train={**common, "gradient_accumulation": 2,
                                                                    "validate_every": 1, "validation_count": 1})
    whole = write_train_recipe(tmp_path / "whole", tiny_sd_dir, train=common, batch_size=2)
    args = ["train", "--run", str(small_render_run), "--device", "cpu"]
    assert main([*args, "--recipe", str(acc), "--out", str(tmp_path / "a")]) == 0, capsys.readouterr().err
    assert main([*args, "--recipe", str(whole), "--out", str(tmp_path / "w")]) == 0, capsys.readouterr().err
    a, w = _state(tmp_path / "a"), _state(tmp_path / "w")
    fresh = _fresh_guidance(tiny_sd_dir)
    moved = max((w[k] - fresh[k]).abs().max().item() for k in w)
    assert moved > 1e-4
    assert max((a[k] - w[k]).abs().max().item() for k in a) < 1e-3 * moved
    images = sorted(p.name for p in (tmp_path / "a" / "validation" / "step-0000001").iterdir())
    assert len(images) == 2 and images[0] == images[1].replace(".png", "-local.png")
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["samples_per_step"] == 2
    capsys.readouterr()
    assert main([*args, "--recipe", str(whole), "--out", str(tmp_path / "a")]) == 2
    assert "different recipe" in capsys.readouterr().err
    assert _state(tmp_path / "a").keys() == a.keys()


def test_benchmark_cpu_path_prints_figures():
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "train.py"
    result = subprocess.run([sys.executable, str(script), "--device", "cpu", "--tiny", "--steps", "1",
                             "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    line = next(x for x in result.stdout.splitlines() if x.startswith("batch=1 "))
    figures = dict(item.split("=") for item in line.split())
    assert float(figures["steps_per_s"]) > 0 and float(figures["tas_ratio"]) > 0.5
    assert float(figures["peak_memory_gib"]) > 0 and "largest_batch: 1" in result.stdout

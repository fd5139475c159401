"""Guidance from anywhere: ControlNet folders, the folder holding controlnet/, hub ids, original-format
single files (diffusers' from_single_file, offline), and none (plain Stable Diffusion); TAS with each."""

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionPipeline

from handsynth.attentionhand.loading import GuidanceSource, load_guidance_module, load_pipeline, resolve_guidance
from handsynth.attentionhand.tas import TASConfig
from handsynth.errors import InputError, MissingResourceError
from tests.fixtures.attentionhand_pipeline import mesh_images

PROMPTS = ["a woman holding a cup with her right hand", "a man waving his hand"]
TOKENS = [[2, 6, 3], [3, 4]]
FAST = dict(num_inference_steps=1, output_type="np")


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def assert_same_weights(loaded, original):
    ours, theirs = loaded.state_dict(), original.state_dict()
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key


def test_single_file_loads_through_from_single_file_offline(tiny_controlnet, tiny_sd8_dir, monkeypatch):
    calls = []
    real = ControlNetModel.from_single_file.__func__

    def spy(cls, *args, **kwargs):
        calls.append((args, kwargs))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(ControlNetModel, "from_single_file", classmethod(spy))
    loaded = load_guidance_module(tiny_controlnet.file, base=str(tiny_sd8_dir))
    assert len(calls) == 1 and calls[0][0] == (str(tiny_controlnet.file),)
    assert calls[0][1]["local_files_only"] is True and "config" in calls[0][1]
    assert_same_weights(loaded, tiny_controlnet.model)
    assert list(loaded.config.conditioning_embedding_out_channels) == [16, 32, 96, 256]
    assert loaded.config.block_out_channels == tiny_controlnet.model.config.block_out_channels


def test_diffusers_alone_cannot_find_the_config_offline(tiny_controlnet):
    """Why handsynth passes config=: diffusers would read lllyasviel's config from the hub (tests are offline)."""
    with pytest.raises(Exception):
        ControlNetModel.from_single_file(str(tiny_controlnet.file), local_files_only=True)


def test_kinds_are_recognised_and_named(tiny_controlnet, tiny_sd_dir, tmp_path):
    folder = str(tiny_controlnet.folder)
    assert resolve_guidance(folder) == GuidanceSource("folder", folder)
    (tmp_path / "converted").mkdir()
    (tmp_path / "converted" / "controlnet").symlink_to(tiny_controlnet.folder)
    holder = resolve_guidance(tmp_path / "converted")
    assert holder.kind == "pipeline" and "controlnet" in holder.describe()
    assert resolve_guidance(tiny_controlnet.file).kind == "single-file"
    assert resolve_guidance("none").kind == "none" and resolve_guidance(None).kind == "none"
    assert resolve_guidance("None").kind == "none"
    assert resolve_guidance("lllyasviel/control_v11f1p_sd15_depth") == \
        GuidanceSource("hub", "lllyasviel/control_v11f1p_sd15_depth")
    # both spellings of a converted folder load the same module
    assert_same_weights(load_guidance_module(tmp_path / "converted"), load_guidance_module(folder))


def test_bad_guidance_values(tmp_path):
    (tmp_path / "old.ckpt").write_bytes(b"not loaded")
    with pytest.raises(InputError, match="pickled .ckpt"):
        resolve_guidance(tmp_path / "old.ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="neither config.json"):
        resolve_guidance(tmp_path / "empty")
    with pytest.raises(MissingResourceError, match="does not exist"):
        resolve_guidance(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(InputError, match="safetensors"):
        load_guidance_module(tmp_path / "junk.safetensors")


def test_missing_conventional_folder_gets_folder_advice(tmp_path, monkeypatch):
    """models/attentionhand is also a valid hub id; the error gives the convert command first."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MissingResourceError) as err:
        load_guidance_module("models/attentionhand")
    msg = err.value.message
    assert str(tmp_path / "models" / "attentionhand") in msg
    assert msg.index("handsynth convert") < msg.index("huggingface-cli download")
    assert "none" in msg and "outdoor-depth-controlnet" in msg


def test_single_file_generates_like_the_same_weights_in_a_folder(tiny_controlnet, tiny_sd8_dir):
    from_file = load_pipeline(tiny_sd8_dir, tiny_controlnet.file)
    from_folder = load_pipeline(tiny_sd8_dir, tiny_controlnet.folder)
    plain = load_pipeline(tiny_sd8_dir, "none")
    prompts, meshes, seeds = PROMPTS + PROMPTS[:1], mesh_images(2) + mesh_images(1, seed=5), (1, 2, 1)
    a = from_file(prompts, meshes, generator=gens(*seeds), **FAST).images
    b = from_folder(prompts, meshes, generator=gens(*seeds), **FAST).images
    c = plain(prompts, meshes, generator=gens(*seeds), **FAST).images
    assert a.shape == (3, 64, 64, 3) and np.array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3            # the ControlNet steers ...
    assert np.abs(a[2] - a[0]).max() > 1e-4      # ... by the condition image (same prompt and seed)
    np.testing.assert_allclose(c[2], c[0], atol=1e-5)  # without guidance the condition image is not used


def test_guidance_none_equals_stable_diffusion(tiny_sd_dir):
    ours = load_pipeline(tiny_sd_dir, "none")
    assert ours.controlnet is None
    sd = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    a = ours(PROMPTS, mesh_images(2), generator=gens(3, 4), **FAST).images
    b = sd(PROMPTS, generator=gens(3, 4), guidance_scale=9.0, height=64, width=64, **FAST).images
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("guidance", ["none", "file"])
def test_tas_works_with_any_guidance(guidance, tiny_controlnet, tiny_sd8_dir):
    pipe = load_pipeline(tiny_sd8_dir, tiny_controlnet.file if guidance == "file" else "none")
    tas = TASConfig(max_steps=1, attention_res=4, step_size_start=1000.0, step_size_end=1000.0)
    meshes = mesh_images(2)
    plain = pipe(PROMPTS, meshes, generator=gens(1, 2), **FAST).images
    out = pipe(PROMPTS, meshes, hand_token_indices=[TOKENS[0], []], tas=tas, generator=gens(1, 2),
               return_attention=True, **FAST)
    assert np.abs(out.images[0] - plain[0]).max() > 1e-4          # the sample with hand tokens was steered
    np.testing.assert_allclose(out.images[1], plain[1], atol=1e-5)  # the one without was not
    assert [m.shape for m in out.attention_maps] == [(3, 4, 4), (0, 4, 4)]


@pytest.fixture(scope="module")
def mesh_and_depth_run(mano_dir, tmp_path_factory):
    from handsynth.render.stage import render_run
    from tests.fixtures.labels import build_interhand_set, mano_rest_arrays

    root = tmp_path_factory.mktemp("mesh-depth")
    labels = build_interhand_set(root / "interhand", mano_arrays=mano_rest_arrays(mano_dir))
    render_run(labels, root / "run", mano_dir=mano_dir, local_size=64, style="mesh,depth", limit=2)
    return root / "run"


def test_generate_and_export_with_a_single_file_on_depth_images(mesh_and_depth_run, tiny_controlnet, tiny_sd8_dir,
                                                                tmp_path, capsys):
    import json
    import shutil
    import tarfile

    from handsynth.cli import main
    from handsynth.io import sha256_file
    from tests.fixtures.generate import write_gen_recipe

    folder = tmp_path / "recipes"
    (folder / "models").mkdir(parents=True)
    shutil.copy(tiny_controlnet.file, folder / "models" / "hand-depth.safetensors")   # relative to the recipe
    recipe = write_gen_recipe(folder, tiny_sd8_dir, "models/hand-depth.safetensors",
                              extra=f"inputs:\n  run: {mesh_and_depth_run}\nbranches: [global, local]\n")
    recipe.write_text(recipe.read_text().replace("attention_res: 16", "attention_res: 4")
                      .replace("precision: fp32", "precision: fp32\n  condition: depth"))
    out = tmp_path / "gen"
    code = main(["generate", "--recipe", str(recipe), "--device", "cpu", "--count", "2", "--out", str(out)])
    text = " ".join(capsys.readouterr().err.split())
    assert code == 0, text
    assert f"original-format ControlNet file {(folder / 'models' / 'hand-depth.safetensors').resolve()}" in text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["condition"] == "depth"
    assert manifest["model"]["guidance_files_sha256"] == {"hand-depth.safetensors": sha256_file(tiny_controlnet.file)}
    samples = sorted((out / "samples").glob("*.json"))
    assert len(samples) == 2
    for path in samples:
        sample = json.loads(path.read_text())
        assert sample["mesh"]["global"].startswith("depth_global/")
        assert sample["mesh"]["local"].startswith("depth_local/")
    shards = tmp_path / "shards"
    assert main(["export", "--format", "webdataset", "--run", str(out), "--out", str(shards)]) == 0, capsys.readouterr()
    (tar,) = shards.glob("*.tar")
    with tarfile.open(tar) as f:
        names = f.getnames()
    for key in (json.loads(p.read_text())["key"] for p in samples):
        for member in ("png", "json", "mesh.png", "local_mesh.png", "depth.png", "local_depth.png"):
            assert f"{key}.{member}" in names


def test_generate_refuses_a_condition_the_render_run_lacks(small_render_run):
    from handsynth.generate.plan import read_render_run

    with pytest.raises(InputError, match="has no depth images") as err:
        read_render_run(small_render_run, "depth")
    assert "--style mesh,depth" in err.value.message

"""``handsynth convert``: public AttentionHand checkpoint -> diffusers folders.

The checkpoints here are written in the PUBLIC key layout by an independent construction (the ldm
naming rules below, written from the original ControlNet/ldm module structure), not by inverting
the converter, then converted and compared weight by weight and on forward passes.
"""

from __future__ import annotations

import json
import pickle
import re
import sys
import types

import pytest
import torch

from handsynth.cli import main
from handsynth.errors import InputError, OutputError
from tests.fixtures.diffusion import get_dummy_components
from tests.fixtures.ldm_layout import encoder_key, resnet_key, public_controlnet

# --- the public (ldm) layout of the SD parts, built independently (ControlNet: tests/fixtures/ldm_layout.py)

def public_unet(model) -> dict[str, torch.Tensor]:
    lpb = model.config.layers_per_block
    has_attn = {int(k.split(".")[1]) for k in model.state_dict() if re.match(r"up_blocks\.\d+\.attentions\.", k)}
    out = {}
    for key, value in model.state_dict().items():
        name = encoder_key(key, lpb)
        if name is None:
            if m := re.match(r"conv_norm_out\.(.+)", key):
                name = f"out.0.{m[1]}"
            elif m := re.match(r"conv_out\.(.+)", key):
                name = f"out.2.{m[1]}"
            elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
                idx = int(m[1]) * (lpb + 1) + int(m[3])
                name = (f"output_blocks.{idx}.0.{resnet_key(m[4])}" if m[2] == "resnets"
                        else f"output_blocks.{idx}.1.{m[4]}")
            elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
                block = int(m[1])
                name = f"output_blocks.{block * (lpb + 1) + lpb}.{2 if block in has_attn else 1}.conv.{m[2]}"
        assert name is not None, key
        out["model.diffusion_model." + name] = value.clone()
    return out


def public_vae(model) -> dict[str, torch.Tensor]:
    n_up = len(model.decoder.up_blocks)
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in model.state_dict().items():
        name, value = key, value.clone()
        name = re.sub(r"conv_norm_out", "norm_out", name)
        name = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)", r"encoder.down.\1.block.\2", name)
        name = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", name)
        name = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)",
                      lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}", name)
        name = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0",
                      lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.upsample", name)
        name = re.sub(r"mid_block\.resnets\.(\d+)", lambda m: f"mid.block_{int(m[1]) + 1}", name)
        name = name.replace("conv_shortcut", "nin_shortcut")
        if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.+)",
                         key):
            name = f"{m[1]}.mid.attn_1.{attn[m[2]]}.{m[3]}"
            if value.ndim == 2:  # the ldm VAE's attention projections are 1x1 convolutions
                value = value[:, :, None, None].clone()
        out["first_stage_model." + name] = value
    return out


def public_text_encoder(model) -> dict[str, torch.Tensor]:
    return {"cond_stage_model.transformer." + k: v.clone() for k, v in model.state_dict().items()}


def perturb(model, seed: int):
    """Random weights everywhere (zero convolutions included), so any mixed-up key changes the result."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


# --- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def components(clip_tokenizer_dir):
    from diffusers import ControlNetModel

    parts = get_dummy_components(clip_tokenizer_dir)
    for i, name in enumerate(("unet", "vae", "text_encoder")):
        perturb(parts[name], 10 + i)
    # as guidance.py builds it for this model: a hint encoder with one stride-2 stage (latent = image / 2)
    controlnet = ControlNetModel.from_unet(parts["unet"], conditioning_embedding_out_channels=(16, 32))
    parts["controlnet"] = perturb(controlnet, 7).eval()
    return parts


def lightning_checkpoint(state: dict) -> dict:
    junk = {"logvar": torch.zeros(1000), "betas": torch.linspace(0.00085, 0.012, 1000),
            "stray.weight": torch.ones(3)}
    return {"state_dict": {**state, **junk}, "epoch": 3, "global_step": 10,
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-5}]}]}


@pytest.fixture(scope="module")
def guidance_ckpt(components, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "attentionhand.ckpt"
    torch.save(lightning_checkpoint(public_controlnet(components["controlnet"])), path)
    return path


def controlnet_outputs(model, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, 32, 32, generator=gen)
    text = torch.randn(2, 77, model.config.cross_attention_dim, generator=gen)
    size = 32 * 2 ** (len(model.config.conditioning_embedding_out_channels) - 1)  # the hint encoder downsamples
    hint = torch.rand(2, model.config.conditioning_channels, size, size, generator=gen)
    with torch.no_grad():
        down, mid = model(sample, torch.tensor([999, 10]), encoder_hidden_states=text, controlnet_cond=hint,
                          return_dict=False)
    return [*down, mid]


def assert_same_weights(converted, original):
    ours, theirs = converted.state_dict(), original.state_dict()
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key


# --- round trips -----------------------------------------------------------------------------------

def test_guidance_round_trip(components, guidance_ckpt, tiny_sd_dir, tmp_path):
    from diffusers import ControlNetModel

    from handsynth.attentionhand.convert import convert_checkpoint
    from handsynth.attentionhand.loading import load_guidance_module
    from handsynth.io import sha256_file

    out = tmp_path / "models" / "attentionhand"
    report = convert_checkpoint(guidance_ckpt, out, base=str(tiny_sd_dir))
    loaded = ControlNetModel.from_pretrained(out / "controlnet").eval()
    original = components["controlnet"]
    assert_same_weights(loaded, original)
    for a, b in zip(controlnet_outputs(loaded), controlnet_outputs(original)):
        assert torch.equal(a, b)
    assert (out / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["controlnet", "conversion_report.json"]

    saved = json.loads((out / "conversion_report.json").read_text())
    n_vas = len(original.state_dict())
    assert saved["sha256"] == sha256_file(guidance_ckpt)
    assert saved["parts"]["controlnet"] == {"converted": n_vas, "expected": n_vas, "missing": [], "missing_from": {}}
    assert saved["unused"] == ["stray.weight"]
    assert saved["source_keys"] == n_vas + 3
    assert saved["ignored_keys"] == 2 and saved["converted_keys"] == n_vas
    assert saved["top_level_entries_ignored"] == ["epoch", "global_step", "optimizer_states"]
    assert report.unused == ["stray.weight"]
    assert_same_weights(load_guidance_module(out), original)  # what recipes' model.guidance points to


def test_shape_inference_without_base(tmp_path):
    """No --base: channel counts and layout come from the weights, the rest from SD1.5's defaults."""
    from diffusers import ControlNetModel

    from handsynth.attentionhand.convert import convert_checkpoint

    torch.manual_seed(0)
    original = perturb(ControlNetModel(
        in_channels=4, conditioning_channels=1, block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), cross_attention_dim=24,
        conditioning_embedding_out_channels=(8, 16, 24, 32), transformer_layers_per_block=(1, 2, 2),
        use_linear_projection=True), 3).eval()
    ckpt = tmp_path / "small.safetensors"
    from safetensors.torch import save_file

    save_file(public_controlnet(original), ckpt)
    convert_checkpoint(ckpt, tmp_path / "out")
    loaded = ControlNetModel.from_pretrained(tmp_path / "out" / "controlnet").eval()
    for name in ("conditioning_channels", "block_out_channels", "layers_per_block", "down_block_types",
                 "cross_attention_dim", "conditioning_embedding_out_channels", "use_linear_projection"):
        assert json.dumps(loaded.config[name]) == json.dumps(original.config[name]), name
    assert list(loaded.config.transformer_layers_per_block) == [1, 2, 2]
    assert_same_weights(loaded, original)
    for a, b in zip(controlnet_outputs(loaded), controlnet_outputs(original)):
        assert torch.equal(a, b)


def test_full_round_trip(components, tiny_sd_dir, tmp_path, capsys):
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from handsynth.attentionhand.pipeline import AttentionHandPipeline

    state = {**public_controlnet(components["controlnet"]), **public_unet(components["unet"]),
             **public_vae(components["vae"]), **public_text_encoder(components["text_encoder"])}
    ckpt = tmp_path / "full.ckpt"
    torch.save(lightning_checkpoint(state), ckpt)
    out = tmp_path / "full"
    assert main(["convert", "--ckpt", str(ckpt), "--out", str(out), "--full", "--base", str(tiny_sd_dir)]) == 0
    printed = capsys.readouterr()
    assert "1 key(s) of the checkpoint were not used: stray.weight" in printed.err
    assert "converted: unet" in printed.out and "converted: text_encoder" in printed.out

    assert_same_weights(ControlNetModel.from_pretrained(out / "controlnet"), components["controlnet"])
    assert_same_weights(UNet2DConditionModel.from_pretrained(out / "unet"), components["unet"])
    assert_same_weights(AutoencoderKL.from_pretrained(out / "vae"), components["vae"])
    assert_same_weights(CLIPTextModel.from_pretrained(out / "text_encoder"), components["text_encoder"])
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    assert tokenizer("a hand").input_ids == components["tokenizer"]("a hand").input_ids
    assert (out / "scheduler" / "scheduler_config.json").read_text() == \
        (tiny_sd_dir / "scheduler" / "scheduler_config.json").read_text()
    pipe = AttentionHandPipeline.from_pretrained(out)  # the folder is a whole pipeline
    assert_same_weights(pipe.controlnet, components["controlnet"])
    assert_same_weights(pipe.unet, components["unet"])
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["unused"] == ["stray.weight"]
    assert all(not p["missing"] and p["converted"] == p["expected"] for p in report["parts"].values())
    assert report["converted_keys"] == len(state)


# --- missing and unused keys ----------------------------------------------------------------------

def test_missing_guidance_key_fails_then_allowed(components, tiny_sd_dir, tmp_path, capsys):
    from diffusers import ControlNetModel

    state = public_controlnet(components["controlnet"])
    # down_blocks.0.resnets.1.conv2.weight in diffusers' names (input block 2, layers per block 2)
    del state["VAS.input_blocks.2.0.out_layers.3.weight"]
    ckpt = tmp_path / "broken.ckpt"
    torch.save(lightning_checkpoint(state), ckpt)
    out = tmp_path / "out"
    code = main(["convert", "--ckpt", str(ckpt), "--out", str(out), "--base", str(tiny_sd_dir)])
    err = capsys.readouterr().err
    assert code == InputError.exit_code
    assert "controlnet down_blocks.0.resnets.1.conv2.weight (from VAS.input_blocks.2.0.out_layers.3.weight)" in err
    assert "--allow-missing" in err
    assert not out.exists()

    code = main(["convert", "--ckpt", str(ckpt), "--out", str(out), "--base", str(tiny_sd_dir), "--allow-missing"])
    assert code == 0
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["missing"] == {"controlnet": ["down_blocks.0.resnets.1.conv2.weight"]}
    assert report["parts"]["controlnet"]["missing_from"] == {
        "down_blocks.0.resnets.1.conv2.weight": "VAS.input_blocks.2.0.out_layers.3.weight"}
    assert report["parts"]["controlnet"]["converted"] == report["parts"]["controlnet"]["expected"] - 1
    loaded = ControlNetModel.from_pretrained(out / "controlnet")
    original = components["controlnet"].state_dict()
    for key, value in loaded.state_dict().items():
        if key != "down_blocks.0.resnets.1.conv2.weight":
            assert torch.equal(value, original[key]), key


def test_checkpoint_without_guidance_module(tmp_path):
    from handsynth.attentionhand.convert import convert_checkpoint

    ckpt = tmp_path / "sd15_ini.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.out.0.weight": torch.ones(4)}}, ckpt)
    with pytest.raises(InputError, match="no VAS") as info:
        convert_checkpoint(ckpt, tmp_path / "out")
    assert f"{ckpt}, field state_dict" in info.value.message


# --- safe loading -----------------------------------------------------------------------------------

class Payload:
    """An object whose unpickling would create a file: proof of code execution if it ever appears."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class Custom:
    """A plain user class: not a tensor, not Lightning bookkeeping."""

    def __init__(self):
        self.value = 1


@pytest.mark.parametrize("payload", ["reduce", "class"])
def test_pickled_objects_are_refused(guidance_ckpt, tmp_path, payload):
    from handsynth.attentionhand.convert import convert_checkpoint

    marker = tmp_path / "executed"
    ckpt = tmp_path / "evil.ckpt"
    state = torch.load(guidance_ckpt, weights_only=True)
    state["hyper_parameters"] = Payload(marker) if payload == "reduce" else Custom()
    torch.save(state, ckpt)
    assert not marker.exists()
    with pytest.raises(InputError, match="pickled objects beyond tensors") as info:
        convert_checkpoint(ckpt, tmp_path / "out")
    assert (f"{open.__module__}.open" if payload == "reduce" else "Custom") in info.value.message
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_lightning_bookkeeping_is_read_inertly(components, guidance_ckpt, tmp_path, monkeypatch):
    """Lightning callback classes and hyper-parameter objects are bound to an inert stand-in, never run."""
    from diffusers import ControlNetModel

    from handsynth.attentionhand.convert import convert_checkpoint

    marker = tmp_path / "executed"
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __setstate__(self, state):
            open(marker, "w").close()

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module.__name__, "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__):
        monkeypatch.setitem(sys.modules, name, module if name == module.__name__ else types.ModuleType(name))
    state = torch.load(guidance_ckpt, weights_only=True)
    callback = ModelCheckpoint()
    callback.best_model_path = "epoch=3.ckpt"
    state["callbacks"] = {ModelCheckpoint: {"best_model_score": torch.tensor(0.1)}}
    state["hyper_parameters"] = callback
    ckpt = tmp_path / "lightning.ckpt"
    torch.save(state, ckpt)
    with pytest.raises(pickle.UnpicklingError):  # plain weights_only loading refuses this file
        torch.load(ckpt, weights_only=True)

    report = convert_checkpoint(ckpt, tmp_path / "out")
    assert not marker.exists()
    assert "callbacks" in report.top_level and "hyper_parameters" in report.top_level
    assert ControlNetModel.from_pretrained(tmp_path / "out" / "controlnet").config.block_out_channels == [32, 64]


def test_safetensors_input_and_truncated_file(components, tmp_path):
    from safetensors.torch import save_file

    from handsynth.attentionhand.convert import load_checkpoint

    state = public_controlnet(components["controlnet"])
    path = tmp_path / "w.safetensors"
    save_file(state, path)
    loaded, top = load_checkpoint(path)
    assert top == [] and all(torch.equal(loaded[k], v) for k, v in state.items())
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(InputError, match="safetensors"):
        load_checkpoint(path)


# --- output safety and the command line --------------------------------------------------------

def test_overwrite_replaces_only_an_earlier_conversion(guidance_ckpt, tiny_sd_dir, tmp_path, capsys):
    """--overwrite never deletes a folder of the user's files or a plain file; it replaces a folder the
    same command wrote (recognised by its report); output folders get the umask's permissions."""
    import os
    import stat

    def convert_into(out, *extra):
        return main(["convert", "--ckpt", str(guidance_ckpt), "--out", str(out), "--base", str(tiny_sd_dir),
                     *extra])

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("earlier work")
    assert convert_into(mine) == OutputError.exit_code
    capsys.readouterr()
    assert convert_into(mine, "--overwrite") == OutputError.exit_code
    err = " ".join(capsys.readouterr().err.split())
    assert "replaces only a folder an earlier `handsynth convert` wrote" in err and "Traceback" not in err
    assert [p.name for p in mine.iterdir()] == ["keep.txt"] and (mine / "keep.txt").read_text() == "earlier work"
    plain = tmp_path / "plain"
    plain.write_text("a file")
    assert convert_into(plain, "--overwrite") == OutputError.exit_code
    assert plain.read_text() == "a file"

    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        assert convert_into(out) == 0
        first = (out / "conversion_report.json").read_bytes()
        (out / "controlnet" / "stale.bin").write_bytes(b"x")      # inside a part: replaced with the rest
        assert convert_into(out, "--overwrite") == 0
    finally:
        os.umask(old)
    assert sorted(p.name for p in out.iterdir()) == ["controlnet", "conversion_report.json"]
    assert not (out / "controlnet" / "stale.bin").exists()
    assert (out / "conversion_report.json").read_bytes() == first
    for folder in (out, out / "controlnet"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder
    (out / "notes.txt").write_text("mine")                         # a user's file beside the conversion
    assert convert_into(out, "--overwrite") == OutputError.exit_code
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp, backup or lock


def test_cli_missing_checkpoint(tmp_path, capsys):
    assert main(["convert", "--ckpt", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "o")]) == 3
    assert "nope.ckpt" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_bad_inputs(guidance_ckpt, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"PK\x03\x04 not really a checkpoint")
    assert main(["convert", "--ckpt", str(corrupt), "--out", str(tmp_path / "a")]) == InputError.exit_code
    assert "not a readable PyTorch checkpoint" in capsys.readouterr().err
    garbage = tmp_path / "garbage.ckpt"  # a legacy (non-zip) pickle stream of random bytes
    garbage.write_bytes(b"hello\n" * 3)
    assert main(["convert", "--ckpt", str(garbage), "--out", str(tmp_path / "a")]) == InputError.exit_code
    err = capsys.readouterr().err
    assert "not a readable PyTorch checkpoint" in err and "garbage.ckpt" in err and "Traceback" not in err
    assert main(["convert", "--ckpt", str(tmp_path), "--out", str(tmp_path / "a")]) == 3
    assert "is a folder, not a file" in capsys.readouterr().err

    missing_base = tmp_path / "no-such-model"
    code = main(["convert", "--ckpt", str(guidance_ckpt), "--out", str(tmp_path / "b"), "--full",
                 "--base", str(missing_base)])
    assert code == 3 and "no-such-model" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

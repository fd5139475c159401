"""The guidance module: a ControlNet copied from the UNet, zero residuals when fresh, safetensors round trip."""

import numpy as np
import pytest
import torch

from handsynth.attentionhand.guidance import build_guidance_module, freeze, residuals_are_zero
from handsynth.attentionhand.loading import load_guidance_module
from handsynth.errors import MissingResourceError
from tests.fixtures.attentionhand_pipeline import make_pipeline, mesh_images, pretend_trained


@pytest.fixture(scope="module")
def unet(clip_tokenizer_dir):
    from tests.fixtures.diffusion import get_dummy_components

    return get_dummy_components(clip_tokenizer_dir)["unet"]


def _residuals(controlnet, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((2, 4, 32, 32), generator=gen)
    text = torch.randn((2, 77, 32), generator=gen)
    mesh = torch.rand((2, 3, 64, 64), generator=gen)
    with torch.no_grad():
        down, mid = controlnet(x, torch.tensor(500), encoder_hidden_states=text, controlnet_cond=mesh,
                               return_dict=False)
    return [*down, mid]


def test_fresh_module_copies_the_unet_encoder_and_adds_zero(unet):
    controlnet = build_guidance_module(unet, vae_scale_factor=2)
    assert controlnet.config.conditioning_channels == 3
    for mine, theirs in [(controlnet.down_blocks, unet.down_blocks), (controlnet.mid_block, unet.mid_block),
                         (controlnet.conv_in, unet.conv_in), (controlnet.time_embedding, unet.time_embedding)]:
        ref = theirs.state_dict()
        assert all(torch.equal(v, ref[k]) for k, v in mine.state_dict().items())
    residuals = _residuals(controlnet)
    assert len(residuals) == len(controlnet.controlnet_down_blocks) + 1  # one per UNet skip + the middle
    assert all(r.abs().max() == 0 for r in residuals) and residuals_are_zero(controlnet)
    # the hint encoder takes the 64x64 mesh image to the 32x32 latent grid
    assert residuals[0].shape[-2:] == (32, 32)
    pretend_trained(controlnet)
    assert not residuals_are_zero(controlnet) and all(r.abs().max() > 0 for r in _residuals(controlnet))


def test_sd15_hint_encoder_has_three_downsamplings(unet):
    assert len(build_guidance_module(unet, 8).controlnet_cond_embedding.blocks) == 6  # 16,32,96,256 widths
    with pytest.raises(ValueError, match="vae_scale_factor"):
        build_guidance_module(unet, 3)


def test_freeze(unet):
    controlnet = build_guidance_module(unet, 2).train()
    freeze(controlnet)
    assert not controlnet.training and not any(p.requires_grad for p in controlnet.parameters())


def test_guidance_module_save_load_round_trip(clip_tokenizer_dir, tmp_path):
    pipe = make_pipeline(clip_tokenizer_dir)
    pipe.controlnet.save_pretrained(tmp_path / "guidance")
    files = sorted(p.name for p in (tmp_path / "guidance").iterdir())
    assert files == ["config.json", "diffusion_pytorch_model.safetensors"]
    loaded = load_guidance_module(tmp_path / "guidance")
    ref = pipe.controlnet.state_dict()
    assert loaded.state_dict().keys() == ref.keys()
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())

    kwargs = dict(num_inference_steps=2, output_type="np")
    before = pipe("a hand holding a cup", mesh_images(1), generator=[torch.Generator().manual_seed(0)], **kwargs)
    pipe.controlnet = loaded  # the pipeline reads its components as attributes
    after = pipe("a hand holding a cup", mesh_images(1), generator=[torch.Generator().manual_seed(0)], **kwargs)
    assert np.array_equal(before.images, after.images)
    # a whole pipeline folder also works as a guidance source (its controlnet/ subfolder)
    pipe.save_pretrained(tmp_path / "pipe")
    again = load_guidance_module(tmp_path / "pipe")
    assert all(torch.equal(v, ref[k]) for k, v in again.state_dict().items())


def test_pickled_weights_are_refused(clip_tokenizer_dir, tmp_path):
    pipe = make_pipeline(clip_tokenizer_dir)
    pipe.controlnet.save_pretrained(tmp_path / "old", safe_serialization=False)
    assert (tmp_path / "old" / "diffusion_pytorch_model.bin").exists()
    with pytest.raises(MissingResourceError, match=r"\.safetensors") as err:
        load_guidance_module(tmp_path / "old")
    assert str(tmp_path / "old") in err.value.message

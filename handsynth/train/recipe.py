"""Training recipes: a generation recipe's sections (inputs, model, tas, image, prompts, seed) plus ``train``.

The same loader (:func:`handsynth.prompts.recipe.load_recipe`) reads them, with the same line-accurate
errors. What the shared sections mean for training:

- ``model.base``: the SD1.5 base (hub id or folder), frozen; ``model.guidance``: the module to start from -
  ``none`` (default) for a fresh guidance module copied from the base UNet (zero output convolutions), or
  any guidance module generation accepts (fine-tuning); ``model.precision``: ``fp32`` (default, as the public
  code) or ``fp16`` / ``bf16`` mixed precision (frozen weights in that type, the trained module in float32);
- ``tas``: the Text Attention Stage on both noisy latents of every step - ``iterations`` updates at the
  sampled timestep with step sizes from ``step_size_start`` to ``step_size_end`` (``enabled: false``: no
  TAS; ``max_steps`` is a generation setting and is not used);
- ``image``: ``size`` is the training size and ``fit`` (crop | stretch) cuts the real image and the mesh
  image exactly as generation cuts the mesh image; ``format`` / ``quality``: the validation images;
- ``sampler``: how the validation images are sampled; ``prompts`` (render runs): the captions, by the
  frame's hands, as in generation (a modalities file brings its own);
- ``batch_size``: samples per device per micro-batch (the public code: 1);
- ``branches`` is a generation setting and is not used: training always has both branches (weighted by
  ``train.lambda_global`` / ``train.lambda_local``) and reads every frame's local mesh image.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from handsynth.prompts.recipe import ModelConfig, Recipe, _Strict


class TrainModelConfig(ModelConfig):
    guidance: str = "none"
    precision: Literal["fp16", "bf16", "fp32"] = "fp32"


class TrainSettings(_Strict):
    """The optimisation (defaults: the paper's and public code's - AdamW, lr 1e-5, lambda 0.5 / 0.5)."""

    steps: int = Field(10000, ge=1)                     # optimiser steps (the LR schedule's length)
    gradient_accumulation: int = Field(1, ge=1)         # micro-batches per optimiser step
    learning_rate: float = Field(1e-5, gt=0.0)
    lr_schedule: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.01, ge=0.0)           # torch's AdamW default, as the public code
    optimizer: Literal["adamw", "adamw-8bit"] = "adamw"
    max_grad_norm: float = Field(0.0, ge=0.0)           # 0: no clipping (the public code clips nothing)
    gradient_checkpointing: bool = False
    target: Literal["residual", "noise"] = "residual"
    lambda_global: float = Field(0.5, ge=0.0)
    lambda_local: float = Field(0.5, ge=0.0)
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    validate_every: int = Field(500, ge=0)              # 0: no validation images
    validation_count: int = Field(2, ge=1)              # the first N training frames, with fixed seeds
    log_every: int = Field(10, ge=1)


class TrainRecipe(Recipe):
    model: TrainModelConfig = Field(default_factory=TrainModelConfig)
    batch_size: int = Field(1, ge=1)
    train: TrainSettings = Field(default_factory=TrainSettings)


def load_train_recipe(path):
    """Read, validate and resolve a training recipe (InputError with file, field, line and fix)."""
    from handsynth.errors import InputError
    from handsynth.prompts.recipe import load_recipe

    recipe = load_recipe(path, TrainRecipe)
    if recipe.image.fit == "native":
        raise InputError("image.fit 'native' keeps each frame's own aspect, but a training batch needs one size",
                         where=f"{recipe.path}, field image.fit", fix="use image.fit crop (default) or stretch")
    if recipe.train.lambda_global == 0 and recipe.train.lambda_local == 0:
        raise InputError("train.lambda_global and train.lambda_local are both 0: nothing would be trained",
                         where=f"{recipe.path}, field train.lambda_global",
                         fix="give at least one branch a positive weight (the paper: 0.5 and 0.5)")
    return recipe

"""Augmentation recipes: the pydantic schema of ``handsynth augment`` and its YAML loading.

Loading goes through :func:`handsynth.prompts.recipe.load_yaml_model`, the same machinery as the
generation recipes: unknown keys, wrong types and out-of-range values raise
:class:`~handsynth.errors.InputError` naming the recipe file, the field path (e.g.
``viewpoint.fov_deg``), its line and a fix. Every field has a default (the commented
the shipped ``augment`` recipe (``handsynth recipes copy augment``) lists them all); each knob has an off-switch (``enabled: false``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from handsynth.prompts.recipe import _defaults_used, load_yaml_model

EXAMPLE = "augment.yaml (`handsynth recipes copy augment`)"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


def _ordered(value: tuple[float, float]) -> tuple[float, float]:
    if value[0] > value[1]:
        raise ValueError(f"a range is [low, high] with low <= high, got {list(value)}")
    return value


def _range(lo: float, hi: float) -> Any:
    """A [low, high] pair with both ends in [lo, hi]."""
    end = Annotated[float, Field(ge=lo, le=hi)]
    return Annotated[tuple[end, end], AfterValidator(_ordered)]


Azimuth = _range(-360.0, 360.0)
Elevation = _range(-90.0, 90.0)
Roll = _range(-180.0, 180.0)
Share = _range(0.01, 1.0)
Fov = _range(5.0, 150.0)
Fraction = _range(0.0, 1.0)
Size = tuple[Annotated[int, Field(ge=16, le=8192)], Annotated[int, Field(ge=16, le=8192)]]


class ViewpointConfig(_Strict):
    """The camera orbits the hands' centre; see handsynth/augment/camera.py."""

    enabled: bool = True
    azimuth_deg: Azimuth = (-180.0, 180.0)
    elevation_deg: Elevation = (-60.0, 60.0)
    roll_deg: Roll = (-90.0, 90.0)
    hand_share: Share = (0.3, 0.7)
    offset: float = Field(0.8, ge=0.0, le=1.0)
    fov_deg: Fov = (40.0, 75.0)
    image_sizes: list[Size] = Field(default_factory=lambda: [(512, 512), (640, 480), (480, 640)], min_length=1)
    margin_px: float = Field(2.0, ge=0.0, le=64.0)


class SigmaDeg(_Strict):
    bend: float = Field(12.0, ge=0.0, le=90.0)
    splay: float = Field(5.0, ge=0.0, le=90.0)
    twist: float = Field(2.0, ge=0.0, le=90.0)


class PerturbConfig(_Strict):
    enabled: bool = True
    sigma_deg: SigmaDeg = Field(default_factory=SigmaDeg)


class InterpolateConfig(_Strict):
    enabled: bool = True
    probability: float = Field(0.5, ge=0.0, le=1.0)
    t: Fraction = (0.2, 0.8)


class PoseConfig(_Strict):
    interpolate: InterpolateConfig = Field(default_factory=InterpolateConfig)
    perturb: PerturbConfig = Field(default_factory=PerturbConfig)


class ShapeConfig(_Strict):
    enabled: bool = True
    sigma: float = Field(1.0, ge=0.0, le=10.0)
    clip: float = Field(2.5, gt=0.0, le=10.0)


class RelativeConfig(_Strict):
    enabled: bool = False
    rotation_deg: float = Field(10.0, ge=0.0, le=180.0)
    translation_m: float = Field(0.02, ge=0.0, le=1.0)


class TwoHandsConfig(_Strict):
    perturb: RelativeConfig = Field(default_factory=RelativeConfig)
    check_penetration: bool = True
    max_penetration_mm: float = Field(5.0, ge=0.0)


class AugmentRecipe(_Strict):
    seed: int = Field(0, ge=0)
    max_attempts: int = Field(20, ge=1, le=10000)
    viewpoint: ViewpointConfig = Field(default_factory=ViewpointConfig)
    pose: PoseConfig = Field(default_factory=PoseConfig)
    shape: ShapeConfig = Field(default_factory=ShapeConfig)
    two_hands: TwoHandsConfig = Field(default_factory=TwoHandsConfig)


def load_augment_recipe(path: str | Path) -> tuple[AugmentRecipe, dict[str, Any]]:
    """The validated recipe and every field it left at its default (``{dotted.path: value}``)."""
    recipe, _, _ = load_yaml_model(path, AugmentRecipe, example=EXAMPLE)
    return recipe, _defaults_used(recipe)

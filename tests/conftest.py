"""Shared test configuration. Fixture modules live in tests/fixtures/ and are loaded here."""

import os
from pathlib import Path

# Headless rendering: choose the OpenGL platform before anything imports OpenGL.
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

pytest_plugins = sorted(
    f"tests.fixtures.{p.stem}" for p in (Path(__file__).parent / "fixtures").glob("*.py") if p.stem != "__init__"
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
RECIPES_DIR = Path(__file__).resolve().parents[1] / "handsynth" / "recipes"
AUGMENT_RECIPE = RECIPES_DIR / "augment.yaml"
TRAIN_RECIPES = sorted(RECIPES_DIR.glob("train-*.yaml"))                                 # handsynth train
SHIPPED_RECIPES = sorted(p for p in RECIPES_DIR.glob("*.yaml")
                         if p != AUGMENT_RECIPE and p not in TRAIN_RECIPES)               # generation recipes

"""The shipped recipes: inside the package (and its wheel), found by bare name, listed and copied out."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from handsynth.cli import main
from handsynth.errors import InputError
from handsynth.prompts.library import SHIPPED_DIR, find_recipe, shipped_recipes
from handsynth.prompts.recipe import load_recipe
from tests.conftest import AUGMENT_RECIPE, SHIPPED_RECIPES, TRAIN_RECIPES

REPO = Path(__file__).resolve().parents[1]
ALL_RECIPES = sorted([*SHIPPED_RECIPES, AUGMENT_RECIPE, *TRAIN_RECIPES])   # generation, augmentation, training
NAMES = [p.stem for p in ALL_RECIPES]
DESIGN_CARD_RECIPES = {"indoor", "kitchen-workshop", "outdoor", "sports-street"}


def test_the_recipes_live_in_the_package_and_the_repository_links_to_them():
    assert SHIPPED_DIR == REPO / "handsynth" / "recipes"
    assert list(shipped_recipes()) == NAMES and DESIGN_CARD_RECIPES <= set(NAMES)
    assert (REPO / "recipes").resolve() == SHIPPED_DIR          # ./recipes is a link, not a second copy


def test_a_built_wheel_holds_every_shipped_recipe(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "handsynth", source / "handsynth", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(source),
                    "-w", str(tmp_path / "dist")], check=True, cwd=tmp_path, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("handsynth-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        members = {n: zf.read(n) for n in zf.namelist() if n.startswith("handsynth/recipes/")}
    assert members == {f"handsynth/recipes/{p.name}": p.read_bytes() for p in ALL_RECIPES}


@pytest.mark.parametrize("typed", ["outdoor.yaml", "outdoor", "outdoor.yml"])
def test_a_bare_name_is_the_shipped_recipe_when_no_such_file_is_here(tmp_path, monkeypatch, capsys, typed):
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(typed)
    assert recipe.path == SHIPPED_DIR / "outdoor.yaml"
    assert recipe.output == Path("runs") / "outdoor-gen"               # in the working directory, not the package
    assert f"using the shipped recipe {SHIPPED_DIR / 'outdoor.yaml'}" in capsys.readouterr().err.replace("\n", "")


def test_a_file_in_the_working_directory_wins_over_the_shipped_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = (SHIPPED_DIR / "outdoor.yaml").read_text().replace("seed: 0 ", "seed: 5 ")
    Path("outdoor.yaml").write_text(text)
    assert find_recipe("outdoor.yaml") == (Path("outdoor.yaml"), False)
    assert load_recipe("outdoor.yaml").seed == 5
    # a name with a folder is never replaced by a shipped recipe
    with pytest.raises(InputError, match="not found") as err:
        load_recipe("elsewhere/indoor.yaml")
    assert all(name in err.value.fix for name in NAMES)


def test_recipes_lists_and_copies_out(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["recipes"]) == 0
    listed = capsys.readouterr().out
    for name in NAMES:
        assert f"  {name} " in listed
    assert main(["recipes", "copy", "outdoor"]) == 0
    assert Path("outdoor.yaml").read_bytes() == (SHIPPED_DIR / "outdoor.yaml").read_bytes()
    assert main(["recipes", "copy", "indoor.yaml", "mine"]) == 0 and Path("mine").is_file()
    Path("edits").mkdir()
    assert main(["recipes", "copy", "sports-street", "edits"]) == 0
    assert (Path("edits") / "sports-street.yaml").read_bytes() == (SHIPPED_DIR / "sports-street.yaml").read_bytes()
    capsys.readouterr()

    Path("outdoor.yaml").write_text("seed: 3  # my edits\n")
    assert main(["recipes", "copy", "outdoor"]) == 4                # never overwrites the user's edits
    assert Path("outdoor.yaml").read_text() == "seed: 3  # my edits\n"
    assert "already exists" in capsys.readouterr().err
    assert main(["recipes", "copy", "outdoor", "--force"]) == 0
    assert Path("outdoor.yaml").read_bytes() == (SHIPPED_DIR / "outdoor.yaml").read_bytes()

    assert main(["recipes", "copy", "nonesuch"]) == 2
    assert "no shipped recipe named 'nonesuch'" in capsys.readouterr().err

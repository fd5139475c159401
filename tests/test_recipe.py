"""Recipe loading: defaults, path resolution, and every bad-recipe case through the CLI."""

from __future__ import annotations

import contextlib
import signal
import textwrap
from pathlib import Path

import pytest

from handsynth.cli import main
from handsynth.errors import InputError
from handsynth.prompts import load_recipe
from tests.conftest import SHARED, SHIPPED_RECIPES
from tests.fixtures.generate import write_gen_recipe

MINIMAL = """\
seed: 3
prompts:
  templates:
    right: ["{person} [holding] {thing} with the right [hand]"]
    left: ["{person} [holding] {thing} with the left [hand]"]
    both: ["{person} [clapping] both [hands]"]
  slots:
    person: [a woman, a man]
    thing: [a cup, an umbrella]
"""


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def run_prompts(path: Path, capsys, *extra: str) -> tuple[int, str]:
    code = main(["prompts", "--recipe", str(path), "--count", "2", "--no-tokens", *extra])
    captured = capsys.readouterr()
    return code, " ".join((captured.out + captured.err).split())


def test_defaults_and_resolution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg" / "runs" / "ih").mkdir(parents=True)
    path = write(tmp_path / "cfg", MINIMAL + "inputs: {run: runs/ih}\noutput: out/here\n", "My Recipe.yaml")
    r = load_recipe(path)
    assert r.seed == 3 and r.sampler.steps == 20 and r.sampler.guidance_scale == 9.0
    assert r.sampler.scheduler == "ddim" and r.sampler.eta == 0.0 and r.sampler.negative_prompt == ""
    assert r.model.base == "stable-diffusion-v1-5/stable-diffusion-v1-5" and r.model.precision == "fp16"
    assert r.model.guidance == "models/attentionhand"
    assert r.tas.max_steps == 10 and r.tas.step_size_start == 20.0 and r.tas.step_size_end == 10.0
    assert r.image.size == 512 and r.image.format == "jpg" and r.batch_size == 4
    assert r.branches == ["global"] and r.defaults["branches"] == ["global"]      # one image per sample
    # relative paths in the recipe resolve against its folder
    assert r.inputs.run == (tmp_path / "cfg" / "runs" / "ih").resolve()
    assert r.output == (tmp_path / "cfg" / "out" / "here").resolve()
    assert r.defaults["sampler.steps"] == 20 and "output" not in r.defaults
    # the default output folder is runs/<sanitised recipe stem>-gen in the working directory
    r2 = load_recipe(write(tmp_path, MINIMAL, "Kitchen v2.yaml"))
    assert r2.output == Path("runs/kitchen-v2-gen") and r2.defaults["output"] == Path("runs/kitchen-v2-gen")


def test_tas_section_mirrors_tasconfig():
    import dataclasses

    from handsynth.attentionhand.tas import TASConfig
    from handsynth.prompts.recipe import TASSettings

    fields = {f.name: f.default for f in dataclasses.fields(TASConfig)}
    assert fields == TASSettings().model_dump()


def test_modalities_inputs_need_no_prompts(tmp_path):
    sample = SHARED / "samples" / "attentionhand-official" / "modalities.json"
    r = load_recipe(write(tmp_path, f"inputs: {{modalities: {sample}}}\n"))
    assert r.prompts is None and r.inputs.modalities == sample and r.inputs.root is None


def test_model_paths_beside_the_recipe_then_in_the_working_directory(tmp_path, monkeypatch):
    work, cfg = tmp_path / "work", tmp_path / "cfg"
    (work / "models" / "attentionhand").mkdir(parents=True)
    (work / "models" / "depth.safetensors").write_bytes(b"")
    (cfg / "models" / "sd15").mkdir(parents=True)
    monkeypatch.chdir(work)
    model = "model:\n  base: models/sd15\n  guidance: {}\n  condition: depth\n"
    r = load_recipe(write(cfg, MINIMAL + model.format("models/attentionhand")))
    assert r.model.base == str((cfg / "models" / "sd15").resolve())                 # beside the recipe
    assert r.model.guidance == str((work / "models" / "attentionhand").resolve())   # else the working directory
    assert r.model.condition == "depth"
    r = load_recipe(write(cfg, MINIMAL + model.format("models/depth.safetensors")))
    assert r.model.guidance == str((work / "models" / "depth.safetensors").resolve())
    (cfg / "models" / "attentionhand").mkdir()
    r = load_recipe(write(cfg, MINIMAL + model.format("models/attentionhand")))
    assert r.model.guidance == str((cfg / "models" / "attentionhand").resolve())    # the recipe's folder first
    for written in ("none", "lllyasviel/control_v11f1p_sd15_depth", "models/not-here"):
        assert load_recipe(write(cfg, MINIMAL + model.format(written))).model.guidance == written


@pytest.mark.parametrize("path", SHIPPED_RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_load(path):
    r = load_recipe(path)
    assert r.prompts is not None and r.inputs is None
    assert r.output == Path("runs") / f"{path.stem}-gen"


BAD = {
    "unknown_key": (
        MINIMAL + "sampler:\n  stepz: 30\n",
        ["unknown key 'stepz'", "field sampler.stepz, line 11", "did you mean 'steps'"],
    ),
    "unknown_top_key": (
        "sed: 1\n" + MINIMAL,
        ["unknown key 'sed'", "field sed, line 1", "did you mean 'seed'"],
    ),
    "wrong_type": (
        MINIMAL + "sampler:\n  steps: many\n",
        ["sampler.steps", "line 11", "valid integer", "'many'"],
    ),
    "empty_vocabulary": (
        MINIMAL + "    empty: []\n",
        ["slot 'empty' has an empty vocabulary", "field prompts.slots.empty.values, line 10"],
    ),
    "unknown_slot": (
        MINIMAL.replace("{person} [clapping]", "{persn} [clapping]"),
        ["template uses '{persn}'", "field prompts.templates.both[0], line 6", "did you mean '{person}'"],
    ),
    "missing_inputs_path": (
        MINIMAL + "inputs:\n  run: no/such/run\n",
        ["render run directory 'no/such/run' does not exist", "field inputs.run, line 11", "handsynth render"],
    ),
    "bad_precision": (
        MINIMAL + "model:\n  precision: fp8\n",
        ["model.precision is 'fp8'", "line 11", "'fp16', 'bf16' or 'fp32'"],
    ),
    "unbalanced_bracket": (
        MINIMAL.replace("[a woman, a man]", "['[a woman', a man]"),
        ["'[' without a matching ']'", "prompts.slots.person.values[0], line 8"],
    ),
    "missing_templates_key": (
        MINIMAL.replace('    both: ["{person} [clapping] both [hands]"]\n', ""),
        ["required key 'both' is missing", "prompts.templates"],
    ),
    "weight_not_positive": (
        MINIMAL.replace("[a woman, a man]", "[{text: a woman, weight: 0}, a man]"),
        ["prompts.slots.person.values[0].weight", "greater than 0"],
    ),
    "no_prompts": ("seed: 1\n", ["no 'prompts' section"]),
    "even_kernel": (
        MINIMAL + "tas:\n  kernel_size: 4\n",
        ["tas.kernel_size", "line 11", "odd size", "got 4"],
    ),
    "both_inputs": (
        MINIMAL + "inputs: {run: ., modalities: r.yaml}\n",
        ["exactly one of 'run' or 'modalities'", "field inputs, line 10"],
    ),
    "duplicate_key": (
        "seed: 1\nseed: 2\n" + MINIMAL.replace("seed: 3\n", ""),
        ["key 'seed' appears twice", "line 2"],
    ),
    "local_branch_only": (
        MINIMAL + "branches: [local]\n",
        ["field branches, line 10", "must be [global] (one image per sample) or [global, local]"],
    ),
    "unknown_branch": (
        MINIMAL + "branches: [global, crop]\n",
        ["branches[1] is 'crop'", "line 10", "'global' or 'local'"],
    ),
    "bad_yaml": ("seed: [1\n", ["not valid YAML"]),
    "not_a_mapping": ("- a\n- b\n", ["must be a mapping"]),
    "var_clash": (
        MINIMAL.replace("[a woman, a man]", "[{text: a woman, vars: {thing: her}}, a man]"),
        ["variable 'thing' has the name of a slot"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_recipe_cli(tmp_path, capsys, case):
    text, expected = BAD[case]
    path = write(tmp_path, text)
    code, out = run_prompts(path, capsys)
    assert code != 0
    assert str(path) in out or case in ("bad_yaml",)
    for fragment in expected:
        assert fragment in out, (fragment, out)
    assert "Traceback" not in out


def test_missing_recipe_file(tmp_path, capsys):
    code, out = run_prompts(tmp_path / "nope.yaml", capsys)
    assert code != 0 and "recipe file" in out and "not found" in out


def test_error_object_names_file_field_line(tmp_path):
    path = write(tmp_path, MINIMAL + "image:\n  format: gif\n")
    with pytest.raises(InputError) as info:
        load_recipe(path)
    assert info.value.where == f"{path}, field image.format, line 11"
    assert "'jpg' or 'png'" in info.value.fix


def main_generate(capsys, recipe: Path, *args: str) -> tuple[int, str]:
    code = main(["generate", "--recipe", str(recipe), "--device", "cpu", *args])
    captured = capsys.readouterr()
    return code, " ".join((captured.out + captured.err).split())


def test_tas_resolution_checked_with_the_models_vae_factor(tmp_path, capsys, tiny_sd_dir, tiny_guidance_dir):
    """The latent size is the image size over the LOADED model's VAE factor (2 for the tiny model, not
    SD1.5's 8), so the check runs at generate time: 8 does not divide 72 / 2 = 36."""
    modalities = SHARED / "samples" / "attentionhand-official" / "modalities.json"
    recipe = write_gen_recipe(tmp_path, tiny_sd_dir, tiny_guidance_dir, prompts="",
                              extra=f"inputs:\n  modalities: {modalities}\n")
    recipe.write_text(recipe.read_text().replace("size: 64", "size: 72").replace("attention_res: 16",
                                                                                 "attention_res: 8"))
    code, text = main_generate(capsys, recipe, "--out", str(tmp_path / "out"))
    assert code == 2 and f"{recipe}, field tas.attention_res, line 10" in text
    assert "does not divide the latent size 36" in text and "VAE factor 2" in text and "set tas.attention_res to 9" \
        in text
    assert not (tmp_path / "out" / "manifest.json").exists()


def _bomb(levels: int) -> str:
    """A 'billion laughs' recipe: each level lists the previous one ten times (10**levels strings)."""
    lines = ['l0: &l0 ["ha"]']
    lines += [f"l{k}: &l{k} [{', '.join([f'*l{k - 1}'] * 10)}]" for k in range(1, levels + 1)]
    return "\n".join(lines) + "\n" + MINIMAL


@contextlib.contextmanager
def time_limit(seconds: int):
    """Raise TimeoutError in this thread after ``seconds`` (a hang becomes a test failure, not a stuck run)."""
    def stop(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_an_alias_bomb_is_refused_at_once(tmp_path, capsys):
    path = write(tmp_path, _bomb(10))
    assert len(path.read_bytes()) < 1000
    with time_limit(30):
        code, out = run_prompts(path, capsys)
    assert code == 2 and "expands to more than 100,000 values" in out and str(path) in out
    assert "Traceback" not in out


def test_aliases_within_the_budget_still_work(tmp_path):
    text = MINIMAL.replace("person: [a woman, a man]", "person: &people [a woman, a man]") + "    who: *people\n"
    recipe = load_recipe(write(tmp_path, text))
    assert [v.text for v in recipe.prompts.slots["who"].values] == ["a woman", "a man"]
    with pytest.raises(InputError, match="unknown key 'l0'"):       # 1,000 strings: read, then validated
        load_recipe(write(tmp_path, _bomb(3), "small.yaml"))


@pytest.mark.parametrize("text, expected", [
    ("seed: &a [*a]\n", "refers to the anchor (&name) of a node that contains it"),
    ("seed: " + "[" * 5000 + "]" * 5000 + "\n", "nests too deeply"),
])
def test_recursive_and_runaway_yaml_are_input_errors(tmp_path, capsys, text, expected):
    code, out = run_prompts(write(tmp_path, text), capsys)
    assert code == 2 and expected in out and "Traceback" not in out


def test_tas_resolution_that_no_layer_of_the_model_has_is_an_input_error(tmp_path, capsys, tiny_sd_dir,
                                                                           tiny_guidance_dir):
    """8 divides the tiny model's 32x32 latent, but its cross-attention maps are 32x32 and 16x16 only: the
    run stops before any output instead of failing inside TAS."""
    modalities = SHARED / "samples" / "attentionhand-official" / "modalities.json"
    recipe = write_gen_recipe(tmp_path, tiny_sd_dir, tiny_guidance_dir, prompts="",
                              extra=f"inputs:\n  modalities: {modalities}\n")
    recipe.write_text(recipe.read_text().replace("attention_res: 16", "attention_res: 8"))
    code, text = main_generate(capsys, recipe, "--out", str(tmp_path / "out"))
    assert code == 2 and "no cross-attention layer with 8x8 maps at image.size 64" in text, text
    assert f"{recipe}, field tas.attention_res, line 10" in text and "set tas.attention_res to one of 16, 32" in text
    assert "Traceback" not in text and not (tmp_path / "out").exists()


def test_cross_attention_resolutions_match_the_layers_a_forward_pass_runs(tiny_sd_dir):
    import torch
    from diffusers import UNet2DConditionModel

    from handsynth.attentionhand.tas import cross_attention_resolutions

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    seen = set()
    hooks = [m.register_forward_hook(lambda mod, args, kwargs, out: seen.add(int(args[0].shape[1] ** 0.5)),
                                     with_kwargs=True)
             for name, m in unet.named_modules() if name.endswith("attn2")]
    with torch.no_grad():
        unet(torch.zeros(1, 4, 24, 24), 1, encoder_hidden_states=torch.zeros(1, 77, 32))
    for h in hooks:
        h.remove()
    assert cross_attention_resolutions(unet, 24) == sorted(seen) == [12, 24]

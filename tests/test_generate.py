"""handsynth generate on the tiny model: plan contents, determinism across batch sizes, resume, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from handsynth.cli import main
from handsynth.generate.plan import noise_seed
from handsynth.io import sha256_file
from handsynth.keys import is_valid_key, sample_key
from tests.conftest import SHARED
from tests.fixtures.generate import write_gen_recipe

MODALITIES = SHARED / "samples" / "attentionhand-official" / "modalities.json"


def gen(capsys, recipe: Path, *args: str) -> tuple[int, str]:
    code = main(["generate", "--recipe", str(recipe), "--device", "cpu", *args])
    captured = capsys.readouterr()
    return code, " ".join((captured.out + captured.err).split())


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """{relative path: (bytes, mtime_ns)} of every file under ``folder``."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def frames_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "labels.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def reference(tiny_sd_dir, tiny_guidance_dir, small_render_run, tmp_path_factory):
    """Samples 0..n_frames (one second variant) generated with batch size 1, global and local images."""
    folder = tmp_path_factory.mktemp("gen-ref")
    recipe = write_gen_recipe(folder, tiny_sd_dir, tiny_guidance_dir,
                              extra=f"inputs:\n  run: {small_render_run}\nbranches: [global, local]\n")
    count = len(frames_of(small_render_run)) + 1
    code = main(["generate", "--recipe", str(recipe), "--device", "cpu", "--count", str(count),
                 "--batch-size", "1", "--out", str(folder / "out")])
    assert code == 0
    return {"recipe": recipe, "out": folder / "out", "count": count, "files": snapshot(folder / "out")}


def test_samples_follow_the_plan(reference, small_render_run, clip_tokenizer):
    from handsynth.prompts import PromptSampler, hand_token_indices, load_recipe

    recipe = load_recipe(reference["recipe"])
    frames = frames_of(small_render_run)
    sampler = PromptSampler(recipe.prompts, recipe.seed)
    out = reference["out"]
    keys = []
    for i in range(reference["count"]):
        frame = frames[i % len(frames)]
        sides = {h["side"] for h in frame["hands"]}
        hands = "both" if len(sides) == 2 else sides.pop()
        key = sample_key(frame["key"], i // len(frames))
        sample = json.loads((out / "samples" / f"{key}.json").read_text())
        prompt = sampler(i, hands)
        assert sample["key"] == key and is_valid_key(key) and sample["index"] == i
        assert sample["frame"] == frame["key"] and sample["variant"] == i // len(frames)
        assert sample["hands"] == hands
        assert sample["prompt"] == prompt.text and sample["hand_words"] == prompt.hand_words
        assert sample["hand_token_indices"] == hand_token_indices(clip_tokenizer, prompt.text, prompt.hand_spans)
        assert sample["hand_token_indices"]  # every template marks hand words
        assert sample["seed"] == noise_seed(7, i) and sample["local_seed"] == noise_seed(7, i, 2)
        assert sample["mesh"] == {"global": frame["images"]["global"], "local": frame["images"]["local"]}
        assert sample["outputs"] == {"image": f"images/{key}.png", "local": f"local/{key}.png"}
        for rel in sample["outputs"].values():
            assert Image.open(out / rel).size == (64, 64)
        keys.append(key)
    assert len(set(keys)) == len(keys)
    assert {len({h["side"] for h in f["hands"]}) for f in frames} == {1, 2}  # one- and two-hand frames
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "generate" and manifest["status"] == "complete"
    n = reference["count"]
    assert manifest["counts"] == {"requested": n, "done": n, "skipped": 0, "samples_in_out": n,
                                  "images_requested": 2 * n, "images_done": 2 * n, "images_skipped": 0}
    assert manifest["inputs"]["kind"] == "run" and manifest["inputs"]["run"] == str(small_render_run.resolve())
    assert manifest["inputs"]["manifest_sha256"] == sha256_file(small_render_run / "manifest.json")
    assert manifest["recipe"]["sha256"] == sha256_file(reference["recipe"])
    assert manifest["recipe"]["resolved"]["seed"] == 7 and manifest["precision"] == "fp32"
    assert manifest["device"] == "cpu" and "spawn_key=(i, 1)" in manifest["seeds"]
    guidance = manifest["model"]["guidance_files_sha256"]
    assert guidance and all(len(v) == 64 for v in guidance.values())


def test_batch_size_does_not_change_samples(reference, tmp_path, capsys):
    """Batch size 3 vs 1: the same sample files (but the images' hashes); images equal up to float rounding.

    CPU convolution kernels round differently for different batch sizes (about 2e-6 on [0, 1]
    outputs, measured), so a few pixels may differ by one 8-bit level; everything the plan decides
    (frame, prompt, tokens, seeds) is identical."""
    import numpy as np

    out = tmp_path / "b3"
    code, text = gen(capsys, reference["recipe"], "--count", str(reference["count"]), "--batch-size", "3",
                     "--out", str(out))
    assert code == 0, text
    got = snapshot(out)
    assert sorted(got) == sorted(reference["files"])
    for name in reference["files"]:
        if name.startswith("samples/"):
            a, b = (json.loads(files[name][0]) for files in (got, reference["files"]))
            assert a.pop("outputs_sha256") and b.pop("outputs_sha256") and a == b, name
        elif name.startswith(("images/", "local/")):
            a = np.asarray(Image.open(out / name), dtype=np.int16)
            b = np.asarray(Image.open(reference["out"] / name), dtype=np.int16)
            assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01, name


def test_resume_completes_only_missing_samples(reference, tmp_path, capsys):
    out = tmp_path / "resume"
    one = ("--batch-size", "1")        # the reference's batch composition, so bytes are comparable
    code, _ = gen(capsys, reference["recipe"], "--count", "2", "--out", str(out), *one)
    assert code == 0
    first = snapshot(out)
    code, text = gen(capsys, reference["recipe"], "--count", str(reference["count"]), "--out", str(out), *one)
    assert code == 0 and (f"generated {2 * (reference['count'] - 2)} image(s) ({reference['count'] - 2} sample(s) x "
                          f"global + local), 4 already done") in text, text
    second = snapshot(out)
    for name, value in first.items():
        if name != "manifest.json":
            assert second[name] == value, name          # same bytes, same mtime: untouched
    for name, (data, _) in reference["files"].items():
        if name != "manifest.json":
            assert second[name][0] == data, name
    # a lost sample file: only that sample is redone, to the same bytes
    victim = sorted((out / "samples").glob("*.json"))[1]
    victim.unlink()
    code, text = gen(capsys, reference["recipe"], "--count", str(reference["count"]), "--out", str(out), *one)
    assert code == 0 and "generated 2 image(s) (1 sample(s) x global + local)" in text
    third = snapshot(out)
    redone = {f"samples/{victim.name}", f"images/{victim.stem}.png", f"local/{victim.stem}.png"}
    for name, value in second.items():
        if name == "manifest.json":
            continue
        if name in redone:
            assert third[name][0] == value[0] and third[name][1] != value[1], name
        else:
            assert third[name] == value, name
    # a lost image (its sample file kept) makes that sample pending again; stray temporaries go
    lost = sorted((out / "images").glob("*.png"))[2]
    lost.unlink()
    strays = [out / ".manifest.json.0123456789abcdef.tmp", out / "images" / f".{lost.name}.0123456789abcdef.tmp"]
    for stray in strays:
        stray.write_bytes(b"half a file")
    code, text = gen(capsys, reference["recipe"], "--count", str(reference["count"]), "--out", str(out), *one)
    assert code == 0 and "generated 2 image(s) (1 sample(s) x global + local)" in text, text
    assert lost.read_bytes() == reference["files"][f"images/{lost.name}"][0]
    assert not any(stray.exists() for stray in strays)
    fourth = snapshot(out)
    assert sorted(fourth) == sorted(reference["files"])
    for name in ("samples/", "local/"):
        name += f"{lost.stem}." + ("json" if name == "samples/" else "png")
        assert fourth[name][0] == third[name][0], name


def test_resume_redoes_whole_batches_of_the_grid_to_the_same_bytes(reference, tmp_path, capsys, monkeypatch):
    """Batch size 2: a run stopped after sample 2 of batch [2, 3] (sample 3 lost) and a damaged image of
    sample 1 are repaired by regenerating the WHOLE batches [0, 1] and [2, 3] of the fixed grid, so every
    file equals an uninterrupted run's byte for byte; complete samples are not rewritten."""
    from handsynth.generate.runner import Runner

    two = ("--batch-size", "2", "--count", "4")
    full = tmp_path / "full"
    code, text = gen(capsys, reference["recipe"], "--out", str(full), *two)
    assert code == 0, text
    expected = snapshot(full)
    out = tmp_path / "resumed"
    shutil.copytree(full, out)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))   # as a SIGKILL leaves it
    records = {json.loads(p.read_text())["index"]: p for p in (out / "samples").glob("*.json")}
    lost = json.loads(records[3].read_text())
    records[3].unlink()
    (out / lost["outputs"]["image"]).unlink()
    damaged = out / json.loads(records[1].read_text())["outputs"]["image"]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x01
    damaged.write_bytes(bytes(data))
    before = snapshot(out)
    batches = []
    real = Runner.generate
    monkeypatch.setattr(Runner, "generate", lambda self, specs, write=None, **kw: (
        batches.append(([s.index for s in specs], sorted(write))), real(self, specs, write, **kw))[1])
    code, text = gen(capsys, reference["recipe"], "--out", str(out), *two)
    assert code == 0 and "generated 4 image(s) (2 sample(s) x global + local), 4 already done" in text, text
    assert batches == [([0, 1], [1]), ([2, 3], [3])]
    assert "left 'running' by a process that stopped without finishing" in text
    after = snapshot(out)
    assert sorted(after) == sorted(expected)
    for name, (data, _) in expected.items():
        if name != "manifest.json":
            assert after[name][0] == data, name
    untouched = [n for n in before if n.startswith("samples/") and n not in (str(records[1].relative_to(out)),)]
    assert all(after[n] == before[n] for n in untouched)
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


def test_refuses_to_resume_a_different_plan(reference, tmp_path, capsys):
    out = tmp_path / "other"
    shutil.copytree(reference["out"], out)
    before = snapshot(out)
    changed = reference["recipe"].with_name("changed.yaml")
    changed.write_text(reference["recipe"].read_text().replace("seed: 7", "seed: 8"))
    code, text = gen(capsys, changed, "--out", str(out))
    assert code == 2 and "different recipe" in text and "use a new --out" in text and "Traceback" not in text
    assert snapshot(out) == before


@pytest.fixture
def earlier(reference, tmp_path):
    """A finished generate run that failing commands must leave as it is."""
    out = tmp_path / "earlier"
    shutil.copytree(reference["out"], out)
    return out, snapshot(out)


def bad_cases(tmp_path: Path, base: Path, guidance: Path, run: Path) -> dict[str, tuple[list[str], int, list[str]]]:
    not_render = tmp_path / "not-render"
    not_render.mkdir()
    (not_render / "manifest.json").write_text('{"stage": "export"}')
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    recipe = write_gen_recipe(tmp_path / "ok", base, guidance)
    broken = write_gen_recipe(tmp_path / "broken", base, guidance, extra="sampler:\n  steps: 0\n")
    no_guidance = write_gen_recipe(tmp_path / "noguid", base, tmp_path / "no-such-guidance")
    bad_line = tmp_path / "bad-line"
    shutil.copytree(run, bad_line)
    lines = (bad_line / "labels.jsonl").read_text().splitlines()
    lines[1] = json.dumps({**json.loads(lines[1]), "images": "global.png"})
    (bad_line / "labels.jsonl").write_text("\n".join(lines) + "\n")
    not_object = tmp_path / "not-object"
    shutil.copytree(run, not_object)
    (not_object / "labels.jsonl").write_text("[1, 2]\n")
    return {
        "missing_run": ([str(recipe), "--run", str(tmp_path / "nope")], 2, ["does not exist", "--run"]),
        "not_a_render_run": ([str(recipe), "--run", str(not_render)], 2, ["'export' stage", "handsynth render"]),
        "not_a_run": ([str(recipe), "--run", str(tmp_path / "ok")], 2, ["no manifest.json"]),
        "labels_line_images": ([str(recipe), "--run", str(bad_line)], 2,
                               ["line 2 is not a render label", "'images'", "labels.jsonl"]),
        "labels_line_not_object": ([str(recipe), "--run", str(not_object)], 2,
                                   ["line 1 is not a render label", "not a JSON object"]),
        "recipe_error": ([str(broken), "--run", str(run)], 2, [str(broken), "line"]),
        "missing_guidance": ([str(no_guidance), "--run", str(run)], 3, ["no-such-guidance", "does not exist"]),
        "unwritable_out": ([str(recipe), "--run", str(run), "--out", str(blocker / "sub")], 4,
                           ["cannot write", "--out"]),
    }


@pytest.mark.parametrize("case", ["missing_run", "not_a_render_run", "not_a_run", "labels_line_images",
                                  "labels_line_not_object", "recipe_error",
                                  "missing_guidance", "unwritable_out"])
def test_bad_input(case, earlier, tmp_path, capsys, tiny_sd_dir, tiny_guidance_dir, small_render_run):
    out, before = earlier
    args, exit_code, fragments = bad_cases(tmp_path, tiny_sd_dir, tiny_guidance_dir, small_render_run)[case]
    if "--out" not in args:  # fail into the finished run (a new folder where the model differs from its own)
        args += ["--out", str(tmp_path / "new-out" if case == "missing_guidance" else out)]
    code, text = gen(capsys, Path(args[0]), *args[1:])
    assert code == exit_code, text
    for fragment in fragments:
        assert fragment in text, (fragment, text)
    assert "Traceback" not in text
    assert snapshot(out) == before
    assert not (tmp_path / "new-out").exists()          # a failed start leaves no (empty) run folder


def test_modalities_inputs(tmp_path, capsys, tiny_sd_dir, tiny_guidance_dir, clip_tokenizer):
    from handsynth.prompts import free_text_prompt, hand_token_indices, read_modalities

    recipe = write_gen_recipe(tmp_path, tiny_sd_dir, tiny_guidance_dir, prompts="",
                              extra=f"inputs:\n  modalities: {MODALITIES}\n")
    out = tmp_path / "out"
    code, text = gen(capsys, recipe, "--out", str(out))
    assert code == 0, text
    entries = read_modalities(MODALITIES)
    assert "using default --count = 3 (one sample per input frame)" in text
    for i, entry in enumerate(entries):
        sample = json.loads((out / "samples" / f"{entry.key}_v00000.json").read_text())
        prompt = free_text_prompt(entry.text)
        assert sample["prompt"] == entry.text == (SHARED / "samples" / "attentionhand-official" / "text"
                                                  / f"{entry.key}.txt").read_text().splitlines()[0].strip()
        assert sample["hand_words"] == prompt.hand_words
        assert sample["hand_token_indices"] == hand_token_indices(clip_tokenizer, prompt.text, prompt.hand_spans)
        assert sample["index"] == i and sample["hands"] is None and sample["local_seed"] is None
        assert sample["mesh"] == {"global": str(entry.mesh)}
        assert (out / sample["outputs"]["image"]).is_file() and "local" not in sample["outputs"]
    assert not (out / "local").exists()
    assert json.loads((out / "manifest.json").read_text())["inputs"]["kind"] == "modalities"


def test_a_sample_is_one_image_unless_the_recipe_asks_for_the_local_branch(reference, tmp_path, capsys,
                                                                          small_render_run):
    """Default branches [global]: one image per sample (no local/ images, no local seed), counted as images
    in the summary and the manifest; the plan (prompt, tokens, seed, frame) is the reference's."""
    default = reference["recipe"].with_name("global-only.yaml")
    default.write_text(reference["recipe"].read_text().replace("branches: [global, local]\n", ""))
    out = tmp_path / "global"
    code, text = gen(capsys, default, "--count", "3", "--out", str(out))
    assert code == 0, text
    assert "generated 3 image(s), 0 already done" in text and "global + local" not in text
    assert sorted(p.parent.name for p in out.rglob("*.png")) == ["images"] * 3 and not (out / "local").exists()
    for path in (out / "samples").glob("*.json"):
        sample = json.loads(path.read_text())
        both = json.loads((reference["out"] / "samples" / path.name).read_text())
        assert sample["outputs"] == {"image": both["outputs"]["image"]} and sample["local_seed"] is None
        assert sample["mesh"] == {"global": both["mesh"]["global"]} and "local_image" not in sample
        for field in ("index", "frame", "prompt", "hand_token_indices", "seed", "image"):
            assert sample[field] == both[field], field
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts == {"requested": 3, "done": 3, "skipped": 0, "samples_in_out": 3, "images_requested": 3,
                      "images_done": 3, "images_skipped": 0}
    code, text = gen(capsys, default, "--count", "3", "--out", str(out))
    assert code == 0 and "generated 0 image(s), 3 already done" in text, text


def test_the_local_branch_needs_local_mesh_images(tmp_path, capsys, tiny_sd_dir, tiny_guidance_dir):
    recipe = write_gen_recipe(tmp_path, tiny_sd_dir, tiny_guidance_dir, prompts="",
                              extra=f"inputs:\n  modalities: {MODALITIES}\nbranches: [global, local]\n")
    code, text = gen(capsys, recipe, "--out", str(tmp_path / "out"))
    assert code == 2 and "field 'branches'" in text and "no local mesh images" in text, text
    assert "branches: [global]" in text and "Traceback" not in text and not (tmp_path / "out").exists()


def test_plan_counts_images_per_frame():
    """Plan.images equals a sample-by-sample count for any range (frames with and without a local image)."""
    from handsynth.generate.plan import FrameInput, Plan
    from handsynth.prompts.recipe import Recipe

    frames = [FrameInput(key=f"f{i}", mesh=Path("m.png"), mesh_ref="m.png",
                         local=Path("l.png") if i in (1, 3) else None) for i in range(5)]
    plan = Plan(Recipe(), frames, None)
    for start in (0, 1, 4, 7, 23):
        for count in (1, 2, 5, 6, 11, 37):
            assert plan.images(start, count) == sum(1 + (frames[i % 5].local is not None)
                                                    for i in range(start, start + count)), (start, count)


def test_defaults_pick_the_newest_render_run(tmp_path, capsys, monkeypatch, tiny_sd_dir, tiny_guidance_dir,
                                             small_render_run):
    monkeypatch.chdir(tmp_path)
    for name, created in (("new", "2030-01-01T00:00:00+00:00"), ("old", "2020-01-01T00:00:00+00:00")):
        shutil.copytree(small_render_run, tmp_path / "runs" / name)
        manifest = tmp_path / "runs" / name / "manifest.json"
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "created": created}))
    recipe = write_gen_recipe(tmp_path / "cfg", tiny_sd_dir, tiny_guidance_dir, name="outdoor.yaml")
    code, text = gen(capsys, recipe, "--count", "1")
    assert code == 0, text
    assert "using default --run = newest render run under runs/: runs/new" in text
    assert "using default --out = runs/outdoor-gen" in text and "using default --batch-size = 2" in text
    assert "using recipe defaults: " in text and "sampler.scheduler='ddim', sampler.guidance_scale=" in text
    manifest = json.loads((tmp_path / "runs" / "outdoor-gen" / "manifest.json").read_text())
    assert manifest["inputs"]["run"] == str((tmp_path / "runs" / "new").resolve())
    assert len(list((tmp_path / "runs" / "outdoor-gen" / "images").glob("*.png"))) == 1


def test_prompts_previews_exactly_the_prompts_generate_used(reference, small_render_run, capsys, monkeypatch,
                                                            tmp_path, clip_tokenizer_dir):
    from handsynth.prompts.templates import HAND_CONFIGS

    monkeypatch.chdir(tmp_path)                    # no ./runs here: the recipe's inputs, then --run, decide
    generated = {}
    for path in (reference["out"] / "samples").glob("*.json"):
        record = json.loads(path.read_text())
        generated[record["index"]] = record
    assert sorted(generated) == list(range(reference["count"]))
    for extra in ([], ["--run", str(small_render_run)]):
        assert main(["prompts", "--recipe", str(reference["recipe"]), "--count", str(reference["count"]), "--json",
                     "--tokenizer", str(clip_tokenizer_dir), *extra]) == 0
        previews = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [p["index"] for p in previews] == sorted(generated)
        for p in previews:
            g = generated[p["index"]]
            assert (p["text"], p["hands"], p["hand_words"], p["token_indices"]) == (
                g["prompt"], g["hands"], g["hand_words"], g["hand_token_indices"])
    # the frames' real configurations are not the right/left/both cycle an index-only preview would show
    assert [generated[i]["hands"] for i in sorted(generated)] != [HAND_CONFIGS[i % 3] for i in sorted(generated)]


def test_a_huge_count_starts_at_once(tmp_path, capsys, monkeypatch, tiny_sd_dir, tiny_guidance_dir,
                                     small_render_run):
    """`--count 10**12` looks at the samples batch by batch: the first batch is generated after a few
    completeness checks (its own and, read ahead while it runs, the next batch's), not after 10**12 of
    them (stopped here by an interrupt after that batch)."""
    from handsynth.generate import runner

    checks = []
    is_complete = runner.is_complete

    def counting(*args, **kwargs):
        checks.append(1)
        if len(checks) > 1000:
            raise AssertionError("checked 1000 samples before generating any")
        return is_complete(*args, **kwargs)

    generate = runner.Runner.generate

    def first_batch_then_interrupt(self, specs, *args, **kwargs):
        generate(self, specs, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "is_complete", counting)
    monkeypatch.setattr(runner.Runner, "generate", first_batch_then_interrupt)
    recipe = write_gen_recipe(tmp_path, tiny_sd_dir, tiny_guidance_dir, extra=f"inputs:\n  run: {small_render_run}\n")
    code, text = gen(capsys, recipe, "--count", str(10**12), "--out", str(tmp_path / "out"))
    assert code == 130 and "rerun the same command to resume" in " ".join(text.split()), text
    assert len(checks) <= 4 and len(list((tmp_path / "out" / "samples").glob("*.json"))) == 2   # batch_size 2


@pytest.mark.parametrize("fit", ["native", "crop"])
def test_fit_decides_each_generated_frame(fit, tmp_path, capsys, tiny_sd_dir, tiny_guidance_dir, small_render_run,
                                          landscape_render_run):
    """On the real excerpt (334x512 and 512x334) and the synthetic landscape set (640x360): every image
    has the size its recorded block says (crop: image.size square; native: long side image.size, the
    frame's aspect), and the block is the frame module's for that label (TAS runs on non-square latents)."""
    from handsynth.generate.frame import sample_frames

    for name, render in (("real", small_render_run), ("land", landscape_render_run)):
        recipe = write_gen_recipe(tmp_path / name, tiny_sd_dir, tiny_guidance_dir,
                                  extra=f"inputs:\n  run: {render}\nbranches: [global, local]\n", name="fit.yaml")
        recipe.write_text(recipe.read_text().replace("  size: 64\n", f"  size: 64\n  fit: {fit}\n"))
        out = tmp_path / name / "out"
        code, text = gen(capsys, recipe, "--out", str(out))
        assert code == 0, text
        for label in frames_of(render):
            sample = json.loads((out / "samples" / f"{sample_key(label['key'], 0)}.json").read_text())
            frames = sample_frames(label, fit, 64, label["image_size"], local=True)
            assert sample["image"] == frames.image_block and sample["local_image"] == frames.local_block
            W, H = label["image_size"]
            size = Image.open(out / sample["outputs"]["image"]).size
            assert list(size) == sample["image"]["size"]
            if fit == "crop":
                assert size == (64, 64)
            else:
                assert max(size) == 64 and (size[0] > size[1]) == (W > H) and abs(size[0] / size[1] - W / H) < 0.25
            assert Image.open(out / sample["outputs"]["local"]).size == (64, 64)

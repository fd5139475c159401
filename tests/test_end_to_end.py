"""The design card's three commands, as typed, one after the other in a fresh folder outside the repository
holding only what a user has: the label files and the model folders.

    handsynth render --labels interhand.json               (MANO: $HANDSYNTH_MANO_DIR, the test MANO files)
    handsynth generate --recipe outdoor.yaml --count N
    handsynth export --format webdataset

``test_render_generate_export_chain`` (fast): outdoor.yaml is the user's copy of the shipped recipe, edited
for the tiny test model (64 px, 2 steps) and asking for the local branch too; a second, default recipe
(one image per sample) is exported in both layouts. ``test_design_card_commands_typed_exactly_in_a_fresh_folder``
(about a minute on 2 cores): no recipe file at all - the shipped outdoor.yaml as it is (512 px, 20 steps, TAS,
one image per sample) on an SD1.5-shaped tiny model in a Hugging Face cache, each command run as a separate process through the installed script.

The source frames are non-square (the real InterHand excerpt: 334x512 and 512x334). Defaults connect
the stages (newest run under ./runs; image.fit crop). The exported labels must equal what render wrote
from the source, the exported images the generated files byte for byte, each image's own labels must
project from its K, and a hamer-layout export's hand boxes must fall on the silhouette of the mesh
image the model was conditioned on, in the generated image's and the local image's frames.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from handsynth.cli import main
from handsynth.prompts.library import SHIPPED_DIR
from tests.fixtures.generate import write_gen_recipe

REPO = Path(__file__).resolve().parents[1]


def design_card_labels(folder: Path, mano_dir: Path) -> None:
    """The InterHand2.6M excerpt named as the design card names it: interhand.json + interhand_<kind>.json."""
    from tests.fixtures.labels import build_interhand_set, mano_rest_arrays

    data = build_interhand_set(folder, prefix="interhand", mano_arrays=mano_rest_arrays(mano_dir), images=False)
    data.rename(folder / "interhand.json")


def fresh_folder(tmp_path: Path, mano_dir: Path) -> Path:
    work = tmp_path / "fresh"
    work.mkdir()
    assert REPO not in work.resolve().parents
    design_card_labels(work, mano_dir)
    return work


def test_render_generate_export_chain(tmp_path, monkeypatch, mano_dir, tiny_sd_dir, tiny_guidance_dir):
    work = fresh_folder(tmp_path, mano_dir)
    monkeypatch.chdir(work)
    monkeypatch.setenv("HANDSYNTH_MANO_DIR", str(mano_dir))
    assert main(["recipes", "copy", "outdoor"]) == 0      # the user's copy, edited for the tiny model:
    write_gen_recipe(work, tiny_sd_dir, tiny_guidance_dir, name="outdoor.yaml", extra="branches: [global, local]\n")
    assert main("render --labels interhand.json".split()) == 0
    assert main("generate --recipe outdoor.yaml --count 5".split()) == 0
    assert main("export --format webdataset".split()) == 0

    render_run = Path("runs") / "interhand"
    gen_run = Path("runs") / "outdoor-gen"
    shards = sorted(Path("shards").rglob("*.tar"))
    samples = list(wds.WebDataset([str(p) for p in shards], shardshuffle=False))
    assert len(samples) == 5
    meshes, blocks_by_key = {}, {}
    frames = [json.loads(line)["key"] for line in (render_run / "labels.jsonl").read_text().splitlines()]
    for index, sample in enumerate(samples):
        record = json.loads(sample["json"])
        generation, blocks = record.pop("generation"), {k: record.pop(k) for k in ("image", "local_image")}
        frame = frames[index % len(frames)]
        assert sample["__key__"] == f"{frame}_v{index // len(frames):05d}" and "." not in sample["__key__"]
        assert generation["index"] == index and generation["prompt"]
        assert record == json.loads((render_run / "labels" / f"{frame}.json").read_text())
        assert record["image_size"] in ([334, 512], [512, 334])
        assert sample["png"] == (gen_run / "images" / f"{sample['__key__']}.png").read_bytes()
        for member, block in (("png", blocks["image"]), ("local.png", blocks["local_image"])):
            assert Image.open(io.BytesIO(sample[member])).size == (64, 64) and block["size"] == [64, 64]
            K = np.asarray(block["K"])
            for hand, src in zip(block["hands"], record["hands"]):
                X = np.asarray(src["joints_cam"])
                np.testing.assert_allclose((X @ K.T)[:, :2] / X[:, 2:], hand["joints_2d"], atol=0.05)
        meshes[sample["__key__"]] = sample["mesh.png"]
        blocks_by_key[sample["__key__"]] = blocks["image"]
        meshes[sample["__key__"] + "-local"] = sample["local_mesh.png"]

    # the README's loader line, in a DataLoader with more workers than this export has shards
    import torch

    urls = [str(p) for p in shards]
    assert len(urls) == 1
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("rgb8")   # as in the README
    loaded = list(torch.utils.data.DataLoader(dataset, num_workers=2, batch_size=None))
    assert sorted(s["__key__"] for s in loaded) == sorted(s["__key__"] for s in samples)
    assert all(s["png"].shape == (64, 64, 3) for s in loaded)
    readme = (REPO / "README.md").read_text()
    assert 'webdataset.WebDataset(urls, shardshuffle=False, empty_check=False).decode("rgb8")' in readme

    # the hamer layout: each image (generated and local) is a sample of its own; the hand boxes of its
    # labels bound the silhouette of the mesh image that conditioned it, and data.pyd centres on them
    from handsynth.export.hamer import load_pyd

    assert main(["export", "--format", "webdataset", "--layout", "hamer", "--out", "hamer"]) == 0
    samples = list(wds.WebDataset([str(p) for p in sorted(Path("hamer").glob("*.tar"))], shardshuffle=False))
    assert len(samples) == 10 and sorted(s["__key__"] for s in samples) == sorted(meshes)
    for sample in samples:
        block = json.loads(sample["json"])["local_image" if sample["__key__"].endswith("-local") else "image"]
        silhouette = np.asarray(Image.open(io.BytesIO(meshes[sample["__key__"]])).convert("L")) > 25
        ys, xs = np.nonzero(silhouette)
        boxes = np.array([h["box"] for h in block["hands"]])
        union = np.clip([*boxes[:, :2].min(0), *boxes[:, 2:].max(0)], 0, 63)
        np.testing.assert_allclose(union, [xs.min(), ys.min(), xs.max(), ys.max()], atol=1.5)
        centres = [h["center"] for h in load_pyd(sample["data.pyd"])]
        assert centres and all(np.min(np.abs((boxes[:, :2] + boxes[:, 2:]) / 2 - c).sum(1)) < 1e-3 for c in centres)

    # the default recipe (branches [global]): one image per sample, and both layouts export it without local
    # members or -local samples, with the same labels for the same sample indices
    write_gen_recipe(work, tiny_sd_dir, tiny_guidance_dir, name="global.yaml")
    assert main("generate --recipe global.yaml --count 5".split()) == 0
    assert not (Path("runs") / "global-gen" / "local").exists()
    for layout in ("handsynth", "hamer"):
        out = f"global-{layout}"
        assert main(["export", "--run", "runs/global-gen", "--layout", layout, "--out", out]) == 0
        found = list(wds.WebDataset([str(p) for p in sorted(Path(out).glob("*.tar"))], shardshuffle=False))
        assert [s["__key__"] for s in found] == [f"{frames[i % len(frames)]}_v{i // len(frames):05d}" for i in range(5)]
        for sample in found:
            record = json.loads(sample["json"])
            assert "local_image" not in record and not any(k.startswith("local") for k in sample)
            assert record["image"] == blocks_by_key[sample["__key__"]]


# --- the design card, typed exactly, in an empty folder outside the repository ---------------------------

DESIGN_CARD = [
    "handsynth render --labels interhand.json",
    "handsynth generate --recipe outdoor.yaml --count 2",
    "handsynth export --format webdataset",
]
SD15_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"


@pytest.fixture(scope="module")
def user_models(clip_tokenizer_dir, tmp_path_factory) -> tuple[Path, Path]:
    """What a user has after set-up, with tiny SD1.5-shaped random weights: the base model in a Hugging Face
    cache (as `huggingface-cli download` leaves it) and the converted guidance module (`<out>/controlnet/`,
    as `handsynth convert` writes it). Returns (HF_HOME, guidance folder)."""
    from diffusers import ControlNetModel, StableDiffusionPipeline

    from tests.fixtures.attentionhand_pipeline import pretend_trained
    from tests.fixtures.diffusion import get_dummy_components

    home = tmp_path_factory.mktemp("hf-home")
    repo = home / "hub" / ("models--" + SD15_ID.replace("/", "--"))
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    components = get_dummy_components(clip_tokenizer_dir, sd15_shape=True)
    StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(repo / "snapshots" / commit)
    # the smallest hint encoder that takes 512 px to the 64 px latent (SD1.5's is 16-32-96-256 wide)
    guidance = pretend_trained(ControlNetModel.from_unet(components["unet"], conditioning_channels=3,
                                                         conditioning_embedding_out_channels=(4, 4, 4, 4)))
    folder = tmp_path_factory.mktemp("user-models") / "attentionhand"
    guidance.save_pretrained(folder / "controlnet")
    return home, folder


def test_design_card_commands_typed_exactly_in_a_fresh_folder(tmp_path, mano_dir, user_models):
    home, guidance = user_models
    work = fresh_folder(tmp_path, mano_dir)
    shutil.copytree(guidance, work / "models" / "attentionhand")
    before = sorted(p.name for p in work.iterdir())
    assert before == ["interhand.json", "interhand_MANO_NeuralAnnot.json", "interhand_camera.json",
                      "interhand_joint_3d.json", "models"]
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HANDSYNTH_MANO_DIR": str(mano_dir),
           "PYTHONWARNINGS": "default"}            # a library warning would show, were one let through
    env.pop("HF_HUB_CACHE", None)
    bin_dir = Path(sys.executable).parent
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    outputs = []
    for line in DESIGN_CARD:
        done = subprocess.run(line, shell=True, cwd=work, env=env, capture_output=True, text=True, timeout=1200)
        assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
        assert "Traceback" not in done.stderr and "Warning" not in done.stderr, done.stderr
        outputs.append(done.stdout + done.stderr)
    assert "using the shipped recipe" in outputs[1] and "outdoor.yaml" in outputs[1]

    render_run = work / "runs" / "interhand"
    gen_run = work / "runs" / "outdoor-gen"
    shards = sorted((work / "shards" / "outdoor-gen").glob("*.tar"))
    samples = list(wds.WebDataset([str(p) for p in shards], shardshuffle=False, empty_check=False))
    frames = [json.loads(line)["key"] for line in (render_run / "labels.jsonl").read_text().splitlines()]
    assert [s["__key__"] for s in samples] == [f"{frames[0]}_v00000", f"{frames[1]}_v00000"]
    for sample in samples:
        record = json.loads(sample["json"])
        generation = record.pop("generation")
        assert "local_image" not in record and record.pop("image")["size"] == [512, 512]   # branches [global]
        assert not any(member.startswith("local") for member in sample)
        assert record == json.loads((render_run / "labels" / f"{record['key']}.json").read_text())
        assert record["original"]["image"]["file_name"]              # the InterHand annotation, unchanged
        assert sample["jpg"] == (gen_run / "images" / f"{sample['__key__']}.jpg").read_bytes()
        assert Image.open(gen_run / "images" / f"{sample['__key__']}.jpg").size == (512, 512)
        assert generation["recipe_sha256"] == hashlib.sha256(
            (SHIPPED_DIR / "outdoor.yaml").read_bytes()).hexdigest()

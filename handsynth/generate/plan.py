"""The work plan: which frame, prompt and noise seed sample ``i`` gets - a pure function of (recipe, i).

Inputs are a list of :class:`FrameInput`, in a fixed order: the frames of a ``handsynth render`` run in
``labels.jsonl`` order (only frames whose ``labels/<key>.json`` exists), or the entries of a modalities
file in file order. Sample ``i`` uses frame ``i % n_frames`` as variant ``i // n_frames`` and gets the
key ``keys.sample_key(frame, variant)``.

Randomness comes from two independent streams per sample, both derived from ``recipe.seed`` and ``i``
only (never from batch position, time or global state):

- the prompt: :class:`~handsynth.prompts.templates.PromptSampler` (``SeedSequence(seed, spawn_key=(i,))``);
- the initial noise: ``SeedSequence(entropy=seed, spawn_key=(i, 1))`` for the global image and
  ``(i, 2)`` for the local image, 63-bit seeds for ``torch.Generator.manual_seed``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from handsynth import io, rundir
from handsynth.errors import InputError
from handsynth.keys import is_valid_key, sample_key
from handsynth.prompts.spans import free_text_prompt, hand_token_indices
from handsynth.prompts.templates import Prompt, PromptSampler
from handsynth.render import layout as render_layout

GLOBAL_STREAM, LOCAL_STREAM = 1, 2
SEED_RULE = ("noise seed of sample i: numpy SeedSequence(entropy=recipe.seed, spawn_key=(i, 1)) "
             "-> generate_state(1, uint64)[0] & (2**63 - 1) -> torch.Generator(device).manual_seed; local image: "
             "spawn_key=(i, 2); prompt: SeedSequence(entropy=recipe.seed, spawn_key=(i,)); frame i % n_frames, "
             "variant i // n_frames")


@dataclass(frozen=True)
class FrameInput:
    """One input frame: its key, hand configuration ("right" | "left" | "both"; None when unknown), the
    global mesh image, the optional local mesh image, (modalities) its own prompt text, and (render runs)
    its render label file, which decides the generated frame. ``mesh_ref`` / ``local_ref`` are the image
    paths as recorded in sample files (relative to the render run)."""

    key: str
    mesh: Path
    mesh_ref: str
    hands: str | None = None
    local: Path | None = None
    local_ref: str | None = None
    text: str | None = None
    label: Path | None = None


@dataclass(frozen=True)
class Inputs:
    """The frames of a run, where they came from (``kind`` "run" | "modalities", ``path``), and a
    fingerprint of their content (``sha256``) plus extra facts for the manifest."""

    kind: str
    path: Path
    frames: list[FrameInput]
    sha256: str
    record: dict[str, Any]


@dataclass(frozen=True)
class SampleSpec:
    """Everything that decides sample ``index``: its frame, variant, key, prompt, CLIP hand-token
    positions and noise seeds (``local_seed`` is used only when the frame has a local mesh image)."""

    index: int
    frame: FrameInput
    variant: int
    key: str
    prompt: Prompt
    token_indices: list[int]
    seed: int
    local_seed: int


def noise_seed(recipe_seed: int, index: int, stream: int = GLOBAL_STREAM) -> int:
    """The 63-bit noise seed of sample ``index`` (``stream`` 1: global image, 2: local image)."""
    state = np.random.SeedSequence(entropy=recipe_seed, spawn_key=(index, stream)).generate_state(1, dtype=np.uint64)
    return int(state[0]) & (2**63 - 1)


def hand_config(sides: list[str]) -> str | None:
    """"right" | "left" | "both" from the sides of a frame's hands (None without hands)."""
    found = set(sides)
    if {"right", "left"} <= found:
        return "both"
    return next(iter(found)) if found else None


class Plan:
    """Maps a sample index to its :class:`SampleSpec`. ``tokenizer`` is the pipeline's (fast) CLIP tokenizer
    (None when only :meth:`key` and :meth:`prompt` are used, as ``handsynth prompts --no-tokens`` does)."""

    def __init__(self, recipe, frames: list[FrameInput], tokenizer):
        if not frames:
            raise ValueError("a plan needs at least one frame")
        self.recipe, self.frames, self.tokenizer = recipe, frames, tokenizer
        self._local_counts = np.cumsum([0] + [frame.local is not None for frame in frames])   # frames [0, i)
        self.sampler = PromptSampler(recipe.prompts, recipe.seed) if recipe.prompts is not None else None

    def key(self, index: int) -> str:
        """The sample key of ``index`` (cheap: no prompt sampling)."""
        return sample_key(self.frames[index % len(self.frames)].key, index // len(self.frames))

    def images(self, start: int, count: int) -> int:
        """How many images samples ``[start, start + count)`` have: one each, two for a frame with a local
        image (constant time, whatever ``count``)."""
        return count + self._locals_before(start + count) - self._locals_before(start)

    def _locals_before(self, index: int) -> int:
        """How many of the samples ``[0, index)`` have a local image."""
        cycles, rest = divmod(index, len(self.frames))
        return cycles * int(self._local_counts[-1]) + int(self._local_counts[rest])

    def prompt(self, index: int) -> Prompt:
        """The prompt of sample ``index`` (its frame's own text, or the recipe's for the frame's hands)."""
        frame = self.frames[index % len(self.frames)]
        return free_text_prompt(frame.text) if frame.text is not None else self.sampler(index, frame.hands)

    def __call__(self, index: int) -> SampleSpec:
        frame = self.frames[index % len(self.frames)]
        variant = index // len(self.frames)
        prompt = self.prompt(index)
        tokens = hand_token_indices(self.tokenizer, prompt.text, prompt.hand_spans)
        return SampleSpec(index=index, frame=frame, variant=variant, key=sample_key(frame.key, variant),
                          prompt=prompt, token_indices=tokens, seed=noise_seed(self.recipe.seed, index),
                          local_seed=noise_seed(self.recipe.seed, index, LOCAL_STREAM))


# --- finding and reading inputs --------------------------------------------------------------


def read_render_run(run: Path, condition: str = "mesh", *, local: bool = True) -> Inputs:
    """The frames of a render run with their ``condition`` images ("mesh" or "depth", see
    ``render.layout.STYLE_IMAGES``), each with its local image only when ``local``; InputError when it is
    missing, not a render run, has no frames, or was rendered without that style."""
    run = Path(run)
    global_name, local_name = render_layout.STYLE_IMAGES[condition]
    manifest = render_layout.read_manifest(run)
    jsonl = render_layout.jsonl_path(run)
    if not jsonl.is_file():
        raise InputError("the render run has no labels.jsonl (it was interrupted before its end)", where=run,
                         fix="rerun the same `handsynth render` command to finish it")
    frames = []
    for number, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            key, images, sides = _label_line(line)
        except ValueError as exc:
            raise InputError(f"line {number} is not a render label: {exc}", where=jsonl,
                             fix="rerun `handsynth render` into a new --out") from None
        mesh, local_ref = images.get(global_name), images.get(local_name)
        if mesh is None:
            raise InputError(f"the render run has no {condition} images (frame {key} has "
                             f"{', '.join(sorted(images))}), but the recipe's model.condition is {condition}",
                             where=jsonl, fix=f"render with `--style mesh,depth` (or `--style {condition}`) into a "
                                              "new --out, or set model.condition to the style the run has")
        label = render_layout.label_path(run, key)
        if not label.is_file():
            continue
        local_path = run / local_ref if local and local_ref and (run / local_ref).is_file() else None
        frames.append(FrameInput(key=key, mesh=run / mesh, mesh_ref=mesh, hands=hand_config(sides),
                                 local=local_path, local_ref=local_ref if local_path else None, label=label))
    if not frames:
        raise InputError("the render run has no rendered frames", where=run,
                         fix="render labels with at least one visible hand (`handsynth render --labels ...`)")
    if manifest.get("status") != rundir.COMPLETE:
        from handsynth.console import console

        console.print(f"[yellow]warning:[/yellow] the render run {run} is not complete: it "
                      f"{rundir.describe_status(run, manifest)}); using its {len(frames)} finished frames")
    return Inputs(kind="run", path=run.resolve(), frames=frames, sha256=io.sha256_file(jsonl),
                  record={"run": str(run.resolve()), "condition": condition,
                          "manifest_sha256": io.sha256_file(run / rundir.MANIFEST),
                          "labels_jsonl_sha256": io.sha256_file(jsonl), "frames": len(frames)})


def _label_line(line: str) -> tuple[str, dict[str, str], list[str]]:
    """(key, images by name, hand sides) of one ``labels.jsonl`` line; ValueError saying what is wrong when
    the line is no render label."""
    label = json.loads(line)
    if not isinstance(label, dict):
        raise ValueError("not a JSON object")
    key, images, hands = label.get("key"), label.get("images"), label.get("hands")
    if not isinstance(key, str) or not is_valid_key(key):
        raise ValueError(f"field 'key' is not a sample key: {key!r}")
    if not isinstance(images, dict) or not images or not all(isinstance(v, str) for v in images.values()):
        raise ValueError("field 'images' is not a mapping of image names to paths")
    if not isinstance(hands, list) or not all(isinstance(h, dict) and h.get("side") in ("right", "left")
                                              for h in hands):
        raise ValueError("field 'hands' is not a list of hands with side 'right' or 'left'")
    return key, images, [h["side"] for h in hands]


def read_modalities_inputs(path: Path, root: Path | None) -> Inputs:
    """The entries of an AttentionHand modalities file as frames (prompt from the text, no local branch)."""
    from handsynth.prompts.modalities import read_modalities

    entries = read_modalities(path, root)
    frames = [FrameInput(key=e.key, mesh=e.mesh, mesh_ref=str(e.mesh), text=e.text) for e in entries]
    return Inputs(kind="modalities", path=Path(path).resolve(), frames=frames, sha256=io.sha256_file(path),
                  record={"modalities": str(Path(path).resolve()), "root": str(root) if root else None,
                          "sha256": io.sha256_file(path), "frames": len(frames)})


def find_inputs(recipe, run: Path | None, *, local: bool | None = None) -> tuple[Inputs, str | None]:
    """The inputs: ``run`` (from --run) if given, else the recipe's, else the newest render run under
    ./runs/. Returns them and a note saying which default was used (None when none was). Frames keep their
    local image only when ``local`` (default: when the recipe's ``branches`` include ``local``); InputError
    when the recipe's branches ask for it and no frame has one."""
    if local is None:
        local = "local" in recipe.branches
    inputs, note = _find_inputs(recipe, run, local)
    if "local" in recipe.branches and not any(frame.local is not None for frame in inputs.frames):
        raise InputError(f"the recipe's branches ask for a local (hand crop) image per sample, but the inputs "
                         f"({inputs.path}) have no local {recipe.model.condition} images",
                         where=f"{recipe.path}, field 'branches'",
                         fix="set `branches: [global]`, or use a `handsynth render` run (it writes local images "
                             "of every frame with hands)")
    return inputs, note


def _find_inputs(recipe, run: Path | None, local: bool) -> tuple[Inputs, str | None]:
    condition = recipe.model.condition
    if run is not None:
        return read_render_run(run, condition, local=local), None
    if recipe.inputs is not None and recipe.inputs.run is not None:
        return read_render_run(recipe.inputs.run, condition, local=local), None
    if recipe.inputs is not None and recipe.inputs.modalities is not None:
        return read_modalities_inputs(recipe.inputs.modalities, recipe.inputs.root), None
    newest = rundir.newest_run(render_layout.STAGE)
    if newest is None:
        raise InputError("no inputs: the recipe has no 'inputs' section, no --run was given and ./runs/ holds "
                         "no render run", where=recipe.path,
                         fix="run `handsynth render --labels ...` first, pass --run <render run>, or set inputs.run "
                             "in the recipe")
    return read_render_run(newest, condition, local=local), f"newest render run under runs/: {newest}"

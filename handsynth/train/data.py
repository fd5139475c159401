"""Training samples: (real RGB, mesh image, hand box, caption) -> global and local tensors at the training size.

Sources (the same inputs generation reads, see :mod:`handsynth.generate.plan`):

- a ``handsynth render`` run made on labelled real images: each frame's source image is the path its render
  label records (``image_path``; frames without a readable source image are left out and counted). The
  global RGB and mesh image are cut and resampled onto the generated frame exactly as generation cuts the
  mesh image (``image.fit`` / ``image.size``, :func:`handsynth.generate.frame.sample_frames`); the local
  mesh image is render's local view resampled as generation does, and the local RGB is the same square
  crop box of the source image (render's ``crop_box``, black outside the image) at the training size.
  Captions come from the recipe's prompts by the frame's hands, as in generation.
- an AttentionHand-style modalities file whose lines have ``rgb``: the caption is the text file's first
  line; the global frame is generation's for inputs without labels; the hand box is the bounding box of
  the mesh image's pixels brighter than 127 (the public code's threshold), enlarged into render's square
  crop box for the local crops.

Order and randomness are pure functions of the recipe seed and the sample *position* p (the p-th sample
the run draws): epoch e = p // n visits the frames in the permutation ``SeedSequence(seed, (e, 3))``, the
caption of position p is drawn as generation draws sample p's, and :func:`sample_generator` gives the
position's own torch generator for its timestep, noises and VAE sample. Resuming at a position therefore
continues exactly as an uninterrupted run, for any batch size or number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from handsynth import io
from handsynth.errors import InputError
from handsynth.generate.frame import resample, sample_frames
from handsynth.generate.plan import Inputs, noise_seed
from handsynth.prompts.spans import free_text_prompt, hand_token_indices
from handsynth.prompts.templates import Prompt, PromptSampler

ORDER_STREAM, NOISE_STREAM = 3, 4
MESH_THRESHOLD = 127            # mesh pixels brighter than this (any channel) make the modalities hand box


@dataclass(frozen=True)
class TrainFrame:
    """One training frame: its key, hands ("right" | "left" | "both"; None for modalities), source RGB,
    global mesh image, and either its render label and local mesh image (render runs) or its caption and
    local crop box (modalities)."""

    key: str
    rgb: Path
    mesh: Path
    hands: str | None = None
    label: Path | None = None
    local_mesh: Path | None = None
    text: str | None = None
    crop_box: tuple[float, float, float, float] | None = None


@dataclass
class Sample:
    """One sample at the training size: float32 tensors (3, S, S) - RGB in [-1, 1], mesh images in [0, 1] -
    its caption and the CLIP positions of the caption's hand words."""

    key: str
    position: int
    rgb: Any
    mesh: Any
    local_rgb: Any
    local_mesh: Any
    prompt: Prompt
    token_indices: list[int]


def _open_rgb(path: Path, what: str):
    return io.open_rgb(path, what=what, fix="replace the file, or leave its frame out of the training inputs")


def mesh_box(mesh) -> tuple[float, float, float, float] | None:
    """Pixel-centre box (x0, y0, x1, y1) of the pixels of a mesh image brighter than :data:`MESH_THRESHOLD`
    in any channel; None when there is none."""
    pixels = np.asarray(mesh).max(axis=-1) > MESH_THRESHOLD
    ys, xs = np.nonzero(pixels)
    if not len(xs):
        return None
    return float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())


def frames_from_run(inputs: Inputs) -> tuple[list[TrainFrame], int]:
    """The frames of a render run that have a readable source image; also the number left out."""
    frames, missing = [], 0
    for frame in inputs.frames:
        label = io.read_json(frame.label, what="render label")
        path = label.get("image_path") if isinstance(label, dict) else None
        if not path or not Path(path).is_file() or frame.local is None:
            missing += 1
            continue
        frames.append(TrainFrame(key=frame.key, rgb=Path(path), mesh=frame.mesh, hands=frame.hands,
                                 label=frame.label, local_mesh=frame.local))
    if not frames:
        raise InputError(f"none of the render run's {len(inputs.frames)} frames has a source image to learn from "
                         "(the labels' image_path is missing or not a file)", where=inputs.path,
                         fix="render labels whose images are present (the labels' image paths must resolve on "
                             "this machine); training needs the real photographs, not only the mesh images")
    return frames, missing


def frames_from_modalities(path: Path, root: Path | None) -> tuple[list[TrainFrame], int]:
    """The entries of a modalities file that have ``rgb``, with their hand boxes; also the number left out."""
    from handsynth.prompts.modalities import read_modalities
    from handsynth.render.geometry import DEFAULT_CROP_SCALE, square_crop_box

    frames, missing = [], 0
    for entry in read_modalities(path, root):
        if entry.rgb is None:
            missing += 1
            continue
        mesh = _open_rgb(entry.mesh, "mesh image")
        rgb_size = _open_rgb(entry.rgb, "RGB image").size
        if rgb_size != mesh.size:
            raise InputError(f"the RGB image is {rgb_size[0]}x{rgb_size[1]} but its mesh image {entry.mesh} is "
                             f"{mesh.size[0]}x{mesh.size[1]}", where=entry.rgb,
                             fix="give each line a mesh image rendered at its RGB image's size")
        box = mesh_box(mesh)
        if box is None:
            raise InputError(f"the mesh image has no pixel brighter than {MESH_THRESHOLD}, so there is no hand box "
                             "for the local branch", where=entry.mesh,
                             fix="remove the line, or render the mesh image again (white hand on black)")
        crop = square_crop_box([np.asarray(box)], DEFAULT_CROP_SCALE)
        frames.append(TrainFrame(key=entry.key, rgb=entry.rgb, mesh=entry.mesh, text=entry.text,
                                 crop_box=tuple(float(v) for v in crop)))
    if not frames:
        raise InputError("no line of the modalities file has an 'rgb' image to learn from", where=path,
                         fix='add "rgb": PATH (the real photograph) to each line')
    return frames, missing


def _tensor(image, rgb: bool):
    import torch

    array = np.asarray(image, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array.transpose(2, 0, 1).copy())
    return tensor * 2.0 - 1.0 if rgb else tensor


def sample_generator(seed: int, position: int, device="cpu"):
    """The torch generator of sample ``position`` (timestep, noises and VAE sample are drawn from it)."""
    import torch

    return torch.Generator(device).manual_seed(noise_seed(seed, position, NOISE_STREAM))


class TrainData:
    """Samples by position (see the module docstring)."""

    def __init__(self, frames: list[TrainFrame], recipe, tokenizer):
        from handsynth.render.stage import crop_image

        if not frames:
            raise ValueError("no training frames")
        self.frames, self.recipe, self.tokenizer = frames, recipe, tokenizer
        self.size, self.fit = recipe.image.size, recipe.image.fit
        self.sampler = PromptSampler(recipe.prompts, recipe.seed) if recipe.prompts is not None else None
        self._crop = crop_image
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.frames)

    def frame_index(self, position: int) -> int:
        epoch, j = divmod(position, len(self.frames))
        order = self._orders.get(epoch)
        if order is None:
            rng = np.random.default_rng(np.random.SeedSequence(entropy=self.recipe.seed,
                                                               spawn_key=(epoch, ORDER_STREAM)))
            order = self._orders.setdefault(epoch, rng.permutation(len(self.frames)))
        return int(order[j])

    def prompt(self, frame: TrainFrame, position: int) -> Prompt:
        if frame.text is not None:
            return free_text_prompt(frame.text)
        if self.sampler is None:
            raise InputError("render-run inputs need captions, but the recipe has no 'prompts' section",
                             where=self.recipe.path, fix="add prompts.templates and prompts.slots")
        return self.sampler(position, frame.hands)

    def images(self, frame: TrainFrame) -> tuple[Any, Any, Any, Any]:
        """(global RGB, global mesh, local RGB, local mesh) PIL images of ``frame`` at the training size."""
        rgb = _open_rgb(frame.rgb, "source image")
        mesh = _open_rgb(frame.mesh, "mesh image")
        size = self.size
        if frame.label is not None:
            label = io.read_json(frame.label, what="render label")
            if list(rgb.size) != list(label["image_size"]) or list(mesh.size) != list(label["image_size"]):
                raise InputError(f"the source image is {rgb.size[0]}x{rgb.size[1]} and the mesh image "
                                 f"{mesh.size[0]}x{mesh.size[1]}, but the render label says the frame is "
                                 f"{label['image_size']}", where=frame.rgb,
                                 fix="render the labels of these very images again into a new --out")
            frames = sample_frames(label, self.fit, size, mesh.size, local=True)
            local_mesh = resample(_open_rgb(frame.local_mesh, "local mesh image"), frames.local_mesh)
            crop = label["crop_box"]
        else:
            frames = sample_frames(None, self.fit, size, mesh.size, local=False)
            crop = frame.crop_box
            local_mesh = self._crop(mesh, np.asarray(crop), size)
        return (resample(rgb, frames.image), resample(mesh, frames.image), self._crop(rgb, np.asarray(crop), size),
                local_mesh)

    def __getitem__(self, position: int) -> Sample:
        frame = self.frames[self.frame_index(position)]
        rgb, mesh, local_rgb, local_mesh = self.images(frame)
        prompt = self.prompt(frame, position)
        tokens = hand_token_indices(self.tokenizer, prompt.text, prompt.hand_spans)
        return Sample(key=frame.key, position=position, rgb=_tensor(rgb, True), mesh=_tensor(mesh, False),
                      local_rgb=_tensor(local_rgb, True), local_mesh=_tensor(local_mesh, False), prompt=prompt,
                      token_indices=tokens)


def read_frames(recipe, run: Path | None) -> tuple[Inputs | None, list[TrainFrame], int, str | None]:
    """The training frames of ``--run`` or the recipe's inputs (see :func:`handsynth.generate.plan.find_inputs`):
    (render-run inputs or None, frames, frames left out, note on a default used)."""
    from handsynth.generate.plan import find_inputs

    if run is None and recipe.inputs is not None and recipe.inputs.modalities is not None:
        frames, missing = frames_from_modalities(recipe.inputs.modalities, recipe.inputs.root)
        return None, frames, missing, None
    inputs, note = find_inputs(recipe, run, local=True)        # training always has the local branch
    frames, missing = frames_from_run(inputs)
    return inputs, frames, missing, note

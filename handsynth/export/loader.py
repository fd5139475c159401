"""Read exported shards in a training loop: ``(image, labels)`` pairs, labels in the image's own frame.

    from torch.utils.data import DataLoader
    from handsynth.export.loader import load_shards

    dataset = load_shards("shards/outdoor-gen/outdoor-gen-{000000..000009}.tar", shuffle=1000)
    for image, labels in DataLoader(dataset, batch_size=None, num_workers=2):
        ...   # image (H, W, 3) uint8; labels["hands"][i]["joints_2d"] in image pixels

Works on both layouts (``handsynth`` and ``hamer``). Every generated image is one item: the generated
image (key ``<key>``) and, with ``local=True``, the generated local image (key ``<key>-local``), each
with the labels of ITS frame (the ``image`` / ``local_image`` block of the sample's json):

- ``key``, ``frame`` ("image" | "local_image"), ``size`` [W, H];
- ``K`` (3, 3): the image's intrinsics (pixels; K @ joints_cam projects onto joints_2d);
- ``from_source``: {"scale", "offset"}: source pixel -> image pixel (``stretch`` runs: one scale per axis);
- ``hands``: per hand ``side``, ``joints_2d`` (21, 2) and ``box`` (4,) in image pixels (pixel centres at
  integers; not clipped to the image), ``joints_cam`` (21, 3) metres in the camera frame, ``mano``
  {pose (48,), shape (10,), trans (3,)} (world frame, the source annotation's);
- ``camera``: {"R" (3, 3), "t" (3,)} world -> camera of the source (X_cam = R X + t);
- ``generation``: prompt, seeds and model of the image.

Joint order is openpose21 (wrist, thumb1-4, index1-4, middle1-4, ring1-4, pinky1-4). Arrays are numpy
float64 (a DataLoader turns them into tensors). Nothing is unpickled: ``data.pyd`` members are ignored.
Items vary in hand count (and, for ``fit: native`` runs, in size): use ``batch_size=None`` or your own
collate function.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from handsynth.export.webdataset import IMAGE_EXTS, LOCAL_SUFFIX


def load_shards(urls: str | list[str], *, local: bool = True, shuffle: int = 0):
    """A ``webdataset`` pipeline over shard ``urls`` (brace patterns allowed) yielding ``(image, labels)``.

    ``local``: also yield the generated local images; ``shuffle``: shuffle shards and keep a buffer of this
    many items (0: file order). Shards are split between DataLoader workers and between nodes
    (torch.distributed), as webdataset does."""
    import webdataset as wds

    dataset = wds.WebDataset(urls, shardshuffle=shuffle if shuffle else False, nodesplitter=wds.split_by_node,
                             workersplitter=wds.split_by_worker, empty_check=False)
    dataset = dataset.compose(lambda samples: _items(samples, local))
    return dataset.shuffle(shuffle) if shuffle else dataset


def _items(samples: Iterable[dict[str, Any]], local: bool) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
    for sample in samples:
        key, document = sample["__key__"], json.loads(sample["json"])
        is_local = key.endswith(LOCAL_SUFFIX) and "local_image" in document
        if is_local and not local:
            continue
        yield decode_image(_member(sample, "")), labels(document, "local_image" if is_local else "image", key)
        local_bytes = _member(sample, "local.", required=False)
        if local and local_bytes is not None:
            yield decode_image(local_bytes), labels(document, "local_image", key + LOCAL_SUFFIX)


def _member(sample: dict[str, Any], prefix: str, required: bool = True) -> bytes | None:
    for ext in IMAGE_EXTS:
        if prefix + ext in sample:
            return sample[prefix + ext]
    if required:
        raise ValueError(f"sample {sample['__key__']} in {sample.get('__url__')} has no {prefix}jpg/png image")
    return None


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes -> (H, W, 3) uint8."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.array(img.convert("RGB"))


def labels(document: dict[str, Any], frame: str, key: str) -> dict[str, Any]:
    """The labels of the image ``frame`` ("image" | "local_image") of an exported json document."""
    block = document[frame]
    hands = []
    for framed, hand in zip(block["hands"], document["hands"]):
        hands.append({"side": framed["side"], "joints_2d": np.asarray(framed["joints_2d"], dtype=np.float64),
                      "box": np.asarray(framed["box"], dtype=np.float64),
                      "joints_cam": np.asarray(hand["joints_cam"], dtype=np.float64),
                      "mano": {k: np.asarray(v, dtype=np.float64) for k, v in hand["mano"].items()}})
    camera = document["camera"]
    return {"key": key, "frame": frame, "size": list(block["size"]), "K": np.asarray(block["K"], dtype=np.float64),
            "from_source": block["from_source"], "hands": hands,
            "camera": {"R": np.asarray(camera["R"], dtype=np.float64), "t": np.asarray(camera["t"], dtype=np.float64)},
            "generation": document.get("generation", {})}

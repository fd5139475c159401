"""The MANO hand model: chumpy-free loading of the official files, the left-hand fix, 21 joints.

MANO (Romero et al. 2017) is licence-restricted: users download ``MANO_RIGHT.pkl`` and
``MANO_LEFT.pkl`` themselves from https://mano.is.tue.mpg.de and point handsynth at them with
``--mano-dir`` or ``$HANDSYNTH_MANO_DIR``.

Loading. The official files are Python-2 pickles in which ``shapedirs`` is a chumpy ``Ch`` object
and ``J_regressor`` a scipy sparse matrix. chumpy does not run on current Python/numpy, and a
pickle can run arbitrary code, so the files are read with :class:`_MANOUnpickler`, which builds
only numpy arrays, sparse-matrix *state* and chumpy *state* (the array a ``Ch`` wraps is stored
under ``'x'`` in its pickled ``__dict__``); every other global is refused.

Left-hand fix. The official LEFT file's ``shapedirs[:, 0, :]`` (the x component of every shape
direction) has the wrong sign, so left-hand shapes are not the mirror image of right-hand ones
(smplx issue #48; InterHand2.6M, DexYCB and ARCTIC negate it after loading). :func:`load_mano_arrays`
negates it once, for the left file only, so that everything built on it is already fixed.

Forward. :class:`HandModel` runs ``smplx.MANO`` (``use_pca=False``, ``flat_hand_mean=False``: the
file's ``hands_mean`` is added to the 45 finger-pose values, as the InterHand2.6M / NeuralAnnot fits
expect) on batches, on any torch device and dtype. Outputs are in metres in the frame the
parameters live in (``trans`` applied). Joints are 21 in OpenPose order (:data:`JOINT_NAMES`):
MANO's 16 regressed joints plus five fingertip vertices.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from handsynth.errors import InputError, MissingResourceError
from handsynth.io import sha256_file

if TYPE_CHECKING:
    import torch

ENV_VAR = "HANDSYNTH_MANO_DIR"
FILE_NAMES = {"right": "MANO_RIGHT.pkl", "left": "MANO_LEFT.pkl"}
SUBFOLDERS = ("mano", "models")          # "models/" is where the official download keeps the files
MANO_URL = "https://mano.is.tue.mpg.de"

NUM_VERTICES = 778
NUM_FACES = 1538

JOINT_ORDER = "openpose21"
JOINT_NAMES: tuple[str, ...] = ("wrist",) + tuple(
    f"{finger}{i}" for finger in ("thumb", "index", "middle", "ring", "pinky") for i in range(1, 5)
)
# Fingertip vertices (smplx's vertex_ids["mano"]), appended after MANO's 16 joints as 16..20.
TIP_VERTICES = {"thumb": 744, "index": 320, "middle": 443, "ring": 554, "pinky": 671}
# MANO joint order: 0 wrist, index 1-3, middle 4-6, pinky 7-9, ring 10-11-12, thumb 13-15; tips 16-20
# (thumb, index, middle, ring, pinky). OPENPOSE_FROM_MANO[k] is the MANO(+tips) index of JOINT_NAMES[k].
OPENPOSE_FROM_MANO = (0, 13, 14, 15, 16, 1, 2, 3, 17, 4, 5, 6, 18, 10, 11, 12, 19, 7, 8, 9, 20)

# Expected array shapes (None: any size along that axis).
_SHAPES: dict[str, tuple[int | None, ...]] = {
    "v_template": (NUM_VERTICES, 3),
    "f": (NUM_FACES, 3),
    "shapedirs": (NUM_VERTICES, 3, None),
    "posedirs": (NUM_VERTICES, 3, 135),
    "J_regressor": (16, NUM_VERTICES),
    "weights": (NUM_VERTICES, 16),
    "kintree_table": (2, 16),
    "hands_components": (45, 45),
    "hands_mean": (45,),
}


def _where_to_get() -> str:
    return (f"MANO is licence-restricted and not shipped with handsynth: register at {MANO_URL}, download "
            f"\"Models & Code\", put {FILE_NAMES['right']} and {FILE_NAMES['left']} (from its models/ folder) "
            f"in one folder, then pass --mano-dir FOLDER or set {ENV_VAR}=FOLDER")


# --------------------------------------------------------------------------------------------
# Finding the files


def resolve_mano_dir(mano_dir: Path | None) -> Path:
    """The folder that holds the MANO files.

    ``mano_dir`` (else ``$HANDSYNTH_MANO_DIR``) may be that folder, a folder with a ``mano/`` or
    ``models/`` subfolder holding them, or one of the files itself. Raises MissingResourceError
    saying where to get the files when nothing usable is found.
    """
    source = "--mano-dir"
    if mano_dir is None:
        env = os.environ.get(ENV_VAR, "").strip()
        if not env:
            raise MissingResourceError(
                f"no MANO folder given (neither --mano-dir nor {ENV_VAR} is set)", fix=_where_to_get())
        mano_dir, source = Path(env), f"${ENV_VAR}"
    path = Path(mano_dir).expanduser()
    if path.is_file() and path.name in FILE_NAMES.values():
        path = path.parent
    if not path.is_dir():
        raise MissingResourceError(f"the MANO folder named by {source} does not exist", where=path,
                                   fix=_where_to_get())
    for folder in (path, *(path / sub for sub in SUBFOLDERS)):
        if any((folder / name).is_file() for name in FILE_NAMES.values()):
            return folder
    raise MissingResourceError(
        f"the MANO folder named by {source} holds neither {FILE_NAMES['right']} nor {FILE_NAMES['left']} "
        f"(also looked in its {' and '.join(s + '/' for s in SUBFOLDERS)} subfolders)",
        where=path, fix=_where_to_get())


# --------------------------------------------------------------------------------------------
# Reading the files without chumpy and without running code


class _PickledState:
    """Stands in for a class the file names: ignores constructor arguments, keeps the pickled state."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "_PickledState":
        return object.__new__(cls)

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _ChumpyState(_PickledState):
    """Stands in for any ``chumpy.*`` class; ``state`` is its ``__dict__`` (the array is ``'x'``)."""

    chumpy_class = "chumpy"


class _SparseState(_PickledState):
    """Stands in for a scipy sparse matrix class; ``state`` is its ``__dict__``."""

    sparse_format = "csc"


_STANDINS: dict[tuple[str, str], type] = {}


def _chumpy_standin(module: str, name: str) -> type:
    """A _ChumpyState subclass remembering which chumpy class the file named (for error messages)."""
    key = (module, name)
    if key not in _STANDINS:
        _STANDINS[key] = type(name, (_ChumpyState,), {"chumpy_class": f"{module}.{name}"})
    return _STANDINS[key]


def _sparse_standin(fmt: str) -> type:
    """A _SparseState subclass for one storage format ('csc', 'csr' or 'coo')."""
    key = ("scipy.sparse", fmt)
    if key not in _STANDINS:
        _STANDINS[key] = type(f"{fmt}_state", (_SparseState,), {"sparse_format": fmt})
    return _STANDINS[key]


def _reconstructor(cls: type, base: type, state: Any) -> Any:
    """copy_reg._reconstructor for our stand-in classes only (protocol 0/1 pickles of new-style objects)."""
    if not (isinstance(cls, type) and issubclass(cls, _PickledState) and base is object):
        raise pickle.UnpicklingError(f"refusing to reconstruct {cls!r}")
    return cls.__new__(cls)


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """_codecs.encode as Python 3 pickles bytes in protocol 2 (latin-1 only)."""
    if not isinstance(text, str) or encoding.lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("refusing _codecs.encode other than latin-1 text")
    return text.encode("latin-1")


def _numpy_globals() -> dict[tuple[str, str], Any]:
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    for module in ("__builtin__", "builtins"):
        allowed[(module, "set")] = set
        allowed[(module, "frozenset")] = frozenset
        allowed[(module, "object")] = object
    for module in ("copy_reg", "copyreg"):
        allowed[(module, "_reconstructor")] = _reconstructor
    allowed[("_codecs", "encode")] = _latin1_encode
    return allowed


class _MANOUnpickler(pickle.Unpickler):
    """Unpickler that builds only numpy arrays and stand-ins for chumpy / scipy.sparse objects."""

    def __init__(self, file: Any, path: Path):
        super().__init__(file, encoding="latin1")
        self._path = path
        self._allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._allowed:
            return self._allowed[(module, name)]
        if module == "chumpy" or module.startswith("chumpy."):
            return _chumpy_standin(module, name)
        fmt = name.split("_")[0]
        if module.startswith("scipy.sparse") and fmt in ("csc", "csr", "coo") and name.endswith(("_matrix", "_array")):
            return _sparse_standin(fmt)
        raise InputError(
            f"the MANO file asks to load '{module}.{name}', which a MANO model never contains; the file is "
            "corrupt or not a MANO file, and was not loaded (no code from it was run)",
            where=self._path, fix=f"re-download it from {MANO_URL} (\"Models & Code\")")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not part of a MANO file")


def _to_array(value: Any, path: Path, key: str) -> np.ndarray:
    """Turn a loaded value (array, chumpy stand-in, sparse stand-in, list) into a numeric ndarray."""
    if isinstance(value, _ChumpyState):
        state = value.state if isinstance(getattr(value, "state", None), dict) else {}
        if "x" not in state:
            raise InputError(f"key '{key}' is a chumpy object ({value.chumpy_class}) that holds no plain array",
                             where=path, fix=f"re-download the file from {MANO_URL}")
        return _to_array(state["x"], path, key)
    if isinstance(value, _SparseState):
        return _sparse_to_dense(value, path, key)
    try:
        array = np.asarray(value)
    except Exception as exc:
        raise InputError(f"key '{key}' is not an array ({exc})", where=path,
                         fix=f"re-download the file from {MANO_URL}") from exc
    if array.dtype.kind not in "biuf":
        raise InputError(f"key '{key}' holds {array.dtype} values, not numbers", where=path,
                         fix=f"re-download the file from {MANO_URL}")
    return array


def _sparse_to_dense(value: _SparseState, path: Path, key: str) -> np.ndarray:
    import scipy.sparse as sp

    state = value.state if isinstance(getattr(value, "state", None), dict) else {}
    shape = state.get("_shape", state.get("shape"))
    try:
        shape = tuple(int(n) for n in shape)
        if value.sparse_format == "coo":
            row, col = state["coords"] if "coords" in state else (state["row"], state["col"])
            matrix = sp.coo_matrix((np.asarray(state["data"]), (np.asarray(row), np.asarray(col))), shape=shape)
        else:
            build = sp.csc_matrix if value.sparse_format == "csc" else sp.csr_matrix
            matrix = build((np.asarray(state["data"]), np.asarray(state["indices"]), np.asarray(state["indptr"])),
                           shape=shape)
        return np.asarray(matrix.toarray(), dtype=np.float64)
    except Exception as exc:
        raise InputError(f"key '{key}' is a sparse matrix whose stored parts do not fit together ({exc})",
                         where=path, fix=f"re-download the file from {MANO_URL}") from exc


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            data = _MANOUnpickler(fh, path).load()
    except InputError:
        raise
    except Exception as exc:  # truncated, garbage, wrong protocol, ...
        raise InputError(f"could not read the MANO file ({type(exc).__name__}: {exc})", where=path,
                         fix=f"the file is corrupt or not a MANO model; re-download it from {MANO_URL} "
                             "(\"Models & Code\")") from exc
    if not isinstance(data, dict):
        raise InputError(f"the MANO file holds a {type(data).__name__}, not a dictionary of arrays", where=path,
                         fix=f"re-download it from {MANO_URL}")
    return data


def load_mano_arrays(root: Path, side: str) -> dict[str, Any]:
    """Read ``MANO_RIGHT.pkl`` / ``MANO_LEFT.pkl`` from ``root`` as plain numpy arrays.

    Returns the keys of :data:`_SHAPES` (``J_regressor`` dense float64, ``f`` int64) plus
    ``"path"`` (the file read) and ``"side"``. For ``side="left"`` the shapedirs fix is applied
    here, exactly once (see the module docstring). Raises MissingResourceError when the file is
    absent and InputError (naming the file and key) when it is corrupt or an array has the wrong
    shape or non-finite values.
    """
    if side not in FILE_NAMES:
        raise ValueError(f"side must be 'right' or 'left', not {side!r}")
    path = Path(root) / FILE_NAMES[side]
    if not path.is_file():
        raise MissingResourceError(f"the {side}-hand MANO file {FILE_NAMES[side]} is missing", where=path,
                                   fix=_where_to_get())
    data = _read_pickle(path)
    arrays: dict[str, Any] = {}
    for key, shape in _SHAPES.items():
        if key not in data:
            raise InputError(f"key '{key}' is missing from the MANO file", where=path,
                             fix=f"re-download it from {MANO_URL}")
        array = _to_array(data[key], path, key)
        if array.ndim != len(shape) or any(want is not None and got != want for got, want in zip(array.shape, shape)):
            want = "x".join("N" if n is None else str(n) for n in shape)
            raise InputError(f"key '{key}' has shape {array.shape}, expected {want}", where=f"{path}, key '{key}'",
                             fix=f"use the official MANO v1.x files from {MANO_URL}")
        if key != "kintree_table" and not np.all(np.isfinite(array)):
            raise InputError(f"key '{key}' holds NaN or infinite values", where=f"{path}, key '{key}'",
                             fix=f"re-download it from {MANO_URL}")
        arrays[key] = array
    arrays["f"] = arrays["f"].astype(np.int64)
    if arrays["f"].min() < 0 or arrays["f"].max() >= NUM_VERTICES:
        raise InputError(f"key 'f' has vertex indices outside 0..{NUM_VERTICES - 1}", where=f"{path}, key 'f'",
                         fix=f"re-download it from {MANO_URL}")
    parents = arrays["kintree_table"][0, 1:]
    if not all(0 <= parent < joint for joint, parent in enumerate(parents, start=1)):
        raise InputError("key 'kintree_table' does not list a parent before each joint",
                         where=f"{path}, key 'kintree_table'", fix=f"re-download it from {MANO_URL}")
    if arrays["shapedirs"].shape[2] < 10:
        raise InputError(f"key 'shapedirs' has {arrays['shapedirs'].shape[2]} shape directions, expected 10",
                         where=f"{path}, key 'shapedirs'", fix=f"use the official MANO files from {MANO_URL}")
    arrays["shapedirs"] = np.array(arrays["shapedirs"][:, :, :10], dtype=np.float64)
    if side == "left":
        arrays["shapedirs"][:, 0, :] *= -1.0      # the left-hand fix (smplx issue #48), applied only here
    arrays["path"] = path
    arrays["side"] = side
    return arrays


# --------------------------------------------------------------------------------------------
# Forward


@dataclass
class HandOutput:
    """MANO output in metres, in the frame of the parameters: vertices (B,778,3), joints (B,21,3)
    in :data:`JOINT_NAMES` order."""

    vertices: "torch.Tensor"
    joints: "torch.Tensor"


class HandModel:
    """Both MANO hands through ``smplx.MANO``, loaded on first use of each side.

    ``device`` and ``dtype`` (default float32) are those of the outputs; inputs may be numpy
    arrays or tensors on any device. (smplx rounds the model arrays to float32 when it builds its
    buffers, so a float64 model computes in float64 on float32-precise arrays.)
    """

    def __init__(self, mano_dir: Path | None = None, device: "str | torch.device" = "cpu",
                 dtype: "torch.dtype | None" = None):
        import torch

        self.root = resolve_mano_dir(mano_dir)
        self.device = torch.device(device)
        self.dtype = dtype or torch.float32
        self._layers: dict[str, Any] = {}
        self._faces: dict[str, np.ndarray] = {}
        self._tips = torch.tensor(list(TIP_VERTICES.values()), dtype=torch.long, device=self.device)
        self._openpose = torch.tensor(OPENPOSE_FROM_MANO, dtype=torch.long, device=self.device)
        self._hashes: dict[str, str] | None = None

    def _layer(self, side: str) -> Any:
        if side not in self._layers:
            import smplx

            arrays = load_mano_arrays(self.root, side)
            struct = smplx.utils.Struct(**{k: v for k, v in arrays.items() if k in _SHAPES})
            with contextlib.redirect_stdout(io.StringIO()):   # smplx prints a note about 10 betas
                layer = smplx.MANO(str(arrays["path"]), is_rhand=side == "right", data_struct=struct,
                                   use_pca=False, flat_hand_mean=False, dtype=self.dtype,
                                   create_global_orient=False, create_hand_pose=False, create_betas=False,
                                   create_transl=False)
            self._layers[side] = layer.to(self.device).eval()
            self._faces[side] = arrays["f"]
        return self._layers[side]

    def forward(self, side: str, pose: Any, shape: Any, trans: Any) -> HandOutput:
        """Posed hands for a batch: pose (B,48) axis-angle (global orient then 15 finger joints, radians),
        shape (B,10) betas, trans (B,3) metres."""
        import torch

        layer = self._layer(side)
        pose, shape, trans = (torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x)
                              .to(device=self.device, dtype=self.dtype) for x in (pose, shape, trans))
        batch = pose.shape[0] if pose.ndim == 2 else -1
        for name, value, width in (("pose", pose, 48), ("shape", shape, 10), ("trans", trans, 3)):
            if value.shape != (batch, width):
                raise ValueError(f"{name} must have shape (B, {width}) with B = len(pose), got {tuple(value.shape)}")
        out = layer(betas=shape, global_orient=pose[:, :3], hand_pose=pose[:, 3:], transl=trans)
        joints = torch.cat([out.joints, out.vertices[:, self._tips]], dim=1)
        return HandOutput(vertices=out.vertices, joints=joints[:, self._openpose])

    __call__ = forward

    def faces(self, side: str) -> np.ndarray:
        """Triangle indices (1538,3) int64 of ``side``'s mesh, as stored in that side's file."""
        self._layer(side)
        return self._faces[side]

    def rest(self, side: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``side``'s template with zero shape and the flat hand (no ``hands_mean``): MANO's 16 joints
        (16,3) and 778 vertices (778,3) in metres, and ``hands_mean`` (45,), all float64 numpy. A
        forward pass with finger pose ``-hands_mean`` gives this hand."""
        layer = self._layer(side)
        vertices = layer.v_template.detach().cpu().double().numpy()
        joints = layer.J_regressor.detach().cpu().double().numpy() @ vertices
        return joints, vertices, layer.hand_mean.detach().cpu().double().numpy().reshape(45)

    def file_hashes(self) -> dict[str, str]:
        """sha256 of each MANO file present in the folder, keyed by file name."""
        if self._hashes is None:
            self._hashes = {name: sha256_file(self.root / name) for name in FILE_NAMES.values()
                            if (self.root / name).is_file()}
        return dict(self._hashes)

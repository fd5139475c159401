"""Atomic file writes and JSON reading (run directories themselves: :mod:`handsynth.rundir`).

Every file a stage writes goes to a temporary name in the same directory and is renamed into
place, so a crash never leaves a half-written file that a reader would take for whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from handsynth.errors import InputError, OutputError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a new, empty temporary file next to ``path``; on success it is renamed to ``path``.

    The temporary file is created with the default permissions (0o666 less the umask), like any
    file the user writes, so the renamed result is as readable as a directly written one.
    """
    tmp_path = _temporary(path)
    tmp_path.touch(exist_ok=False)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """Like :func:`atomic_path`, but yield the temporary file opened for binary writing: it is created and
    opened in one step (one open per file written; they cost milliseconds on slow file systems)."""
    tmp_path = _temporary(path)
    try:
        with open(tmp_path, "xb") as fh:
            yield fh
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _temporary(path: str | Path) -> Path:
    """A new temporary name next to ``path`` (its folder created): ``.<name>.<16 hex>.tmp``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically; OutputError (naming the file) when it cannot be written."""
    try:
        with atomic_file(path) as fh:
            fh.write(data)
    except OSError as exc:
        raise OutputError(f"cannot write the file: {exc.strerror or exc}", where=path,
                          fix="check free disk space and the output directory's permissions") from None


def write_json_atomic(path: str | Path, obj: Any, *, indent: int | None = 2) -> None:
    text = json.dumps(obj, indent=indent, sort_keys=False, allow_nan=False)
    write_bytes_atomic(path, (text + "\n").encode())


def ensure_writable_dir(path: str | Path, *, what: str = "output directory") -> Path:
    """Create ``path`` if needed and check that files can be created in it."""
    path = Path(path)
    if path.is_file():
        raise OutputError(f"the {what} is a file, not a folder", where=path,
                          fix="choose another --out, or move the file away")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise OutputError(
            f"cannot write to the {what}: {exc.strerror or exc}",
            where=path,
            fix="choose a directory you can write to with --out, or fix its permissions",
        ) from None
    return path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: str | Path, *, what: str = "JSON file") -> Any:
    """Read JSON with a clear error naming the file and the position of a syntax error."""
    return parse_json(read_input(path, what=what), path, what=what)


def read_input(path: str | Path, *, what: str = "file") -> bytes:
    """The bytes of an input file; InputError naming it when it is missing or unreadable."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"the {what} does not exist", where=path, fix="check the path") from None
    except OSError as exc:
        raise InputError(f"cannot read the {what}: {exc.strerror or exc}", where=path,
                         fix="check the path and its permissions") from None


def parse_json(data: bytes | str, path: str | Path, *, what: str = "JSON file") -> Any:
    """JSON ``data`` read from ``path``; InputError naming the file and the position of a syntax error."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as exc:
        raise InputError(f"the {what} is not UTF-8 text (byte {exc.start})", where=path,
                         fix="repair or regenerate the file (a truncated download is a common cause)") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"the {what} is not valid JSON: {exc.msg.removesuffix(' at')} at line {exc.lineno}, column {exc.colno}",
            where=path,
            fix="repair or regenerate the file (a truncated download is a common cause)",
        ) from None


def open_rgb(path: str | Path, *, what: str, fix: str):
    """The image at ``path`` as an RGB PIL image; an InputError naming ``what`` and ``fix`` when it cannot
    be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise InputError(f"cannot read the {what}: {exc}", where=path, fix=fix) from None

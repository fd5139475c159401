"""Atomic file writes and run manifests.

Every file a stage writes goes to a temporary name in the same directory and is renamed into
place, so a crash never leaves a half-written file that a reader would take for whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import secrets
import sys
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from handsynth.errors import InputError, OutputError

MANIFEST = "manifest.json"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a new, empty temporary file next to ``path``; on success it is renamed to ``path``.

    The temporary file is created with the default permissions (0o666 less the umask), like any
    file the user writes, so the renamed result is as readable as a directly written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    tmp_path.touch(exist_ok=False)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically; OutputError (naming the file) when it cannot be written."""
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
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
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"the {what} does not exist", where=path, fix="check the path") from None
    except OSError as exc:
        raise InputError(f"cannot read the {what}: {exc.strerror or exc}", where=path,
                         fix="check the path and its permissions") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"the {what} is not valid JSON: {exc.msg.removesuffix(' at')} at line {exc.lineno}, column {exc.colno}",
            where=path,
            fix="repair or regenerate the file (a truncated download is a common cause)",
        ) from None


def environment_versions() -> dict[str, str]:
    """Versions of the packages that decide a run's output, for manifests."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("handsynth", "torch", "diffusers", "transformers", "numpy", "pyrender",
                 "trimesh", "smplx", "webdataset"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def new_manifest(stage: str, command: list[str] | None = None, **fields: Any) -> dict[str, Any]:
    return {
        "stage": stage,
        "command": command if command is not None else sys.argv,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": environment_versions(),
        **fields,
    }


def newest_run(stage: str, root: str | Path = "runs") -> Path | None:
    """The run directory under ``root`` of ``stage`` whose manifest has the latest ``created`` time, or None.

    How one stage finds the previous one's output by default; unreadable manifests are ignored.
    """
    best: tuple[datetime, Path] | None = None
    for path in sorted(Path(root).glob(f"*/{MANIFEST}")):
        try:
            data = read_json(path)
            created = datetime.fromisoformat(str(data["created"]))
        except (InputError, KeyError, TypeError, ValueError):
            continue
        if data.get("stage") == stage and (best is None or created > best[0]):
            best = (created, path.parent)
    return best[1] if best else None


def read_manifest(run_dir: str | Path, *, stage: str | None = None) -> dict[str, Any]:
    """The manifest of a run directory; with ``stage``, InputError unless that stage wrote it."""
    run_dir = Path(run_dir)
    if stage is not None and not run_dir.is_dir():
        raise InputError(f"the {stage} run directory '{run_dir}' does not exist", where=run_dir,
                         fix=f"pass --run with a directory written by `handsynth {stage}`, or run it first")
    path = run_dir / MANIFEST
    if not path.exists():
        raise InputError(
            f"{run_dir} is not a handsynth run directory: it has no {MANIFEST}",
            where=run_dir,
            fix="point to the directory a previous handsynth stage wrote (its --out)",
        )
    manifest = read_json(path, what="run manifest")
    if stage is not None and manifest.get("stage") != stage:
        raise InputError(
            f"{run_dir} holds the output of the '{manifest.get('stage')}' stage, not '{stage}'",
            where=path,
            fix=f"point to a directory written by 'handsynth {stage}'",
        )
    return manifest

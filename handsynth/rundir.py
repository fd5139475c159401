"""Run directories: the one place that knows how a stage owns, resumes and finishes its output folder.

Every stage (render, generate, export, convert) writes into a folder it owns, through :class:`RunDir`:

- **Manifest.** ``manifest.json`` (export: ``index.json``) says which stage wrote the folder, with what
  (command, versions, a *fingerprint* of everything that decides the output) and how it ended: ``status``
  is ``running`` while a process works in it, then ``complete``, ``failed`` (with the error) or
  ``interrupted`` - on every exit path a Python process can see.
- **Lock.** A process holds an exclusive ``flock`` on ``.handsynth.lock`` in the folder while it works;
  a second process aiming at the same folder is refused with the first one's pid, host and command.
  The kernel drops the lock when a process dies, even by SIGKILL, so a manifest still saying
  ``running`` while nobody holds the lock is recognised as *stale* and simply resumed.
- **Ownership.** A stage only resumes or replaces a folder its own manifest describes, with the same
  fingerprint (replacing needs ``replace=True``, i.e. ``--overwrite``); any other non-empty folder
  or a plain file is refused and left as it was. A run that fails before it produced anything
  removes the folder it created, so a failed start leaves no empty run folder behind.
- **Temporaries.** Files are written atomically (``io.atomic_path``: ``.<name>.<hex>.tmp`` then rename);
  the temporaries a killed run left are removed when the next run holds the lock - never while
  another process might still be writing them.
- **Completeness.** A finished file is one that hashes to the sha256 recorded when it was written
  (:func:`intact`); each stage records the hashes in its own per-item record and redoes items whose
  files do not match.

Each stage package owns its layout (which files, which records); this module only knows the folder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import os
import platform
import shutil
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from handsynth import io
from handsynth.console import console
from handsynth.errors import HandsynthError, InputError, OutputError

MANIFEST = "manifest.json"
LOCK = ".handsynth.lock"
RUNNING, COMPLETE, FAILED, INTERRUPTED = "running", "complete", "failed", "interrupted"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


# --- manifests ---------------------------------------------------------------------------------

@functools.cache
def environment_versions() -> dict[str, str]:
    """Versions of the packages that decide a run's output, for manifests (looked up once per process; a
    manifest gets a copy)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("handsynth", "torch", "diffusers", "transformers", "numpy", "pyrender",
                 "trimesh", "smplx", "webdataset", "zlib-ng"):
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
        "versions": dict(environment_versions()),
        **fields,
    }


def newest_run(stage: str, root: str | Path = "runs") -> Path | None:
    """The run directory under ``root`` of ``stage`` whose manifest has the latest ``created`` time, or None.

    How one stage finds the previous one's output by default; unreadable manifests are ignored.
    """
    best: tuple[datetime, Path] | None = None
    for path in sorted(Path(root).glob(f"*/{MANIFEST}")):
        try:
            data = io.read_json(path)
            created = datetime.fromisoformat(str(data["created"]))
        except (InputError, KeyError, TypeError, ValueError):
            continue
        if data.get("stage") == stage and (best is None or created > best[0]):
            best = (created, path.parent)
    return best[1] if best else None


def read_manifest(run_dir: str | Path, *, stage: str | None = None, name: str = MANIFEST) -> dict[str, Any]:
    """The manifest of a run directory; with ``stage``, InputError unless that stage wrote it."""
    run_dir = Path(run_dir)
    if stage is not None and not run_dir.is_dir():
        raise InputError(f"the {stage} run directory '{run_dir}' does not exist", where=run_dir,
                         fix=f"pass --run with a directory written by `handsynth {stage}`, or run it first")
    path = run_dir / name
    if not path.exists():
        raise InputError(
            f"{run_dir} is not a handsynth run directory: it has no {name}",
            where=run_dir,
            fix="point to the directory a previous handsynth stage wrote (its --out)",
        )
    manifest = io.read_json(path, what="run manifest")
    if not isinstance(manifest, dict):
        raise InputError("the run manifest is not a JSON object", where=path,
                         fix="rerun the stage that wrote it into a new --out")
    if stage is not None and manifest.get("stage") != stage:
        raise InputError(
            f"{run_dir} holds the output of the '{manifest.get('stage')}' stage, not '{stage}'",
            where=path,
            fix=f"point to a directory written by 'handsynth {stage}'",
        )
    return manifest


def describe_status(run_dir: Path, manifest: dict[str, Any]) -> str:
    """How the run ended, in words ("it <...>"); running only while a process holds the run's lock."""
    status = manifest.get("status")
    if status == RUNNING:
        return "is still being written by another process" if is_locked(run_dir) else \
            "stopped without finishing (killed?)"
    if status == FAILED:
        return f"failed ({manifest.get('error', 'no error recorded')})"
    if status == INTERRUPTED:
        return "was interrupted"
    return f"has status {status!r}"


# --- completeness ------------------------------------------------------------------------------

def intact(path: Path, sha256: str | None) -> bool:
    """Whether ``path`` is a finished file: it hashes to ``sha256`` (recorded from the bytes the encoder
    made, so they decode). Without a recorded hash (runs of older versions) it must decode as an image."""
    try:
        if sha256 is not None:
            return io.sha256_file(path) == sha256
        from PIL import Image

        with Image.open(path) as image:
            image.verify()               # the file's structure and checksums, to its end
        with Image.open(path) as image:
            image.load()                 # and the pixels decode
        return True
    except Exception:        # missing, unreadable or undecodable: not finished, whatever the reason
        return False


def check_digest(path: Path, data: bytes, sha256: str | None, *, fix: str) -> bytes:
    """``data`` (read from ``path``) when it matches the recorded ``sha256`` (or none is recorded);
    InputError naming the file otherwise."""
    import hashlib

    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise InputError("the file is damaged: its content does not match the sha256 recorded when it was "
                         "written", where=path, fix=fix)
    return data


# --- the lock ----------------------------------------------------------------------------------

def _holder(lock_path: Path) -> str:
    """Who holds (or last held) a run's lock, in words, from the lock file's content."""
    try:
        info = json.loads(lock_path.read_text(encoding="utf-8"))
        command = " ".join(str(a) for a in info.get("command", []))
        return f"pid {info.get('pid')} on host {info.get('host')}, started {info.get('started')}: {command}"
    except (OSError, ValueError, AttributeError, TypeError):
        return "a process that has not yet said who it is"


def is_locked(run_dir: Path) -> bool:
    """Whether some process (this one included) holds ``run_dir``'s lock now."""
    try:
        fd = os.open(Path(run_dir) / LOCK, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


class Lock:
    """An exclusive ``flock`` on the file ``path``, which holds the owner's pid, host and command.

    Non-blocking: :meth:`acquire` says False when another process holds it (:meth:`holder` says who).
    :meth:`release` deletes the file while still holding the lock; an acquirer that locked a file
    deleted meanwhile notices (another inode now at ``path``) and tries again, so the deletion is safe.
    """

    def __init__(self, path: Path):
        self.path, self.fd = Path(path), None

    def holder(self) -> str:
        return _holder(self.path)

    def acquire(self, command: list[str]) -> bool:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                return False
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)                 # locked a file its owner deleted on release: lock the new one
        self.fd = fd
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": list(command),
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        return True

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            os.close(self.fd)            # closing the only descriptor releases the flock
            self.fd = None

    def __enter__(self) -> "Lock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# --- temporaries -------------------------------------------------------------------------------

def remove_temporaries(out: Path, subdirs: tuple[str, ...] = ()) -> int:
    """Delete the temporaries (``.<name>.<hex>.tmp``, see io.atomic_path) an interrupted run left in ``out``
    and its ``subdirs``. Call only while holding the run's lock. Returns how many were removed."""
    stray = [p for folder in (out, *(out / s for s in subdirs)) for p in folder.glob(".*.tmp")]
    for path in stray:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return len(stray)


# --- the run directory -------------------------------------------------------------------------

def busy(out: Path, lock: Lock) -> OutputError:
    """The error for an ``out`` another process is writing to, naming that process."""
    return OutputError(f"another handsynth process is writing to {out} ({lock.holder()})", where=out,
                       fix="wait for it to finish or stop it, or choose another --out")


def _check_creatable(out: Path) -> None:
    """OutputError unless the nearest existing folder above ``out`` is a folder this process can write to."""
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to the output folder: {parent} is "
                          + ("not a folder" if not parent.is_dir() else "not writable"), where=out,
                          fix="choose a folder you can write to with --out, or fix its permissions")


class RunDir:
    """A stage's output folder (see the module docstring). Typical use::

        run = RunDir(out, "generate", fingerprint=prints, subdirs=("images", "samples"))
        run.check()                       # early, read-only: refuses a foreign folder before slow work
        ...load models...
        with run.open(**manifest_fields):
            ...write files...
            run.finish(counts=...)        # status "complete" when the block ends without an error

    ``fingerprint``: what decides the output; a folder whose manifest has another one is refused unless
    ``replace`` (then the stage rewrites it). ``recognise``: for ``replace``, a test that a folder whose
    manifest cannot be read still holds nothing but this stage's files (else it is refused).
    """

    def __init__(self, out: str | Path, stage: str, *, fingerprint: dict[str, Any], command: list[str] | None = None,
                 manifest: str = MANIFEST, subdirs: tuple[str, ...] = (), replace: bool = False,
                 recognise: Callable[[Path], bool] | None = None, what: str | None = None):
        self.out, self.stage, self.fingerprint = Path(out), stage, fingerprint
        self.command = list(command) if command is not None else list(sys.argv)
        self.manifest_name, self.subdirs, self.replace, self.recognise = manifest, subdirs, replace, recognise
        self.what = what or f"{stage} run"
        self.earlier: dict[str, Any] | None = None
        self.replacing = False
        self.stray_temporaries = 0
        self._lock = Lock(self.out / LOCK)
        self._fields: dict[str, Any] = {}
        self._final: dict[str, Any] | None = None
        self._created = False

    @property
    def manifest_path(self) -> Path:
        return self.out / self.manifest_name

    @property
    def resuming(self) -> bool:
        return self.earlier is not None and not self.replacing

    # -- checks --

    def check(self) -> bool:
        """Whether ``out`` holds an earlier run of the same fingerprint to resume (read-only). Refuses
        (InputError / OutputError, naming the folder) a plain file, another stage's or another plan's
        run (unless ``replace``) and a non-empty folder that is no run of this stage."""
        out = self.out
        self.earlier, self.replacing = None, False
        if out.exists() and not out.is_dir():
            raise OutputError(f"the --out of {self.stage} is a file, not a folder", where=out,
                              fix="choose another --out, or move the file away")
        if not out.is_dir():
            _check_creatable(out)
            return False
        if self._lock.fd is None and is_locked(out):
            raise busy(out, self._lock)
        if not self.manifest_path.exists():
            foreign = [p.name for p in out.iterdir() if p.name != LOCK and not p.name.endswith(".tmp")]
            if not foreign:
                return False
            if self.replace and self.recognise is not None and self.recognise(out):
                self.replacing = True
                return False
            raise InputError(f"{out} is not empty and holds no {self.what} (no {self.manifest_name}; it has "
                             f"e.g. '{sorted(foreign)[0]}'), so handsynth will not write into it", where=out,
                             fix="choose a new or empty --out")
        replace_fix = ", or pass --overwrite to replace it" if self.recognise is not None else ""
        try:
            earlier = read_manifest(out, name=self.manifest_name)
        except InputError as exc:
            if self.replace and self.recognise is not None and self.recognise(out):
                self.replacing = True
                return False
            raise InputError(f"{out} holds a {self.manifest_name} that cannot be read ({exc.what})",
                             where=self.manifest_path, fix="choose another --out" + replace_fix) from None
        ours_unlabelled = earlier.get("stage") is None and self.recognise is not None and self.recognise(out)
        if earlier.get("stage") != self.stage and not ours_unlabelled:
            raise InputError(f"{out} holds the output of the '{earlier.get('stage')}' stage, not of {self.stage}",
                             where=self.manifest_path, fix=f"choose another --out for {self.stage}")
        if "fingerprint" not in earlier:
            if self.replace:                      # written by an older handsynth: replaceable, not resumable
                self.earlier, self.replacing = earlier, True
                return False
            raise InputError(f"{out} holds a {self.what} written by an older handsynth version (its "
                             f"{self.manifest_name} has no fingerprint), so it cannot be resumed safely",
                             where=self.manifest_path, fix="choose a new --out" + replace_fix)
        before = earlier.get("fingerprint")
        before = before if isinstance(before, dict) else {}
        changed = [part for part, now in self.fingerprint.items() if before.get(part) != now]
        if changed and not self.replace:
            part = changed[0]
            raise InputError(
                f"{out} holds an earlier {self.what} made with a different {part} ({before.get(part)!r}, now "
                f"{self.fingerprint[part]!r}), so resuming would mix two runs", where=self.manifest_path,
                fix="use a new --out for this run, or rerun with the original inputs and settings to resume it"
                    + (" (or pass --overwrite to replace it)" if self.recognise is not None else ""))
        self.earlier = earlier
        self.replacing = bool(changed)
        return not self.replacing

    # -- the run --

    def open(self, **fields: Any) -> "RunDir":
        """Create ``out`` if needed, take the lock, check again (another process may have changed the
        folder since :meth:`check`), remove stray temporaries and write the manifest ``running``.
        A folder this run may not write to is refused before anything in it changes."""
        self.check()
        self._created = False
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.mkdir()
            self._created = True
        except FileExistsError:
            pass
        except OSError as exc:
            raise OutputError(f"cannot write to the output folder: {exc.strerror or exc}", where=self.out,
                              fix="choose a folder you can write to with --out, or fix its permissions") from None
        try:
            got = self._lock.acquire(self.command)
        except OSError as exc:
            self._remove_if_created()
            raise OutputError(f"cannot write to the output folder: {exc.strerror or exc}", where=self.out,
                              fix="choose a folder you can write to with --out, or fix its permissions") from None
        if not got:
            raise busy(self.out, self._lock)
        try:
            self.check()
            io.ensure_writable_dir(self.out)
            if self.earlier is not None and self.earlier.get("status") == RUNNING:
                console.print(f"[yellow]note:[/yellow] {self.out} was left 'running' by a process that stopped "
                              "without finishing (killed?); resuming it", soft_wrap=True)
            if self.earlier is not None or self.replacing:    # never touch a folder that is no run
                self.stray_temporaries = remove_temporaries(self.out, self.subdirs)
            self._fields = dict(fields)
            if self.earlier is not None:
                self._fields["previous_status"] = self.earlier.get("status")
            self._write(RUNNING)
        except BaseException:
            self._lock.release()
            self._remove_if_created()
            raise
        return self

    def update(self, **fields: Any) -> None:
        """Rewrite the manifest, still ``running``, with ``fields`` added (progress a reader may use)."""
        self._fields.update(fields)
        self._write(RUNNING)

    def finish(self, **fields: Any) -> None:
        """Record the final fields; the manifest says ``complete`` when the ``with`` block ends cleanly."""
        self._final = fields

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        try:
            if exc is None:
                self._fields.update(self._final or {})
                self._write(COMPLETE)
                return False
            if self.earlier is None and self._only_bookkeeping():
                self._undo_start()        # a failed start leaves the folder as it found it (or none)
            else:
                self._write_quietly(INTERRUPTED if isinstance(exc, KeyboardInterrupt) else FAILED, exc)
        finally:
            self._lock.release()
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            raise OutputError(f"the disk is full: {exc.strerror or exc}", where=exc.filename or self.out,
                              fix="free disk space (or choose another --out) and rerun the same command; finished "
                                  "files are kept") from None
        return False

    # -- internals --

    def _write(self, status: str, **extra: Any) -> None:
        io.write_json_atomic(self.manifest_path, new_manifest(
            self.stage, self.command, status=status, fingerprint=self.fingerprint, **self._fields, **extra))

    def _write_quietly(self, status: str, exc: BaseException) -> None:
        """The final status after an error; a failure to write it (e.g. a full disk) must not hide the error."""
        message = exc.message if isinstance(exc, HandsynthError) else f"{type(exc).__name__}: {exc}"
        try:
            self._write(status, **({"error": message} if status == FAILED else {}))
        except (OSError, HandsynthError, ValueError):
            pass

    def _only_bookkeeping(self) -> bool:
        """Whether ``out`` holds nothing but the manifest, lock, temporaries and empty stage folders."""
        for path in self.out.iterdir():
            if path.name in (LOCK, self.manifest_name) or path.name.endswith(".tmp"):
                continue
            if path.is_dir() and path.name in self.subdirs and not any(path.iterdir()):
                continue
            return False
        return True

    def _undo_start(self) -> None:
        if self._created:
            self._remove_if_created()
            return
        for name in (LOCK, self.manifest_name, *self.subdirs):
            path = self.out / name
            if path.is_dir():
                with contextlib.suppress(OSError):
                    path.rmdir()
            else:
                path.unlink(missing_ok=True)

    def _remove_if_created(self) -> None:
        if self._created and self.out.is_dir():
            shutil.rmtree(self.out, ignore_errors=True)
            self._created = False

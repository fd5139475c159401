"""Run directories: lock naming the other process, final status on every exit path, stale runs, ownership."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from handsynth import rundir
from handsynth.errors import InputError, OutputError
from handsynth.rundir import RunDir

PRINT = {"recipe": "abc"}


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def test_success_error_and_interrupt_each_leave_a_final_status(tmp_path):
    out = tmp_path / "run"
    with RunDir(out, "generate", fingerprint=PRINT, command=["t"], subdirs=("images",)).open(counts={"a": 1}) as run:
        (out / "images").mkdir()
        (out / "images" / "x.png").write_bytes(b"x")
        assert manifest(out)["status"] == "running" and rundir.is_locked(out)
        run.finish(counts={"a": 2})
    m = manifest(out)
    assert (m["status"], m["counts"], m["fingerprint"]) == ("complete", {"a": 2}, PRINT)
    assert not rundir.is_locked(out) and not (out / rundir.LOCK).exists()

    with pytest.raises(InputError):
        with RunDir(out, "generate", fingerprint=PRINT).open():
            raise InputError("broken input", where="somewhere")
    m = manifest(out)
    assert m["status"] == "failed" and "broken input" in m["error"] and m["previous_status"] == "complete"
    with pytest.raises(KeyboardInterrupt):
        with RunDir(out, "generate", fingerprint=PRINT).open():
            raise KeyboardInterrupt
    assert manifest(out)["status"] == "interrupted"
    with pytest.raises(ZeroDivisionError):
        with RunDir(out, "generate", fingerprint=PRINT).open():
            1 / 0
    assert manifest(out)["status"] == "failed" and "ZeroDivisionError" in manifest(out)["error"]
    assert (out / "images" / "x.png").read_bytes() == b"x"


def test_a_failed_start_leaves_no_run_folder(tmp_path):
    out = tmp_path / "runs" / "new"
    with pytest.raises(InputError):
        with RunDir(out, "render", fingerprint=PRINT, subdirs=("global",)).open():
            (out / "global").mkdir()
            raise InputError("bad label")
    assert not out.exists()
    empty = tmp_path / "empty"          # a folder the user made: left as it was, empty
    empty.mkdir()
    with pytest.raises(KeyboardInterrupt):
        with RunDir(empty, "render", fingerprint=PRINT).open():
            raise KeyboardInterrupt
    assert empty.is_dir() and not list(empty.iterdir())


def test_second_process_is_refused_with_pid_host_and_command(tmp_path):
    out = tmp_path / "run"
    with RunDir(out, "generate", fingerprint=PRINT, command=["handsynth", "generate", "--count", "9"]).open():
        with pytest.raises(OutputError) as err:
            RunDir(out, "generate", fingerprint=PRINT).open()
        message = err.value.message
        assert f"pid {os.getpid()}" in message and socket.gethostname() in message
        assert "handsynth generate --count 9" in message and err.value.exit_code == 4
        assert manifest(out)["status"] == "running"
    with RunDir(out, "generate", fingerprint=PRINT).open():      # free again once the first one ended
        pass


CHILD = """
import sys, time
from handsynth.rundir import RunDir
run = RunDir(sys.argv[1], "render", fingerprint={"recipe": "abc"}, command=["handsynth", "render", "child"])
run.open()
(run.out / ".frame.png.0123456789abcdef.tmp").write_bytes(b"half")
print("ready", flush=True)
time.sleep(600)
"""


def test_a_sigkilled_run_is_recognised_as_stale_and_resumed(tmp_path, capsys):
    out = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        with pytest.raises(OutputError, match=f"pid {child.pid} .*handsynth render child"):
            RunDir(out, "render", fingerprint=PRINT).open()
        assert rundir.describe_status(out, manifest(out)) == "is still being written by another process"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert manifest(out)["status"] == "running"                 # what a SIGKILL leaves
    assert rundir.describe_status(out, manifest(out)) == "stopped without finishing (killed?)"
    with RunDir(out, "render", fingerprint=PRINT).open() as run:
        assert run.resuming and run.stray_temporaries == 1
    assert "left 'running' by a process that stopped without finishing" in " ".join(capsys.readouterr().err.split())
    assert manifest(out)["status"] == "complete" and manifest(out)["previous_status"] == "running"


STOPPED_CHILD = """
import signal, sys, time
from handsynth import cli
from handsynth.rundir import RunDir

signal.signal(signal.SIGINT, signal.default_int_handler)   # as in a terminal, whatever the test runner set

@cli.app.command("sleepy")          # a command that holds a run open, registered for this child only
def sleepy(out: str) -> None:
    with RunDir(out, "render", fingerprint={"recipe": "abc"}, command=["handsynth", "sleepy"]).open() as run:
        (run.out / "frame.png").write_bytes(b"finished work")
        print("ready", flush=True)
        time.sleep(600)

sys.exit(cli.main(["sleepy", sys.argv[1]]))
"""


@pytest.mark.parametrize("sig, code, said", [(signal.SIGINT, 130, "interrupted: "),
                                             (signal.SIGTERM, 143, "terminated (SIGTERM): ")])
def test_ctrl_c_and_sigterm_end_a_run_as_interrupted_with_the_resume_advice(tmp_path, sig, code, said):
    out = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-c", STOPPED_CHILD, str(out)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        child.send_signal(sig)
        _, err = child.communicate(timeout=180)
    finally:
        child.kill()
    assert child.returncode == code, err
    assert said in err and "rerun the same command to resume" in " ".join(err.split()), err
    assert manifest(out)["status"] == "interrupted" and not rundir.is_locked(out)
    assert (out / "frame.png").read_bytes() == b"finished work"


def test_only_own_runs_are_resumed_or_replaced(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("mine")
    for replace in (False, True):
        with pytest.raises(InputError, match="not empty and holds no export run"):
            RunDir(user, "export", fingerprint=PRINT, replace=replace, recognise=lambda p: False,
                   what="export run").open()
    assert [p.name for p in user.iterdir()] == ["thesis.tex"]
    plain = tmp_path / "plain"
    plain.write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        RunDir(plain, "render", fingerprint=PRINT).open()
    assert plain.read_text() == "x"
    run = tmp_path / "run"
    with RunDir(run, "render", fingerprint=PRINT).open():
        pass
    with pytest.raises(InputError, match="different recipe"):
        RunDir(run, "render", fingerprint={"recipe": "other"}).open()
    with pytest.raises(InputError, match="'render' stage, not of generate"):
        RunDir(run, "generate", fingerprint=PRINT).open()
    with RunDir(run, "render", fingerprint={"recipe": "other"}, replace=True).open() as replaced:
        assert replaced.replacing and not replaced.resuming
    old = tmp_path / "old"                   # written by a handsynth without fingerprints: never resumed
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({"stage": "render", "status": "complete"}))
    with pytest.raises(InputError, match="older handsynth version"):
        RunDir(old, "render", fingerprint=PRINT).open()


def test_run_folders_get_the_umask_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        with RunDir(tmp_path / "a" / "run", "render", fingerprint=PRINT).open():
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a" / "run").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "a" / "run" / "manifest.json").stat().st_mode) == 0o640


def test_a_full_disk_is_a_one_paragraph_output_error(tmp_path):
    import errno

    with pytest.raises(OutputError, match="the disk is full") as err:
        with RunDir(tmp_path / "run", "render", fingerprint=PRINT).open():
            (tmp_path / "run" / "x").write_bytes(b"x")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert err.value.exit_code == 4 and "rerun the same command" in err.value.message
    assert manifest(tmp_path / "run")["status"] == "failed"


def test_intact_means_matching_sha256_or_decoding(tmp_path):
    import hashlib
    import io as _io

    from PIL import Image

    buf = _io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, format="PNG")
    data = buf.getvalue()
    path = tmp_path / "a.png"
    path.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    assert rundir.intact(path, digest) and rundir.intact(path, None)
    path.write_bytes(data[:-20])
    assert not rundir.intact(path, digest) and not rundir.intact(path, None)
    assert not rundir.intact(tmp_path / "missing.png", digest)

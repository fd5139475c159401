"""Keys, atomic writes, manifests and the CLI's error handling."""

import json
import pytest

from handsynth import keys
from handsynth.cli import main
from handsynth.errors import InputError, OutputError
from handsynth.io import atomic_file, atomic_path, ensure_writable_dir, read_json, write_json_atomic
from handsynth.rundir import new_manifest, read_manifest


@pytest.mark.parametrize("raw, expected", [
    ("Capture0/ROM03_RT_No_Occlusion/cam400262/image39.jpg", "capture0-rom03_rt_no_occlusion-cam400262-image39-jpg"),
    ("000000000036.JPG", "000000000036-jpg"),
    ("..", "x"),
])
def test_sanitize(raw, expected):
    assert keys.sanitize(raw) == expected
    assert keys.is_valid_key(keys.sanitize(raw))


def test_keys_are_stable_dotless_and_distinct():
    a = keys.frame_key("ih", "Capture0", 400262, 39)
    assert a == "ih_capture0_400262_39"
    assert keys.sample_key(a, 7) == "ih_capture0_400262_39_v00007"
    long1, long2 = keys.sanitize("a" * 200 + "1"), keys.sanitize("a" * 200 + "2")
    assert long1 != long2 and len(long1) <= keys.MAX_STEM and "." not in long1
    with pytest.raises(ValueError):
        keys.sample_key(a, -1)


@pytest.mark.parametrize("kind", ["path", "file"])
def test_atomic_write_keeps_old_file_on_failure(tmp_path, kind):
    target = tmp_path / "labels.json"
    write_json_atomic(target, {"a": 1})
    with pytest.raises(RuntimeError):
        if kind == "path":
            with atomic_path(target) as tmp:
                tmp.write_text("half")
                raise RuntimeError("crash")
        else:
            with atomic_file(target) as fh:
                fh.write(b"half")
                fh.flush()
                assert len(list(tmp_path.iterdir())) == 2         # the temporary, next to the target
                raise RuntimeError("crash")
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["labels.json"]  # no temp file left behind


def test_atomic_write_gets_default_permissions_and_clear_errors(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "a.json", {"a": 1})
    finally:
        os.umask(umask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644      # not mkstemp's 0o600
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError) as err:
        write_json_atomic(blocker / "b.json", {"b": 2})
    assert str(blocker / "b.json") in err.value.message


def test_write_json_rejects_nan(tmp_path):
    with pytest.raises(ValueError):
        write_json_atomic(tmp_path / "x.json", {"v": float("nan")})
    assert not (tmp_path / "x.json").exists()


def test_read_json_errors_name_file_and_position(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": 1,\n "b": }')
    with pytest.raises(InputError) as err:
        read_json(bad, what="labels file")
    assert str(bad) in err.value.message and "line 2" in err.value.message
    with pytest.raises(InputError, match="does not exist"):
        read_json(tmp_path / "missing.json")


def test_unwritable_path_is_output_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError) as err:
        ensure_writable_dir(blocker / "out")
    assert "--out" in err.value.message
    with pytest.raises(OutputError, match="is a file, not a folder"):
        ensure_writable_dir(blocker)


def test_manifest_roundtrip_and_stage_check(tmp_path):
    write_json_atomic(tmp_path / "manifest.json", new_manifest("render", command=["handsynth", "render"], counts={"n": 2}))
    m = read_manifest(tmp_path, stage="render")
    assert m["counts"] == {"n": 2} and m["versions"]["torch"]
    with pytest.raises(InputError, match="'render' stage, not 'generate'"):
        read_manifest(tmp_path, stage="generate")
    with pytest.raises(InputError, match="not a handsynth run directory"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(InputError, match="the render run directory .* does not exist"):
        read_manifest(tmp_path / "nope", stage="render")


def test_cli_version_and_usage_errors(capsys):
    assert main(["--version"]) == 0
    assert "handsynth 0.1.0" in capsys.readouterr().out
    assert main(["no-such-command"]) == 2


def test_newest_run_picks_the_latest_manifest_of_a_stage(tmp_path):
    from handsynth.rundir import newest_run

    for name, stage, created in [("a", "render", "2026-01-02T00:00:00+00:00"),
                                 ("b", "render", "2026-01-03T00:00:00+00:00"),
                                 ("c", "generate", "2026-01-04T00:00:00+00:00")]:
        write_json_atomic(tmp_path / name / "manifest.json", {"stage": stage, "created": created})
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "manifest.json").write_text("{broken")
    assert newest_run("render", tmp_path) == tmp_path / "b"
    assert newest_run("generate", tmp_path) == tmp_path / "c"
    assert newest_run("export", tmp_path) is None


def test_library_warnings_do_not_reach_the_user(tmp_path, monkeypatch, capsys):
    """A deprecation warning raised inside a library (here a stand-in module 'somelib') is not printed by a
    handsynth command, whatever the warning filters were; --debug shows it."""
    import warnings

    import handsynth.prompts.recipe as recipe_module

    library: dict = {"__name__": "somelib"}
    exec(compile("import warnings\ndef old_api():\n    warnings.warn('old_api is deprecated', FutureWarning)\n",
                 "somelib.py", "exec"), library)
    load = recipe_module.load_recipe

    def load_with_library_warning(path):
        library["old_api"]()
        return load(path)

    monkeypatch.setattr(recipe_module, "load_recipe", load_with_library_warning)
    monkeypatch.chdir(tmp_path)
    argv = ["prompts", "--recipe", "outdoor", "--count", "1", "--no-tokens", "--hands", "right"]
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")        # as PYTHONWARNINGS=default or a test runner would set them
        assert main(argv) == 0
        assert [str(w.message) for w in shown] == []
        assert main(["--debug", *argv]) == 0
        assert [str(w.message) for w in shown] == ["old_api is deprecated"]

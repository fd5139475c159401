"""`handsynth doctor` reports each piece a run needs and how to provide what is missing."""

from handsynth.cli import main


def test_doctor_all_present(mano_dir, tiny_sd_dir, tiny_guidance_dir, capsys, tmp_path):
    code = main(["doctor", "--mano-dir", str(mano_dir), "--model", str(tiny_sd_dir), "--guidance",
                 str(tiny_guidance_dir), "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"guidance module {tiny_guidance_dir}: local folder" in out
    assert "MANO_RIGHT.pkl, MANO_LEFT.pkl" in out
    assert "pyrender offscreen via egl" in out
    assert "everything a run needs is in place" in out


def test_doctor_names_missing_pieces_and_fixes(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HANDSYNTH_MANO_DIR", raising=False)
    monkeypatch.chdir(tmp_path)                  # no models/attentionhand here
    code = main(["doctor", "--mano-dir", str(tmp_path / "no-mano"), "--model", str(tmp_path / "no-model"),
                 "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 1
    assert "mano.is.tue.mpg.de" in out and str(tmp_path / "no-mano") in out
    assert "no-model: no such folder" in out
    assert "guidance module models/attentionhand: no such folder" in out and "handsynth convert --ckpt" in out
    assert "3 required piece(s) missing" in out and "everything a run needs" not in out


def test_doctor_does_not_call_a_run_ready_without_the_guidance_module(mano_dir, tiny_sd_dir, capsys, tmp_path,
                                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["doctor", "--mano-dir", str(mano_dir), "--model", str(tiny_sd_dir), "--out", str(tmp_path)])
    out = " ".join(capsys.readouterr().out.split())
    assert code == 1 and "MISSING guidance module models/attentionhand" in out
    assert "1 required piece(s) missing" in out and "everything a run needs" not in out


def test_doctor_checks_the_guidance_a_recipe_names(mano_dir, tiny_sd8_dir, tiny_controlnet, capsys, tmp_path):
    from tests.fixtures.generate import write_gen_recipe

    recipe = write_gen_recipe(tmp_path, tiny_sd8_dir, tiny_controlnet.file)
    code = main(["doctor", "--mano-dir", str(mano_dir), "--recipe", str(recipe), "--out", str(tmp_path)])
    out = " ".join(capsys.readouterr().out.split())
    assert code == 0, out
    assert f"original-format ControlNet file {tiny_controlnet.file}" in out
    assert "3-channel condition, hint encoder 16/32/96/256" in out and f"model {tiny_sd8_dir}: local folder" in out
    recipe.write_text(recipe.read_text().replace(str(tiny_controlnet.file), str(tmp_path / "gone.safetensors")))
    assert main(["doctor", "--mano-dir", str(mano_dir), "--recipe", str(recipe), "--out", str(tmp_path)]) == 1
    assert "gone.safetensors' does not exist" in " ".join(capsys.readouterr().out.split())


def test_doctor_checks_the_evaluation_models(tmp_path, capsys, monkeypatch, hand_task_file):
    from handsynth.evaluate import inception

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HANDSYNTH_CACHE", str(tmp_path / "cache"))
    main(["doctor", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert f"{inception.INCEPTION_FILE} is not in torch hub's cache" in out
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in out and "--build-hand-model" in out
    inception.cache_path().parent.mkdir(parents=True)
    inception.cache_path().write_bytes(b"weights")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "hand_landmarker.task").write_bytes(hand_task_file.read_bytes())
    main(["doctor", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert f"Inception weights (evaluate: FID/KID): {inception.cache_path()}" in out
    assert str(tmp_path / "cache" / "hand_landmarker.task") in out and "mediapipe 1.2" in out

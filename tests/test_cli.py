"""Bad input stops the CLI with one clear line, before any worker starts or any run folder is made."""
import pytest

from retro_dist.cli import main


def _run(capsys, tmp_path, *overrides, config="configs/test.yaml"):
    argv = ["train", "--config", config, "--set", f"run.output_dir={tmp_path / 'runs'}"]
    for o in overrides:
        argv += ["--set", o]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()
    return err


def test_mistyped_key(capsys, tmp_path, in_repo):
    err = _run(capsys, tmp_path, "rollout.trails=3")
    assert "unknown config key 'rollout.trails' (did you mean 'rollout.trials'?)" in err


def test_missing_model_path(capsys, tmp_path, in_repo):
    err = _run(capsys, tmp_path, "reflector.model=models/tiny-lmm")
    assert err == "retro-dist: error: reflector.model: model path not found: models/tiny-lmm " \
                  "(run `retro-dist make-models` to build the tiny local models)"


def test_unreachable_endpoint(capsys, tmp_path, in_repo):
    err = _run(capsys, tmp_path, "actor.backend=openai", "actor.base_url=http://127.0.0.1:9/v1")
    assert "actor endpoint http://127.0.0.1:9/v1/models is unreachable" in err


def test_missing_config_file(capsys, tmp_path, in_repo):
    err = _run(capsys, tmp_path, config=str(tmp_path / "nope.yaml"))
    assert "config file not found" in err


def test_existing_run_folder_is_not_overwritten(capsys, tmp_path, in_repo):
    run = tmp_path / "runs" / "test"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("keep me\n")
    code = main(["train", "--config", "configs/test.yaml", "--set", f"run.output_dir={tmp_path / 'runs'}"])
    assert code == 2 and "already exists" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == "keep me\n"

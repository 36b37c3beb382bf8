"""`retro-dist campaign`: runs expanded from a spec, trained then evaluated, aggregated; resumable."""
import json

import pytest

from retro_dist.config import ConfigError
from retro_dist.launch.campaign import expand, load_spec, run_campaign


def test_expand_names_runs_after_what_differs():
    runs = expand(["configs/a.yaml"], {"run.seed": [0, 1], "env.games": [["twx/coin"], ["twx/coin", "twx/sorting"]]},
                  ["run.iterations=2"])
    assert [r.name for r in runs] == ["seed-0-games-twx_coin", "seed-0-games-twx_coin_twx_sorting",
                                      "seed-1-games-twx_coin", "seed-1-games-twx_coin_twx_sorting"]
    assert runs[1].overrides == ["run.iterations=2", "run.seed=0", "env.games=[twx/coin, twx/sorting]"]
    two = expand(["configs/a.yaml", "configs/b.yaml"], {"run.seed": [0]}, [])
    assert [r.name for r in two] == ["a-seed-0", "b-seed-0"]


def test_bad_specs_stop_with_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="campaign spec .* does not exist"):
        load_spec(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nconfigs: [configs/test.yaml]\ngrd: {run.seed: [0]}\n")
    with pytest.raises(ConfigError, match="unknown key\\(s\\) grd"):
        load_spec(str(bad))
    bad.write_text("name: x\nconfigs: [configs/test.yaml]\neval: {taks: 3}\n")
    with pytest.raises(ConfigError, match="unknown eval key\\(s\\) taks"):
        load_spec(str(bad))


@pytest.mark.component
def test_campaign_trains_evaluates_aggregates_and_resumes(tmp_path, in_repo, tiny_model):
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"""
name: tiny
output_dir: {tmp_path}/campaigns
configs: [configs/test.yaml]
grid: {{run.seed: [0, 1]}}
overrides: [actor.model={tiny_model}, reflector.model={tiny_model}, rollout.num_workers=0,
            run.iterations=1, rollout.tasks_per_iteration=2, rollout.parallel_tasks=2]
eval: {{tasks: 4, trials: 2, split: test, arms: [initial, trained, oracle]}}
""")
    folder = tmp_path / "campaigns" / "tiny"
    run_campaign(str(spec), only="seed-0")  # an interrupted campaign: one run done
    done0 = (folder / "seed-0" / "train.done").stat().st_mtime
    assert not (folder / "seed-1").exists() and not (folder / "campaign.json").exists()
    summary0 = json.loads((folder / "seed-0" / "summary.json").read_text())  # every run ends with one
    assert summary0["first"]["step"] == 0 and len(summary0["last"]["success_by_trial"]) == 2
    summary = run_campaign(str(spec))
    assert (folder / "seed-0" / "train.done").stat().st_mtime == done0  # not trained again
    assert summary["finished"] == summary["planned"] == 2
    for row in summary["runs"]:
        assert set(row["final"]) == {"initial", "trained", "oracle"} and len(row["gain"]["ci95"]) == 2
        rep = json.loads((folder / row["run"] / "eval-test" / "eval.json").read_text())
        assert set(rep["first_success"]) == {"initial", "trained", "oracle"}  # per task, per arm
        assert len(rep["first_success"]["trained"]) == rep["tasks"] == 4
    assert (folder / "campaign.png").is_file() and "| seed-1 |" in (folder / "campaign.md").read_text()


def test_training_figures_read_the_rl_rows_and_the_last_quarter(tmp_path):
    from retro_dist.launch.campaign import training_figures

    rows = [{"iteration": i, "learner/sft": int(i < 2), "learner/advantage_var": 9.0 if i < 2 else 0.1 * i,
             "rollout/reflection_reward": 0.01 * i, "losses/kl": 0.5} for i in range(8)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    figs = training_figures(path)
    assert figs["advantage_var"] == pytest.approx(0.45)  # iterations 2-7 only: the SFT rows are not RL
    assert figs["reflection_reward_last_quarter"] == pytest.approx(0.065)  # iterations 6 and 7
    assert figs["kl_last_quarter"] == pytest.approx(0.5) and figs["rows"] == 8
    assert training_figures(tmp_path / "missing.jsonl") == {}


def test_aggregate_breaks_a_mix_of_games_down_per_game(tmp_path):
    from types import SimpleNamespace

    from retro_dist.launch.campaign import aggregate
    from retro_dist.launch.evaluate import _report

    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: mix\noutput_dir: {tmp_path}\nconfigs: [configs/test.yaml]\n"
                    "eval: {tasks: 8, trials: 2, split: test, arms: [initial, trained]}\n")
    camp = load_spec(str(spec))
    # 8 tasks alternating coin / mapreader; trained solves every coin task by trial 2, none more on mapreader
    tasks = [SimpleNamespace(env_name=g, task_id=f"{g}/{i}", seed=i)
             for i, g in enumerate(["twx/coin", "twx/mapreader"] * 4)]
    first = {"initial": [0, None, None, 1, None, None, 0, 0], "trained": [0, None, 1, 1, 1, None, 0, 0]}
    out = camp.folder / camp.runs[0].name / "eval-test"
    out.mkdir(parents=True)
    (out / "eval.json").write_text(json.dumps(_report(first, tasks, 2, "test", None, 1.0)))
    by_game = aggregate(camp)["runs"][0]["by_game"]
    assert by_game["twx/coin"]["final"] == {"initial": 0.5, "trained": 1.0}
    assert by_game["twx/coin"]["mean"] == pytest.approx(0.5)
    assert by_game["twx/mapreader"]["mean"] == 0.0 and by_game["twx/mapreader"]["final"]["trained"] == 0.5
    md = (camp.folder / "campaign.md").read_text()
    assert "| twx/coin | 0.500 | 1.000 | +0.500 [" in md and "| twx/mapreader | 0.500 | 0.500 | +0.000 [" in md


def test_shipped_campaign_specs_load_with_their_configs():
    from pathlib import Path

    from retro_dist.config import load_config

    specs = sorted(Path("configs/campaigns").glob("*.yaml"))
    assert len(specs) >= 6
    for path in specs:
        camp = load_spec(str(path))  # unknown keys in the spec or its eval section raise
        for run in camp.runs:
            load_config(run.config, run.overrides)  # each run's config with its grid point applied

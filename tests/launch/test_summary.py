from retro_dist.launch.train import summarize_rollouts


def _worker(episodes, succ, refl, reward_sum, syncs=()):
    return {"episodes": episodes, "success_by_trial": succ, "reflections": refl, "reward_sum": reward_sum,
            "trials": 5, "stored": 9, "errors": ["e"] if refl == 0 else [], "policy_version": 3,
            "sync_seconds": 0.5, "syncs": list(syncs), "worker_id": 0}


def test_success_is_episode_weighted_and_reward_is_per_reflection():
    m = summarize_rollouts([_worker(4, [0.5, 0.75], 2, 1.0, [{"sync/probe_gap": 1e-5}]),
                            _worker(12, [0.25, 0.25], 6, 1.0)], trials=2)
    assert m["rollout/success@trial0"] == (0.5 * 4 + 0.25 * 12) / 16
    assert m["rollout/success@trial1"] == (0.75 * 4 + 0.25 * 12) / 16
    assert m["rollout/reflection_reward"] == 2.0 / 8
    assert m["sync/probe_gap_max"] == 1e-5 and m["time/sync_seconds"] == 1.0


def test_no_reflections_gives_nan_not_a_crash():
    m = summarize_rollouts([_worker(2, [1.0], 0, 0.0)], trials=1)
    assert m["rollout/reflection_reward"] != m["rollout/reflection_reward"]  # NaN
    assert m["rollout/errored_episodes"] == 1


def test_eval_unshard_restores_task_order():
    from retro_dist.launch.evaluate import unshard

    tasks = list(range(7))
    shards = [tasks[i::3] for i in range(3)]  # as run_eval shards them over 3 workers
    per_shard = [{"none": [t * 10 for t in shard]} for shard in shards]
    assert unshard(per_shard, ["none"], 7)["none"] == [t * 10 for t in tasks]

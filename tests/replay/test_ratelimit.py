"""RateLimiter: Reverb's MinSize and SampleToInsertRatio semantics, counted in rows."""
import pytest

from retro_dist.replay.ratelimit import RateLimiter


def test_min_size_only():
    rl = RateLimiter(min_size_to_sample=3)
    assert not rl.can_sample(1)
    rl.insert(2)
    assert not rl.can_sample(1) and rl.can_insert(100)
    rl.insert(1)
    assert rl.can_sample(1) and rl.can_sample(10**6)  # no ratio: any amount once big enough
    rl.delete(1)  # eviction takes the store back under the minimum
    assert not rl.can_sample(1)


def test_sample_to_insert_ratio_with_error_buffer():
    # spi 2, min size 2, buffer 3: min_diff = 4 - 3 = 1, max_diff = 4 + 3 = 7
    rl = RateLimiter(min_size_to_sample=2, samples_per_insert=2.0, error_buffer=3.0)
    assert (rl.min_diff, rl.max_diff) == (1.0, 7.0)
    assert rl.can_insert(2)  # below the minimum size inserts are free
    rl.insert(2)  # diff = 4
    assert rl.can_insert(1)  # (3 * 2) - 0 = 6 <= 7
    assert not rl.can_insert(2)  # (4 * 2) - 0 = 8 > 7: the writer is too far ahead
    assert rl.can_sample(3) and not rl.can_sample(4)  # 4 - 3 = 1 >= 1; 4 - 4 = 0 < 1
    rl.sample(3)  # diff = 1
    assert not rl.can_sample(1)  # the learner must wait for inserts
    assert rl.can_insert(3)  # (5 * 2) - 3 = 7 <= 7
    rl.insert(1)  # diff = 3
    assert rl.can_sample(2) and not rl.can_sample(3)
    assert rl.state()["diff"] == 3.0


def test_long_run_ratio_is_held():
    rl = RateLimiter(min_size_to_sample=1, samples_per_insert=4.0, error_buffer=8.0)
    inserted = sampled = 0
    for _ in range(1000):  # greedy producer and consumer, one row at a time
        if rl.can_insert(1):
            rl.insert(1)
            inserted += 1
        while rl.can_sample(1):
            rl.sample(1)
            sampled += 1
    assert abs(sampled - 4.0 * inserted) <= 4.0 + 8.0


@pytest.mark.parametrize("kwargs", [dict(min_size_to_sample=0),
                                    dict(min_size_to_sample=1, samples_per_insert=0.0),
                                    dict(min_size_to_sample=1, error_buffer=-1.0)])
def test_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        RateLimiter(**kwargs)

"""The sweep pictures draw at the edges of the success rate (no env)."""
import pytest

from libero_eval import plots
from libero_eval.stats import wilson_interval

PNG = b"\x89PNG\r\n\x1a\n"


def _row(policy, k, n, speedup=None, low=None, high=None):
    lo, hi = wilson_interval(k, n)
    return {"policy": policy, "suite": "libero_spatial", "n": n, "successes": k, "success_rate": k / n if n else None,
            "wilson_low": lo if low is None else low, "wilson_high": hi if high is None else high,
            "speedup": speedup}


@pytest.mark.parametrize("n", [6, 10, 13, 25])
def test_zero_and_full_success_rates_draw(n):
    rows = [_row("none", n, n, 1.0), _row("cache_a", 0, n, 2.0), _row("cache_b", 1, n, 1.5)]
    assert plots.success_by_policy(rows, baseline="none", highlight="cache_a").startswith(PNG)
    assert plots.success_vs_speedup(rows, highlight="cache_a").startswith(PNG)


def test_a_bound_slightly_inside_the_rate_still_draws():
    """A summary stored before the bounds were exact: low a hair above 0/n, high a hair below n/n."""
    rows = [_row("none", 10, 10, 1.0, high=1 - 1e-16), _row("cache", 0, 6, 2.0, low=2.8e-17)]
    assert plots.success_by_policy(rows, baseline="none").startswith(PNG)
    assert plots.success_vs_speedup(rows).startswith(PNG)


def test_no_scored_episode_draws():
    rows = [_row("none", 0, 0, None)]
    assert plots.success_by_policy(rows).startswith(PNG)
    assert plots.success_vs_speedup(rows).startswith(PNG)


def test_sync_naive_and_rtc_runs_of_a_variant_are_drawn_side_by_side():
    rows = [{**_row("none_timingsync", 6, 20), "timing": "sync", "family": "none"},
            {**_row("none_timingrealtime", 2, 20), "timing": "realtime", "execution": "naive", "family": "none"},
            {**_row("none_rtc", 5, 20), "timing": "realtime", "execution": "rtc", "family": "none"},
            {**_row("fw_rtc", 0, 20), "timing": "realtime", "execution": "rtc", "family": "fw"},
            {**_row("fw_timingsync", 1, 20), "timing": "sync", "family": "fw"}]
    assert [plots.execution_mode(r) for r in rows] == ["sync", "naive", "rtc", "rtc", "sync"]
    assert plots.sync_vs_realtime(rows).startswith(PNG)
    assert plots.sync_vs_realtime(rows[:1] + rows[3:4]) is None  # no variant run two ways

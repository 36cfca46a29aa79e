"""Wilson interval and exact McNemar test (no env)."""
import pytest

from libero_eval.stats import mcnemar_exact, wilson_interval


def test_wilson_bounds_bracket_the_rate_and_hit_the_edges_exactly():
    for n in range(1, 101):
        for k in range(n + 1):
            lo, hi = wilson_interval(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0, (k, n, lo, hi)
        assert wilson_interval(0, n)[0] == 0.0  # exactly: plots draw rate - low as an error bar
        assert wilson_interval(n, n)[1] == 1.0


def test_wilson_interval_known_values():
    assert wilson_interval(5, 10) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    assert wilson_interval(24, 30) == (pytest.approx(0.62694, abs=1e-4), pytest.approx(0.90495, abs=1e-4))
    assert wilson_interval(0, 6) == (0.0, pytest.approx(0.3903, abs=1e-4))
    assert wilson_interval(10, 10) == (pytest.approx(0.7225, abs=1e-4), 1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_mcnemar_exact_known_values():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)  # 0.03125
    assert mcnemar_exact(5, 1) == pytest.approx(14 / 64)  # symmetric in b, c
    assert mcnemar_exact(2, 8) == pytest.approx(112 / 1024)  # 0.109375
    assert mcnemar_exact(3, 3) == 1.0  # the two-sided tail is capped at 1


def test_detectable_difference_solves_connors_sample_size():
    from libero_eval.stats import Z_80, Z_95, detectable_difference

    d = detectable_difference(40, 12)  # psi = 0.3
    needed = (Z_95 * 0.3**0.5 + Z_80 * (0.3 - d * d) ** 0.5) ** 2 / (d * d)
    assert needed == pytest.approx(40, rel=1e-6)
    assert detectable_difference(100, 30) < d < detectable_difference(40, 20)  # more pairs / less discordance: finer
    # few discordant pairs: the floor over discordances at which a difference becomes detectable, not "nothing"
    assert detectable_difference(20, 0) == detectable_difference(20, 6) == detectable_difference(20, 7) == pytest.approx(0.349, abs=1e-3)
    assert detectable_difference(0, 0) is None and detectable_difference(2, 0) is None

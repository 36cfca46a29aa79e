"""Small statistics for success rates (no scipy needed)."""
from __future__ import annotations

import math


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion; (0, 1) when n == 0.

    The bounds always bracket k/n, and are exactly 0 at k == 0 and exactly 1 at k == n: the closed form
    gives 2.8e-17 for 0/6 and 0.9999999999999999 for 10/10 in floating point, which turned the error bars
    drawn from rate - low and high - rate negative (matplotlib refuses those)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else min(p, max(0.0, centre - half))
    hi = 1.0 if successes == n else max(p, min(1.0, centre + half))
    return lo, hi


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pair counts b and c (binomial test, p=0.5)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


Z_95 = 1.959963984540054  # two-sided 5%
Z_80 = 0.8416212335729143  # power 80%


def detectable_difference(pairs: int, discordant: int, z_alpha: float = Z_95, z_beta: float = Z_80) -> float | None:
    """The smallest difference in success rate a paired comparison of `pairs` episodes could detect (two-sided
    5%, power 80%): Connor's (1987) normal-approximation sample size for McNemar's test,
    n = (z_a sqrt(psi) + z_b sqrt(psi - d^2))^2 / d^2, solved for d, with psi the observed discordant share.
    When so few pairs are discordant that no d <= psi is detectable, psi is raised to the smallest share at
    which one is: the result then reads "nothing smaller is detectable with this many pairs, whatever the
    discordance". None only when no pairs."""
    if pairs <= 0:
        return None
    for count in range(max(discordant, 1), pairs + 1):
        found = _detectable(pairs, count / pairs, z_alpha, z_beta)
        if found is not None:
            return found
    return None


def _detectable(pairs: int, psi: float, z_alpha: float, z_beta: float) -> float | None:
    def needed(d: float) -> float:
        return (z_alpha * math.sqrt(psi) + z_beta * math.sqrt(max(0.0, psi - d * d))) ** 2 / (d * d)

    if needed(psi) > pairs:
        return None
    lo, hi = 0.0, psi  # needed() decreases in d: bisect for the smallest d with needed(d) <= pairs
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if needed(mid) <= pairs else (mid, hi)
    return hi

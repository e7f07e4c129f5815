"""Upper confidence bounds on what a shorter read loses, for risk-controlling calibration.

A calibrated read is judged per image against the full read of the same image by the same model: it *flips* when
its top-1 differs, it *loses* when the full read was right and it is wrong, it *gains* the other way round. The
accuracy drop in points is ``100 * (P(lose) - P(gain))``; a flip rate bounds it from above without labels.

Each bound holds with probability at least ``1 - delta`` over the draw of the calibration images (i.i.d. from the
same distribution as the served images): Clopper–Pearson for a rate (exact, binomial), and for the net drop a
McNemar-style product bound (below). Calibration walks candidates from the safest to the cheapest and stops at
the first whose bound exceeds the target (fixed-sequence testing), so the chosen one is guaranteed at ``delta``
without a multiple-testing correction (Angelopoulos et al., "Learn then Test", 2021).
"""

from __future__ import annotations

import math

from scipy.stats import beta, fisher_exact

CRITERIA = ("net", "lost", "flips")


# a certificate on pooled images fails when the deployed backbone's own pool flips more often than the judged
# pools at this one-sided level (assumption_p)
ASSUMPTION_ALPHA = 0.05

def cp_upper(events: int, n: int, delta: float) -> float:
    """Clopper–Pearson upper bound on a rate from ``events`` of ``n`` at confidence ``1 - delta`` (1.0 if n = 0)."""
    if n <= 0 or events >= n:
        return 1.0
    return float(beta.ppf(1.0 - delta, events + 1, n - events))


def cp_lower(events: int, n: int, delta: float) -> float:
    """Clopper–Pearson lower bound on a rate (0.0 when there are no events)."""
    if n <= 0 or events <= 0:
        return 0.0
    return float(beta.ppf(delta, events, n - events + 1))


def net_upper(lost: int, gained: int, n: int, delta: float) -> float:
    """Upper bound on the net loss rate ``P(lose) - P(gain)`` at confidence ``1 - delta``.

    With ``d = P(lose) + P(gain)`` and ``q = P(lose) / d``, the net loss is ``d (2q - 1)``. Given the number of
    discordant images, the lost count is binomial in ``q`` (McNemar's exact test), so Clopper–Pearson bounds ``q``
    from above; a second Clopper–Pearson bound brackets ``d``; each at ``delta / 2``. When ``2 q_up - 1`` is
    negative (gains outweigh losses with confidence) the product is bounded with the lower bound on ``d``.
    """
    discordant = lost + gained
    sign = 2.0 * (cp_upper(lost, discordant, delta / 2) if discordant else 1.0) - 1.0
    d = cp_upper(discordant, n, delta / 2) if sign >= 0 else cp_lower(discordant, n, delta / 2)
    return d * sign


def loss_bound(criterion: str, lost: int, gained: int, flipped: int, n: int, delta: float | None) -> float:
    """The criterion's bound (``delta`` given) or point estimate (``delta`` None), as a rate in [−1, 1]."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    if n <= 0:
        return 1.0
    if delta is None:
        return {"net": (lost - gained) / n, "lost": lost / n, "flips": flipped / n}[criterion]
    if criterion == "net":
        return net_upper(lost, gained, n, delta)
    return cp_upper(lost if criterion == "lost" else flipped, n, delta)


def images_needed(target: float, delta: float, criterion: str = "lost") -> int | None:
    """The fewest images with no event at all whose bound reaches ``target`` (a rate): below this, no read that
    changes any answer can be certified (``net`` spends ``delta / 2`` on the discordant rate). None: never
    (target 0)."""
    if target <= 0:
        return None
    if criterion == "net":
        delta = delta / 2
    return math.ceil(math.log(delta) / math.log1p(-target))


def assumption_p(own: tuple[int, int], judged: tuple[int, int]) -> float:
    """One-sided Fisher exact p-value that the deployed backbone's pool (flips, images) flips more often than the
    judged pools': small means a bound on the pooled images understates the deployed backbone's loss."""
    (f, n), (g, m) = own, judged
    if not n or not m:
        return 1.0
    return float(fisher_exact([[f, n - f], [g, m - g]], alternative="greater").pvalue)

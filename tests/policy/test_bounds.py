"""Confidence bounds on what a shorter read loses: they cover the truth, and they need the images they say."""

import numpy as np
import pytest

from dynres.policy.bounds import cp_lower, cp_upper, images_needed, loss_bound, net_upper


def test_clopper_pearson_brackets_the_rate_and_tightens_with_more_images():
    assert cp_lower(0, 100, 0.05) == 0.0 and cp_upper(100, 100, 0.05) == 1.0
    assert cp_lower(10, 100, 0.05) < 0.10 < cp_upper(10, 100, 0.05)
    assert cp_upper(0, 10_000, 0.05) < cp_upper(0, 1_000, 0.05) < cp_upper(0, 100, 0.05)
    assert cp_upper(0, 3000, 0.05) == pytest.approx(1 - 0.05 ** (1 / 3000))  # the zero-event closed form


def test_zero_events_certify_the_target_from_exactly_the_images_needed():
    n = images_needed(0.0005, 0.05)  # 0.05 points at 95%
    assert 5_900 < n < 6_100
    assert cp_upper(0, n, 0.05) <= 0.0005 < cp_upper(0, n - 1, 0.05)
    m = images_needed(0.0005, 0.05, "net")  # net spends half of delta on the discordant rate
    assert m > n and net_upper(0, 0, m, 0.05) <= 0.0005 < net_upper(0, 0, m - 1, 0.05)
    assert images_needed(0.0, 0.05) is None


@pytest.mark.parametrize("p_lose, p_gain", [(0.02, 0.02), (0.01, 0.03), (0.03, 0.005), (0.0, 0.0)])
def test_the_net_bound_covers_the_true_net_loss_at_least_one_minus_delta_of_the_time(p_lose, p_gain):
    rng = np.random.default_rng(0)
    n, delta, trials, covered = 800, 0.1, 400, 0
    for _ in range(trials):
        u = rng.random(n)
        lost, gained = int((u < p_lose).sum()), int(((u >= p_lose) & (u < p_lose + p_gain)).sum())
        covered += net_upper(lost, gained, n, delta) >= p_lose - p_gain
    assert covered / trials >= 1 - delta - 0.03  # Monte Carlo slack


def test_gains_can_certify_a_read_that_loses_some_answers_but_equal_gains_cannot():
    assert net_upper(80, 130, 2700, 0.05) < 0  # wins clearly more than it loses
    assert net_upper(50, 50, 2700, 0.05) > 0.0005  # a wash is not a certificate of 0.05 points


def test_loss_bound_dispatches_by_criterion_and_point_estimates_without_delta():
    assert loss_bound("flips", 1, 0, 5, 100, None) == 0.05
    assert loss_bound("lost", 1, 0, 5, 100, None) == 0.01 and loss_bound("net", 3, 1, 5, 100, None) == 0.02
    assert loss_bound("flips", 1, 0, 5, 100, 0.05) > loss_bound("lost", 1, 0, 5, 100, 0.05)
    with pytest.raises(ValueError, match="criterion"):
        loss_bound("median", 0, 0, 0, 10, 0.05)

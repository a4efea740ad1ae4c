"""Interval estimates (soupkit.experiments.stats) on cases computed by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from soupkit.experiments import stats
from soupkit.experiments.stats import (VERDICTS, Interval, bootstrap_accuracy, format_interval, paired_difference,
                                       seed_interval, verdict, wilson_interval)


def test_interval_scaling_and_half_width():
    interval = Interval(0.85, 0.80, 0.90)
    assert interval.level == 0.95
    assert interval.scaled(100) == pytest.approx(Interval(85.0, 80.0, 90.0, 0.95))
    assert interval.half_width == pytest.approx(0.05)


def test_bootstrap_of_a_constant_vector_has_no_width():
    assert bootstrap_accuracy(np.ones(50, dtype=bool)) == (1.0, 1.0, 1.0, 0.95)
    assert bootstrap_accuracy([0] * 20) == (0.0, 0.0, 0.0, 0.95)


def test_bootstrap_is_seeded_and_near_the_normal_approximation():
    correct = np.array([True] * 800 + [False] * 200)
    interval = bootstrap_accuracy(correct)
    assert interval.estimate == 0.8
    assert bootstrap_accuracy(correct) == interval  # seed 0: the same numbers every call
    assert interval.low < 0.8 < interval.high
    # binomial standard error sqrt(.8 * .2 / 1000) = 0.012649; 1.96 of it = 0.02479
    assert interval.half_width == pytest.approx(1.959964 * math.sqrt(0.8 * 0.2 / 1000), rel=0.1)
    narrower = bootstrap_accuracy(correct, level=0.5)
    assert interval.low < narrower.low < narrower.high < interval.high


def test_bootstrap_rejects_empty_or_matrix_input():
    with pytest.raises(ValueError, match="non-empty 1-D"):
        bootstrap_accuracy([])
    with pytest.raises(ValueError, match="non-empty 1-D"):
        bootstrap_accuracy(np.ones((2, 2)))


def test_paired_difference_of_identical_runs_is_exactly_zero():
    correct = np.random.default_rng(0).random(300) < 0.7
    assert paired_difference(correct, correct) == (0.0, 0.0, 0.0, 0.95)


def test_paired_difference_counts_only_disagreements():
    # A right and B wrong on exactly 10 of 100 images, the same elsewhere: A - B = +0.10 on every resample
    # of the 10 images' share; the difference is never negative
    a = np.ones(100, dtype=bool)
    b = a.copy()
    b[:10] = False
    diff = paired_difference(a, b)
    assert diff.estimate == pytest.approx(0.10)
    assert 0.0 < diff.low < 0.10 < diff.high
    assert paired_difference(b, a).estimate == pytest.approx(-0.10)
    with pytest.raises(ValueError, match="same test images"):
        paired_difference(a, a[:50])


def test_seed_interval_is_students_t():
    # mean 2, sample sd 1, t(0.975, 2 df) = 4.302653: 2 +- 4.302653 / sqrt(3)
    interval = seed_interval([1.0, 2.0, 3.0])
    half = 4.302653 * 1.0 / math.sqrt(3)
    assert interval.estimate == pytest.approx(2.0)
    assert interval.low == pytest.approx(2.0 - half, abs=1e-6)
    assert interval.high == pytest.approx(2.0 + half, abs=1e-6)
    # two seeds: mean 0.5, sd sqrt(0.02) = 0.141421, t(0.975, 1) = 12.706205: half = 12.706205 * 0.1
    two = seed_interval([0.4, 0.6])
    assert two.half_width == pytest.approx(12.706205 * 0.1, abs=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        seed_interval([0.5])


def test_verdict_signs():
    assert verdict(Interval(0.02, 0.01, 0.03)) == VERDICTS[0] == "reproduces"
    assert verdict(Interval(-0.02, -0.03, -0.01)) == "contradicted"
    assert verdict(Interval(0.0, -0.01, 0.01)) == "cannot tell at this scale"
    assert verdict(Interval(0.01, 0.0, 0.02)) == "cannot tell at this scale"  # touching 0 is not excluding it
    assert verdict(Interval(-0.02, -0.03, -0.01), expected=-1) == "reproduces"  # claimed: A is worse
    assert verdict(Interval(0.02, 0.01, 0.03), expected=-1) == "contradicted"
    with pytest.raises(ValueError):
        verdict(Interval(0, 0, 0), expected=0)


def test_wilson_known_values():
    z = 1.959963985
    # 50 of 100: centre 0.5, half-width z / (1 + z²/100) * sqrt(0.0025 + z²/40000) = 0.096168
    half = z / (1 + z * z / 100) * math.sqrt(0.25 / 100 + z * z / 40000)
    interval = wilson_interval(0.5, 100)
    assert interval.estimate == 0.5
    assert interval.low == pytest.approx(0.5 - half, abs=1e-9) and interval.low == pytest.approx(0.403832, abs=1e-6)
    assert interval.high == pytest.approx(0.596168, abs=1e-6)
    # 0 of 10: lower bound 0, upper bound (z²/n) / (1 + z²/n) = 0.384146 / 1.384146 = 0.277533
    zero = wilson_interval(0.0, 10)
    assert zero.low == 0.0 and zero.high == pytest.approx(0.277533, abs=1e-6)
    full = wilson_interval(1.0, 10)  # symmetric: 1 - 0.277533
    assert full.high == pytest.approx(1.0) and full.low == pytest.approx(1 - 0.277533, abs=1e-6)
    # 8 of 10, a textbook case: [0.4902, 0.9433]
    eight = wilson_interval(0.8, 10)
    assert (eight.low, eight.high) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    # more images: narrower, still containing the estimate
    assert wilson_interval(0.8, 10_000).half_width < eight.half_width
    assert wilson_interval(0.8, 10_000).low < 0.8 < wilson_interval(0.8, 10_000).high
    with pytest.raises(ValueError):
        wilson_interval(0.5, 0)
    with pytest.raises(ValueError):
        wilson_interval(1.5, 10)


def test_format_interval():
    assert format_interval(Interval(85.349, 83.8, 86.9)) == "85.35 [83.80, 86.90]"
    assert format_interval(Interval(0.45, -0.3, 1.2), signed=True) == "+0.45 [-0.30, +1.20]"
    assert format_interval(Interval(1, 0, 2), digits=0) == "1 [0, 2]"


def test_seeds_needed_hand_cases() -> None:
    from soupkit.experiments.stats import seeds_needed

    # S = 3: t(2) = 4.302653, 4.302653 * 1 / sqrt(3) = 2.484 -> half-width 2.5 needs 3 seeds, 2.4 needs 4
    assert seeds_needed(1.0, 2.5) == 3
    assert seeds_needed(1.0, 2.4) == 4  # t(3) = 3.182446 / 2 = 1.591
    assert seeds_needed(0.0, 0.1) == 2
    assert seeds_needed(10.0, 0.01, max_seeds=50) is None


def test_mean_over_sets_hand_cases() -> None:
    # two constant sets: the average of their accuracies, 0.5, with no width (every resample is the same)
    iv = stats.mean_over_sets([np.ones(10), np.zeros(30)])
    assert (iv.estimate, iv.low, iv.high) == (0.5, 0.5, 0.5)
    # unweighted by size: 1 of 4 right and 3 of 3 right average to (0.25 + 1) / 2
    assert stats.mean_over_sets([[1, 0, 0, 0], [1, 1, 1]]).estimate == 0.625
    # one set is the plain bootstrap (same seed, same resamples)
    x = np.array([1, 0, 1, 1, 0, 1, 1, 1], dtype=bool)
    assert stats.mean_over_sets([x], seed=3) == stats.bootstrap_accuracy(x, seed=3)
    # averaging two independent sets narrows the interval of one of them
    rng = np.random.default_rng(0)
    a, b = rng.random(400) < 0.7, rng.random(400) < 0.7
    assert stats.mean_over_sets([a, b]).half_width < stats.bootstrap_accuracy(a).half_width
    with pytest.raises(ValueError):
        stats.mean_over_sets([])
    with pytest.raises(ValueError):
        stats.mean_over_sets([np.ones(3), np.ones((2, 2))])

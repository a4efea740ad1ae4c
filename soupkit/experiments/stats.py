"""Interval estimates for accuracies and paired differences, and the verdicts drawn from them.

Two sources of uncertainty, kept apart:

* **test images** (one run): the percentile bootstrap over the N test images of the per-image correctness,
  resampling the same images for both methods of a comparison (a *paired* bootstrap), so the interval of a
  difference reflects only the images on which the two methods disagree;
* **test images, counts only** (an accuracy and the number of test images, no per-image predictions, e.g. the
  zoo's fine-tunes): the Wilson score interval of a binomial proportion;
* **seeds** (S runs of the whole pipeline: zoo search, split, block draw): Student's t interval of the mean
  over seeds.

Every function takes plain arrays and returns an :class:`Interval` in the unit of its input (fractions in,
fractions out; multiply by 100 for points).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np

__all__ = ["Interval", "bootstrap_accuracy", "paired_difference", "mean_over_sets", "seed_interval", "seeds_needed",
           "wilson_interval", "verdict", "VERDICTS", "NO_VERDICT", "format_interval"]

VERDICTS = ("reproduces", "contradicted", "cannot tell at this scale")
# a claim measured once (memory, time): no spread to test against, so no verdict rather than "cannot tell"
NO_VERDICT = "no verdict (one measurement)"


class Interval(NamedTuple):
    """A point estimate with the bounds of its ``level`` (two-sided) interval."""

    estimate: float
    low: float
    high: float
    level: float = 0.95

    def scaled(self, factor: float) -> "Interval":
        """The same interval in another unit (e.g. ``factor=100``: fractions to points)."""
        return Interval(self.estimate * factor, self.low * factor, self.high * factor, self.level)

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def _as_correct(correct: Sequence[bool] | np.ndarray, name: str = "correct") -> np.ndarray:
    arr = np.asarray(correct, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array of per-image correctness, got shape {arr.shape}")
    return arr


def _bootstrap_means(values: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Means of ``n_boot`` resamples (with replacement) of ``values [N]``: ``[n_boot]``."""
    rng = np.random.default_rng(seed)
    n = values.size
    out = np.empty(n_boot)
    step = max(1, 2_000_000 // n)  # resample in chunks: bounded memory for large test sets
    for start in range(0, n_boot, step):
        idx = rng.integers(0, n, size=(min(step, n_boot - start), n))
        out[start:start + idx.shape[0]] = values[idx].mean(axis=1)
    return out


def _percentile(estimate: float, boots: np.ndarray, level: float) -> Interval:
    alpha = (1 - level) / 2
    low, high = np.quantile(boots, [alpha, 1 - alpha])
    return Interval(float(estimate), float(low), float(high), level)


def bootstrap_accuracy(correct: Sequence[bool] | np.ndarray, level: float = 0.95, n_boot: int = 2000,
                       seed: int = 0) -> Interval:
    """Accuracy of one run with its percentile-bootstrap interval over test images.

    Args:
        correct: ``[N]`` per-image correctness (bool or 0/1) in test-set order.
    Returns:
        fractions, e.g. ``Interval(0.85, 0.834, 0.866)``.
    """
    values = _as_correct(correct)
    return _percentile(values.mean(), _bootstrap_means(values, n_boot, seed), level)


def paired_difference(correct_a: Sequence[bool] | np.ndarray, correct_b: Sequence[bool] | np.ndarray,
                      level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> Interval:
    """Accuracy of A minus accuracy of B on the same test images, with a paired-bootstrap interval.

    Args:
        correct_a, correct_b: ``[N]`` per-image correctness of the two methods, same images in the same order.
    Returns:
        fractions; positive = A better.
    """
    a, b = _as_correct(correct_a, "correct_a"), _as_correct(correct_b, "correct_b")
    if a.shape != b.shape:
        raise ValueError(f"paired comparison needs the same test images: {a.size} vs {b.size} predictions")
    diff = a - b
    return _percentile(diff.mean(), _bootstrap_means(diff, n_boot, seed), level)


def mean_over_sets(values: Sequence[Sequence[float] | np.ndarray], level: float = 0.95, n_boot: int = 2000,
                   seed: int = 0) -> Interval:
    """Unweighted mean over test sets of each set's mean (e.g. the average accuracy over distribution shifts, as
    model-soups reports it), with a stratified percentile-bootstrap interval: each set's images are resampled on
    their own (set j with seed ``seed + j``) and the resampled set means averaged.

    Args:
        values: one ``[N_j]`` array per test set: per-image correctness (an accuracy) or per-image differences of
            correctness of two methods on the same images (a paired difference); sets may differ in size.
    Returns:
        fractions; one set gives :func:`bootstrap_accuracy`'s interval (:func:`paired_difference`'s for
        differences).
    """
    arrays = [np.asarray(v, dtype=np.float64) for v in values]
    if not arrays or any(a.ndim != 1 or a.size == 0 for a in arrays):
        raise ValueError("mean_over_sets needs at least one set, each a non-empty 1-D array")
    estimate = float(np.mean([a.mean() for a in arrays]))
    boots = np.mean([_bootstrap_means(a, n_boot, seed + j) for j, a in enumerate(arrays)], axis=0)
    return _percentile(estimate, boots, level)


def seed_interval(values: Sequence[float] | np.ndarray, level: float = 0.95) -> Interval:
    """Mean over S seeds with Student's t interval (S - 1 degrees of freedom).

    Args:
        values: ``[S]`` one number per seed (an accuracy, or a paired difference of two methods).
    Raises:
        ValueError: fewer than two seeds (no spread to estimate).
    """
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size < 2:
        raise ValueError(f"a seed interval needs at least 2 values, got {arr.size}")
    from scipy.stats import t  # noqa: PLC0415

    mean = float(arr.mean())
    half = float(t.ppf(0.5 + level / 2, arr.size - 1) * arr.std(ddof=1) / math.sqrt(arr.size))
    return Interval(mean, mean - half, mean + half, level)


def wilson_interval(accuracy: float, n: int, level: float = 0.95) -> Interval:
    """Wilson score interval of an accuracy measured on ``n`` test images, for results that only kept the
    accuracy and the count (no per-image predictions to bootstrap).

    With p the accuracy and z the normal quantile of ``level``: centre ``(p + z²/2n) / (1 + z²/n)``, half-width
    ``z / (1 + z²/n) · sqrt(p(1 − p)/n + z²/4n²)``; unlike the normal approximation it stays inside [0, 1] and
    has a non-zero width at p = 0 or 1.

    Args:
        accuracy: fraction in [0, 1] (``correct / n``).
        n: number of test images (> 0).
    Returns:
        fractions; ``estimate`` is ``accuracy`` itself (the interval is not centred on it).
    """
    p, n = float(accuracy), int(n)
    if n <= 0:
        raise ValueError(f"a binomial interval needs at least one image, got n={n}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"accuracy must be a fraction in [0, 1], got {accuracy}")
    from scipy.stats import norm  # noqa: PLC0415

    z = float(norm.ppf(0.5 + level / 2))
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half), level)


def seeds_needed(sd: float, half_width: float, level: float = 0.95, max_seeds: int = 1000) -> int | None:
    """The smallest number of seeds S whose t interval of a mean, ``t(S - 1) * sd / sqrt(S)``, is no wider
    than ``half_width`` for a per-seed spread ``sd`` (same unit); None if more than ``max_seeds``."""
    from scipy.stats import t  # noqa: PLC0415

    for n in range(2, max_seeds + 1):
        if t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n) <= half_width:
            return n
    return None


def verdict(interval: Interval, expected: int = 1) -> str:
    """What an interval says of a claimed effect of sign ``expected`` (+1: "A is better", -1: "A is worse").

    ``"reproduces"`` when the interval excludes 0 on the claimed side, ``"contradicted"`` when it excludes 0 on
    the other side, ``"cannot tell at this scale"`` when it contains 0.
    """
    if expected not in (1, -1):
        raise ValueError(f"expected is +1 or -1, got {expected}")
    low, high = expected * interval.low, expected * interval.high
    low, high = min(low, high), max(low, high)
    if low > 0:
        return VERDICTS[0]
    if high < 0:
        return VERDICTS[1]
    return VERDICTS[2]


def format_interval(interval: Interval, digits: int = 2, signed: bool = False) -> str:
    """``"85.35 [83.80, 86.90]"`` (``signed``: ``"+0.45 [-0.30, +1.20]"``)."""
    f = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
    return f"{f.format(interval.estimate)} [{f.format(interval.low)}, {f.format(interval.high)}]"

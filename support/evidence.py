"""Is a difference real? The statistics behind `evaluate.py --compare` (two checkpoints on the same images) and
`level4.py --ablate` (paired runs over seeds), each tested against a hand-computed answer or a library
(tests/test_evidence.py). No scipy: McNemar's exact test and Student's t are written out in a few lines."""
import functools
import math
import statistics

import torch

def mcnemar_exact(b, c):
    """McNemar's test (1947), exact binomial form: of the b + c images exactly one checkpoint gets right, were the two
    equally good each would be A's with probability 1/2: b ~ Binomial(b + c, 1/2). Two-sided p = 2 P(X <= min(b, c)),
    at most 1."""
    n = b + c
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n  # exact integers: no overflow for any n
    return min(1.0, 2 * tail)

def paired_bootstrap(statistic, n, resamples=2000, seed=0, chunk=200):
    """95 % percentile interval (Efron and Tibshirani 1993, ch. 13) of `statistic`, a function of R x n image indices
    returning R values, over `resamples` draws of n images with replacement; both checkpoints see the same draw."""
    generator = torch.Generator().manual_seed(seed)
    values = [statistic(torch.randint(n, (min(chunk, resamples - start), n), generator=generator))
              for start in range(0, resamples, chunk)]  # in chunks: 2,000 x 10,000 indices at once is 160 MB
    low, high = torch.quantile(torch.cat(values).double(), torch.tensor([0.025, 0.975], dtype=torch.float64))
    return float(low), float(high)

def resampled_ece(confidence, correct, indices, n_bins=15):
    """ECE of each row of R x N image indices at once; as expected_calibration_error, since |bin| / N * |accuracy -
    confidence| = |sum over the bin of (correct - confidence)| / N."""
    bins = (confidence * n_bins).ceil().long().clamp(1, n_bins) - 1
    cells = (bins[indices] + n_bins * torch.arange(len(indices))[:, None]).flatten()  # (resample, bin) as one index
    gaps = torch.bincount(cells, (correct.double() - confidence)[indices].flatten(), minlength=len(indices) * n_bins)
    return gaps.view(len(indices), n_bins).abs().sum(1) / indices.shape[1]

def _measure(name, scored, indices):
    """top-1, ECE or NLL of one checkpoint's per-image figures, for each row of R x n image indices."""
    if name == "acc1":
        return scored["correct"].double()[indices].mean(1)
    if name == "ece":
        return resampled_ece(scored["confidence"], scored["correct"], indices)
    return scored["nll"][indices].mean(1)

def _difference(name, a, b, indices):
    return _measure(name, a, indices) - _measure(name, b, indices)

def compare_figures(a, b, resamples=2000, seed=0):
    """A against B (per_image dicts of the same images): top-1, ECE and NLL of each, the difference A - B with its
    paired-bootstrap 95 % CI, and McNemar's b (A right, B wrong), c (the reverse) and p."""
    everyone, figures = torch.arange(len(a["correct"]))[None], {}  # one "resample": every image once
    for name in ("acc1", "ece", "nll"):
        difference = functools.partial(_difference, name, a, b)  # R x n indices -> R differences A - B
        figures[name] = {"a": float(_measure(name, a, everyone)), "b": float(_measure(name, b, everyone)),
                         "difference": float(difference(everyone)),
                         "ci95": paired_bootstrap(difference, len(a["correct"]), resamples, seed)}
    only_a, only_b = int((a["correct"] & ~b["correct"]).sum()), int((b["correct"] & ~a["correct"]).sum())
    return {**figures, "mcnemar": {"b": only_a, "c": only_b, "p": mcnemar_exact(only_a, only_b)}}

def t_two_sided(t, df):
    """P(|T| <= t) for Student's t with integer df >= 1: the finite series in theta = atan(t / sqrt(df)) of Abramowitz
    and Stegun (1964), 26.7.3 (odd df: 2/pi (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ... + cos^(df - 3))))
    and 26.7.4 (even df: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... + cos^(df - 2)))."""
    theta = math.atan(t / math.sqrt(df))
    cos2, term, total = math.cos(theta) ** 2, 1.0, 1.0
    for k in range(2 + df % 2, df - 1, 2):  # k = 2, 4, ... (even df) or 3, 5, ... (odd df)
        term *= cos2 * (k - 1) / k
        total += term
    if df % 2 == 0:
        return math.sin(theta) * total
    series = 0.0 if df == 1 else math.sin(theta) * math.cos(theta) * total
    return 2 / math.pi * (theta + series)

def t_critical(df, confidence=0.95):
    """The t with P(|T| <= t) = confidence (12.706 for df 1, 2.042 for df 30 at 95 %): bisection on t_two_sided."""
    low, high = 0.0, 1e6
    for _ in range(100):
        middle = (low + high) / 2
        if t_two_sided(middle, df) < confidence:
            low = middle
        else:
            high = middle
    return (low + high) / 2

def mean_sd(values):
    """(mean, sample standard deviation with n - 1); the SD is None for a single value."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)

def paired_difference(baseline_values, row_values, higher_is_better=True):
    """Mean of the paired differences row - baseline (one pair per seed), its 95 % CI from Student's t with n - 1
    degrees of freedom, and a verdict: "helps" / "hurts" when the interval excludes 0, else "within noise"; "no
    change" when every difference is 0, "no spread" when all are equal but not 0 (an interval of width 0, which says
    more about a small test set than about the technique)."""
    if len(baseline_values) != len(row_values) or not row_values:
        raise ValueError(f"one row value per baseline value: got {len(row_values)} and {len(baseline_values)}")
    mean, sd = mean_sd([r - b for b, r in zip(baseline_values, row_values)])
    n = len(row_values)
    if sd is None:
        return {"mean": mean, "low": None, "high": None, "n": 1, "verdict": "n = 1, no interval"}
    if sd < 1e-12:  # equal differences, up to the rounding of the accuracies' subtraction
        verdict = "no spread"
        if abs(mean) < 1e-12:
            verdict = "no change"
        return {"mean": mean, "low": mean, "high": mean, "n": n, "verdict": verdict}
    half_width = t_critical(n - 1) * sd / math.sqrt(n)
    low, high = mean - half_width, mean + half_width
    verdict = "within noise"
    if low > 0 or high < 0:  # the interval excludes 0
        verdict = "helps" if (mean > 0) == higher_is_better else "hurts"
    return {"mean": mean, "low": low, "high": high, "n": n, "verdict": verdict}

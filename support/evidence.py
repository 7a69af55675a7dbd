"""Is a difference real? The statistics behind `evaluate.py --compare` (two checkpoints on the same images) and
`level4.py --ablate` (paired runs over seeds), each tested against a hand-computed answer or a library
(tests/test_evidence.py). No scipy: McNemar's exact test, Student's t and Holm's adjustment are written out in a few
lines."""
import functools
import math
import statistics

import torch

def mcnemar_exact(b, c):
    """McNemar's test (McNemar 1947), exact binomial form: of the b + c images exactly one checkpoint gets right, were
    the two equally good each would be A's with probability 1/2: b ~ Binomial(b + c, 1/2). Two-sided p = 2 P(X <=
    min(b, c)), at most 1. In floats, not exact integers (369 s at b + c = 39,500): the largest term P(X = k) from
    math.lgamma, the smaller ones by the recurrence P(X = j - 1) = P(X = j) j / (n - j + 1), until they no longer
    count; within 1e-12 relative of the exact sum (tests/test_evidence.py)."""
    n, k = b + c, min(b, c)
    log_peak = math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) - n * math.log(2)  # log P(X = k)
    ratio, tail = 1.0, 1.0  # P(X = j) / P(X = k), and their sum over j from k down
    for j in range(k, 0, -1):
        ratio *= j / (n - j + 1)
        tail += ratio
        if ratio < 1e-17 * tail:  # the rest (decreasing faster and faster) is below double precision
            break
    return min(1.0, 2 * math.exp(log_peak) * tail)

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

def paired_t_p(differences):
    """Two-sided p of Student's one-sample t-test (Student 1908) of the paired differences against 0, n - 1 degrees of
    freedom: t = mean / (sd / sqrt(n)), p = 1 - P(|T| <= |t|). None for a single difference (no spread to test
    against). Zero spread (sd < 1e-12, equal differences) is the limit t -> infinity: p 0.0 when the mean is not 0,
    and 1.0 when every difference is 0 (no change, nothing to reject); `verdict` names both apart ("no spread",
    "no change") when given the SD."""
    mean, sd = mean_sd(differences)
    if sd is None:
        return None
    if sd < 1e-12:  # equal differences, as in paired_difference
        if abs(mean) < 1e-12:
            return 1.0
        return 0.0
    t = mean / (sd / math.sqrt(len(differences)))
    return 1 - t_two_sided(abs(t), len(differences) - 1)

def paired_difference(baseline_values, row_values, higher_is_better=True):
    """Mean of the paired differences row - baseline (one pair per seed), its 95 % CI from Student's t with n - 1
    degrees of freedom, their SD and t-test p (paired_t_p, for `holm` over the rows), and a verdict on the ROW (not
    the technique: see `verdict`): "helps" / "hurts" when the interval excludes 0, else "within noise"; "no change"
    when every difference is 0, "no spread" when all are equal but not 0 (an interval of width 0, which says more
    about a small test set than about the technique)."""
    if len(baseline_values) != len(row_values) or not row_values:
        raise ValueError(f"one row value per baseline value: got {len(row_values)} and {len(baseline_values)}")
    differences = [r - b for b, r in zip(baseline_values, row_values)]
    mean, sd = mean_sd(differences)
    n, p = len(row_values), paired_t_p(differences)
    if sd is None:
        return {"mean": mean, "low": None, "high": None, "n": 1, "sd": None, "p": None, "verdict": "n = 1, no interval"}
    if sd < 1e-12:  # equal differences, up to the rounding of the accuracies' subtraction
        verdict = "no spread"
        if abs(mean) < 1e-12:
            verdict = "no change"
        return {"mean": mean, "low": mean, "high": mean, "n": n, "sd": sd, "p": p, "verdict": verdict}
    half_width = t_critical(n - 1) * sd / math.sqrt(n)
    low, high = mean - half_width, mean + half_width
    verdict = "within noise"
    if low > 0 or high < 0:  # the interval excludes 0
        verdict = "helps" if (mean > 0) == higher_is_better else "hurts"
    return {"mean": mean, "low": low, "high": high, "n": n, "sd": sd, "p": p, "verdict": verdict}

def holm(p_values):
    """Holm's step-down adjustment (Holm 1979, "A simple sequentially rejective multiple test procedure"): with the m
    p-values sorted ascending, p_(1) <= ... <= p_(m), the adjusted p_(i) = max over j <= i of min(1, (m - j + 1)
    p_(j)); rejecting where it is below alpha holds the family-wise error rate at alpha. Returned in the input order;
    None entries (rows without a p) are left out of m and come back None."""
    order = sorted((i for i, p in enumerate(p_values) if p is not None), key=lambda i: p_values[i])
    adjusted, running = [None] * len(p_values), 0.0
    for rank, i in enumerate(order):  # rank 0 is the smallest p, multiplied by m
        running = max(running, min(1.0, (len(order) - rank) * p_values[i]))  # max: never below a smaller p's
        adjusted[i] = running
    return adjusted

def verdict(mean, adjusted_p, alpha=0.05, higher_is_better=True, row_removes_technique=True, sd=None):
    """A verdict on the TECHNIQUE from one row's mean paired difference (row - baseline) and its Holm-adjusted p:
    "helps" / "hurts" when adjusted_p < alpha, else "within noise". With row_removes_technique (the row switches
    the technique off, as in the ablation), a row worse than the baseline means the technique helps; without it
    (the row switches it on), a better row does. higher_is_better says which way the figure is better (False for ECE).
    As paired_difference: "n = 1, no interval" when adjusted_p is None; given the differences' SD, "no change" /
    "no spread" when it is 0 (every difference 0 / equal ones; their p of 0.0 or 1.0 is a limit, not evidence)."""
    if adjusted_p is None:
        return "n = 1, no interval"
    if sd is not None and sd < 1e-12:
        if abs(mean) < 1e-12:
            return "no change"
        return "no spread"
    if adjusted_p >= alpha:
        return "within noise"
    row_is_better = (mean > 0) == higher_is_better
    if row_is_better == row_removes_technique:  # switching it off helped, or switching it on hurt
        return "hurts"
    return "helps"

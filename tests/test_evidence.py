"""Issue 18: exact NLL, `evaluate.py --compare` (McNemar, paired bootstrap), the paired-seed statistics the ablation
uses (Student's t without scipy), and `level4.py --summary` over seeds."""
import json
import math

import pytest
import torch

import common
import evaluate
import level4
from support import evidence, study
from conftest import assert_one_line_error, final_line, run_cli, summary_table
import time
from fractions import Fraction

pytestmark = pytest.mark.usefixtures("one_thread")


def is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- 5. Exact NLL ------------------------------------------------------------------------------------------------

def exact_nll(row, label):
    """-log softmax(row)[label] in float64 by hand: log(sum exp(row - max)) + max - row[label]."""
    top = max(row)
    return math.log(sum(math.exp(v - top) for v in row)) + top - row[label]


def test_nll_of_a_probability_that_underflows_in_float32_is_exact():
    """p(true class) = e^-200 is 0 in float32; the clamp made it 27.6, the logits give 200 (+ log of the rest)."""
    rows = [[0.0, 200.0, 190.0] + [0.0] * 7, [5.0, 1.0, 0.0] + [0.0] * 7]
    logits, labels = torch.tensor([rows]), torch.tensor([0, 0])  # float32, one view
    assert common.average_views(logits)[0, 0] == 0  # the underflow this test is about
    expected = (exact_nll(rows[0], 0) + exact_nll(rows[1], 0)) / 2
    assert expected > 100
    result, _ = evaluate.from_logits(logits, labels)
    assert result["nll"] == pytest.approx(expected, rel=1e-12)
    at_t, _ = evaluate.from_logits(logits, labels, temperature=2.0)
    halved = [[v / 2 for v in row] for row in rows]
    assert at_t["nll"] == pytest.approx((exact_nll(halved[0], 0) + exact_nll(halved[1], 0)) / 2, rel=1e-12)


@pytest.mark.parametrize("average", ["softmax", "logit"])
def test_tta_nll_is_that_of_the_averaged_probabilities_in_float64(average):
    """Softmax TTA: -log(mean over views of the softmax), logit TTA: -log softmax(mean logits), both at T = 1.7."""
    generator = torch.Generator().manual_seed(0)
    view_logits, labels = 8 * torch.randn(3, 20, 10, generator=generator), torch.randint(10, (20,), generator=generator)
    logits = view_logits.double() / 1.7
    if average == "softmax":
        probs = logits.softmax(-1).mean(0)
    else:
        probs = logits.mean(0).softmax(-1)
    expected = float(-probs[torch.arange(20), labels].log().mean())
    result, _ = evaluate.from_logits(view_logits, labels, 1.7, average)
    assert result["nll"] == pytest.approx(expected, rel=1e-12)


# ---- 4. --compare: McNemar and the paired bootstrap --------------------------------------------------------------

def test_mcnemar_exact_hand_computed_and_against_the_binomial():
    """b = 10, c = 2: 2 P(X <= 2 | 12, 1/2) = 2 (1 + 12 + 66) / 4096 = 0.0386; b = c and no discordant pair: 1."""
    assert evidence.mcnemar_exact(10, 2) == pytest.approx(2 * 79 / 4096, rel=1e-12)
    assert round(evidence.mcnemar_exact(10, 2), 4) == 0.0386
    assert evidence.mcnemar_exact(2, 10) == evidence.mcnemar_exact(10, 2)
    assert evidence.mcnemar_exact(7, 7) == 1.0 and evidence.mcnemar_exact(0, 0) == 1.0
    binomial = torch.distributions.Binomial(42, torch.tensor(0.5, dtype=torch.float64))
    expected = 2 * float(binomial.log_prob(torch.arange(13.0, dtype=torch.float64)).exp().sum())  # P(X <= 12)
    assert evidence.mcnemar_exact(30, 12) == pytest.approx(expected, rel=1e-9)



def exact_mcnemar(b, c):
    """The textbook sum in exact integers and fractions: min(1, 2 sum_{k <= min(b, c)} C(b + c, k) / 2^(b + c))."""
    n = b + c
    return float(min(Fraction(1), Fraction(2 * sum(math.comb(n, k) for k in range(min(b, c) + 1)), 2**n)))


def test_mcnemar_exact_equals_the_exact_integer_sum_for_n_up_to_200():
    """Every split b + c = n for every 7th n up to 200 (about 3,000 pairs, p from 1 down to 2^-195)."""
    pairs = [(b, n - b) for n in range(0, 201, 7) for b in range(n + 1)]
    for b, c in pairs:
        assert evidence.mcnemar_exact(b, c) == pytest.approx(exact_mcnemar(b, c), rel=1e-12, abs=0), (b, c)


@pytest.mark.parametrize("b, c", [(1000, 950), (1100, 900), (1200, 800), (1500, 500), (2000, 0)])
def test_mcnemar_exact_at_n_2000_against_fractions(b, c):
    """n = 2,000, where the integer sum is still quick: p from 0.27 down to 2^-1999 (1.1e-602 underflows to 0.0)."""
    assert evidence.mcnemar_exact(b, c) == pytest.approx(exact_mcnemar(b, c), rel=1e-11, abs=1e-300)


def test_mcnemar_exact_on_a_50000_image_test_set_is_fast_and_near_the_normal_approximation():
    """b = 20,000, c = 19,500 (369 s as an integer sum): under 0.1 s, and within 0.1 % of the normal approximation
    with continuity correction, 2 (1 - Phi((|b - c| - 1) / sqrt(b + c))) = erfc(499 / sqrt(2 x 39,500)) = 0.01205."""
    start = time.perf_counter()
    p = evidence.mcnemar_exact(20000, 19500)
    assert time.perf_counter() - start < 0.1
    assert p == pytest.approx(math.erfc(499 / math.sqrt(2 * 39500)), rel=1e-3)
    assert round(p, 4) == 0.0120
    assert evidence.mcnemar_exact(19500, 20000) == p
    assert evidence.mcnemar_exact(25000, 25000) == 1.0 and evidence.mcnemar_exact(0, 50000) == 0.0  # 2^-49999

def test_paired_bootstrap_ci_covers_a_known_difference_in_most_of_200_repetitions():
    """Pairs with P(A right) - P(B right) = 0.82 - 0.76 = 0.06: the 95 % interval holds 0.06 in 88-99 % of 200 samples
    of 300 images, and its width is about 2 x 1.96 standard errors of the paired difference."""
    generator = torch.Generator().manual_seed(0)
    joint = torch.tensor([0.70, 0.12, 0.06, 0.12])  # both right, A only, B only, neither
    a_right, b_right = torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([1.0, 0.0, 1.0, 0.0])
    covered, widths = 0, []
    for repetition in range(200):
        kind = torch.multinomial(joint, 300, replacement=True, generator=generator)
        difference = a_right[kind] - b_right[kind]
        low, high = evidence.paired_bootstrap(lambda idx: difference[idx].mean(1), 300, 400, seed=repetition)
        covered += low <= 0.06 <= high
        widths.append(high - low)
    standard_error = math.sqrt((0.12 + 0.06 - 0.06**2) / 300)
    assert 0.88 * 200 <= covered <= 0.99 * 200, covered
    assert sum(widths) / 200 == pytest.approx(2 * 1.96 * standard_error, rel=0.1)


def test_resampled_ece_is_expected_calibration_error_per_row():
    generator = torch.Generator().manual_seed(1)
    probs = torch.randn(50, 10, generator=generator).mul(3).softmax(-1)
    labels = torch.randint(10, (50,), generator=generator)
    confidence, preds = probs.double().max(-1)
    indices = torch.stack([torch.arange(50), torch.randint(50, (50,), generator=generator)])
    eces = evidence.resampled_ece(confidence, preds == labels, indices)
    for row, ece in zip(indices, eces):
        assert float(ece) == pytest.approx(evaluate.expected_calibration_error(probs[row], labels[row]), rel=1e-12)


def test_compare_figures_by_hand():
    """Four images: A right on 0, 1, 2; B right on 2, 3: b = 2, c = 1, top-1 0.75 and 0.5."""
    labels = torch.tensor([0, 1, 2, 3])
    logits_a = 5 * torch.eye(10)[[0, 1, 2, 0]][None]
    logits_b = 5 * torch.eye(10)[[1, 0, 2, 3]][None]
    a, b = evaluate.per_image(logits_a, labels), evaluate.per_image(logits_b, labels)
    figures = evidence.compare_figures(a, b, resamples=200)
    assert figures["mcnemar"] == {"b": 2, "c": 1, "p": 1.0}
    assert figures["acc1"]["a"] == 0.75 and figures["acc1"]["b"] == 0.5 and figures["acc1"]["difference"] == 0.25
    for name in ("ece", "nll"):
        low, high = figures[name]["ci95"]
        assert low <= figures[name]["difference"] <= high
    assert figures["nll"]["a"] == pytest.approx(float(a["nll"].mean()))
    assert figures["ece"]["b"] == pytest.approx(evaluate.expected_calibration_error(logits_b[0].softmax(-1), labels))


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """Two random-init 10-class ResNet-50s saved as checkpoints of seeds 0 and 1."""
    folder = tmp_path_factory.mktemp("compare")
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = common.build_model("none")
        torch.save({"model": model.state_dict(), "args": {"seed": seed, "img_size": 32}}, folder / f"seed{seed}.pth")
    return folder / "seed0.pth", folder / "seed1.pth"


def test_cli_compare_writes_the_json_png_and_table(tmp_path, two_checkpoints, synthetic_root):
    path_a, path_b = two_checkpoints
    result = run_cli(evaluate, path_a, "--compare", path_b, "--data-dir", synthetic_root, "--device", "cpu",
                     "--subset", 64, "--img-size", 32, "--resamples", 300, "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "compare_seed0_vs_seed1_test.json").read_text())
    assert is_png(tmp_path / "compare_seed0_vs_seed1_test.png")
    assert saved["num_images"] == 64 and saved["resamples"] == 300 and saved["a"] == str(path_a)
    mcnemar, acc1 = saved["mcnemar"], saved["acc1"]
    assert mcnemar["b"] - mcnemar["c"] == round(64 * acc1["difference"])  # b - c = right(A) - right(B)
    assert mcnemar["p"] == pytest.approx(evidence.mcnemar_exact(mcnemar["b"], mcnemar["c"]))
    for name in ("acc1", "ece", "nll"):
        assert saved[name]["difference"] == pytest.approx(saved[name]["a"] - saved[name]["b"])
        assert saved[name]["ci95"][0] <= saved[name]["ci95"][1]
    assert "McNemar: b = " in result.stdout
    assert final_line(result.stdout)["acc1_a"] == pytest.approx(acc1["a"], abs=1e-4)


def test_cli_compare_on_val_needs_the_same_seed_and_no_images(tmp_path, two_checkpoints, synthetic_root):
    path_a, path_b = two_checkpoints
    result = run_cli(evaluate, path_a, "--compare", path_b, "--data-dir", synthetic_root, "--split", "val",
                     "--out", tmp_path / "out")
    assert_one_line_error(result, "--split val", "--split test")
    assert not (tmp_path / "out").exists()
    with_images = run_cli(evaluate, path_a, "--compare", path_b, "--images", path_a, "--out", tmp_path / "out")
    assert_one_line_error(with_images, "--compare", "--images")


# ---- 2 and 7. Paired seeds: Student's t, the verdict, the plot ---------------------------------------------------

@pytest.mark.parametrize("df, quantile", [(1, 12.706), (2, 4.303), (4, 2.776), (5, 2.571), (30, 2.042)])
def test_t_critical_matches_the_tables(df, quantile):
    assert evidence.t_critical(df) == pytest.approx(quantile, abs=5e-4)


@pytest.mark.parametrize("df", [1, 3, 6])
def test_t_two_sided_against_the_integrated_density(df):
    """P(|T| <= 1.5) against the trapezoid rule over torch's Student-t density."""
    t = torch.linspace(-1.5, 1.5, 20001, dtype=torch.float64)
    density = torch.distributions.StudentT(torch.tensor(float(df), dtype=torch.float64)).log_prob(t).exp()
    assert evidence.t_two_sided(1.5, df) == pytest.approx(float(torch.trapezoid(density, t)), rel=1e-7)


def test_paired_difference_by_hand():
    """Differences 0.03, 0.025, 0.02: mean 0.025, SD 0.005, half-width 4.303 x 0.005 / sqrt(3) = 0.01242."""
    result = evidence.paired_difference([0.90, 0.91, 0.92], [0.93, 0.935, 0.94])
    assert result["mean"] == pytest.approx(0.025) and result["n"] == 3 and result["verdict"] == "helps"
    assert result["low"] == pytest.approx(0.025 - 0.012421, abs=2e-6)
    assert result["high"] == pytest.approx(0.025 + 0.012421, abs=2e-6)
    # t = 0.025 / (0.005 / sqrt(3)) = sqrt(75), df 2: p = 1 - sqrt(75 / 77) = 0.0131; SD 0.005
    assert result["p"] == pytest.approx(1 - math.sqrt(75 / 77), rel=1e-6) and result["sd"] == pytest.approx(0.005)
    assert evidence.paired_difference([0.93, 0.935, 0.94], [0.90, 0.91, 0.92])["verdict"] == "hurts"
    assert evidence.paired_difference([0.90, 0.91, 0.92], [0.91, 0.90, 0.925])["verdict"] == "within noise"
    lower_ece = evidence.paired_difference([0.05, 0.06, 0.055], [0.03, 0.035, 0.032], higher_is_better=False)
    assert lower_ece["verdict"] == "helps"
    single = evidence.paired_difference([0.90], [0.95])
    assert single["verdict"] == "n = 1, no interval" and single["low"] is None and single["mean"] == pytest.approx(0.05)
    assert single["p"] is None
    assert evidence.paired_difference([0.53, 0.54], [0.55, 0.56])["verdict"] == "no spread"  # +0.02 twice
    assert evidence.paired_difference([0.53, 0.54], [0.53, 0.54])["verdict"] == "no change"
    with pytest.raises(ValueError):
        evidence.paired_difference([0.9, 0.9], [0.9])



def test_paired_t_p_by_hand():
    """df = 2: P(|T| <= t) = t / sqrt(2 + t^2); differences 1, 2, 3: t = 2 / (1 / sqrt(3)) = sqrt(12), p = 1 -
    sqrt(12 / 14). df = 1 (Cauchy): P(|T| <= t) = 2 atan(t) / pi; differences 1, 3: t = 2 / (sqrt(2) / sqrt(2)) = 2."""
    assert evidence.paired_t_p([1.0, 2.0, 3.0]) == pytest.approx(1 - math.sqrt(12 / 14), rel=1e-12)  # 0.0742
    assert evidence.paired_t_p([-1.0, -2.0, -3.0]) == evidence.paired_t_p([1.0, 2.0, 3.0])  # two-sided
    assert evidence.paired_t_p([1.0, 3.0]) == pytest.approx(1 - 2 * math.atan(2) / math.pi, rel=1e-12)  # 0.2952
    assert evidence.paired_t_p([-1.0, 0.0, 1.0]) == pytest.approx(1.0)  # mean 0: t = 0
    assert evidence.paired_t_p([0.5]) is None  # n = 1
    assert evidence.paired_t_p([0.02, 0.02]) == 0.0 and evidence.paired_t_p([0.0, 0.0, 0.0]) == 1.0  # no spread


@pytest.mark.parametrize("df, quantile", [(1, 12.706), (2, 4.303), (4, 2.776), (5, 2.571), (30, 2.042)])
def test_paired_t_p_is_005_at_the_table_quantiles(df, quantile):
    """n = df + 1 equally spaced differences around 0, shifted by t x their standard error, t the two-sided 5 % point
    of the t table (the quantiles of test_t_critical_matches_the_tables)."""
    spread = [k - df / 2 for k in range(df + 1)]  # mean 0
    standard_error = math.sqrt(sum(x * x for x in spread) / df / (df + 1))  # sd / sqrt(n)
    differences = [x + quantile * standard_error for x in spread]
    assert evidence.paired_t_p(differences) == pytest.approx(0.05, abs=2e-4)


def test_holm_by_hand():
    """p = 0.001, 0.04, 0.03, 0.5, 0.2 (m = 5), ascending 0.001, 0.03, 0.04, 0.2, 0.5 times 5, 4, 3, 2, 1: 0.005, 0.12,
    0.12, 0.4, 0.5, already non-decreasing; back in the input order 0.005, 0.12, 0.12, 0.5, 0.4. Only the big effect
    stays below 0.05, where unadjusted 0.04 and 0.03 were too."""
    assert evidence.holm([0.001, 0.04, 0.03, 0.5, 0.2]) == pytest.approx([0.005, 0.12, 0.12, 0.5, 0.4])


def test_holm_is_monotone_caps_at_1_and_skips_none():
    """0.01 .. 0.05 times 5 .. 1: 0.05, 0.08, 0.09, 0.08, 0.05; the running maximum makes it 0.05, 0.08, 0.09, 0.09,
    0.09 (statsmodels' multipletests(method="holm") gives the same: np.maximum.accumulate of the sorted products).
    0.6, 0.7 times 2, 1: 1.2 -> 1, 0.7 -> max(1, 0.7) = 1. None is left out of m: 0.01, 0.04 times 2, 1 -> 0.02,
    0.04."""
    assert evidence.holm([0.05, 0.04, 0.03, 0.02, 0.01]) == pytest.approx([0.09, 0.09, 0.09, 0.08, 0.05])
    assert evidence.holm([0.6, 0.7]) == [1.0, 1.0]
    assert evidence.holm([None, 0.04, None, 0.01]) == pytest.approx([None, 0.04, None, 0.02])
    assert evidence.holm([None]) == [None] and evidence.holm([]) == []
    assert evidence.holm([0.3]) == [0.3]  # m = 1: unadjusted


def test_holm_with_ties():
    """0.01, 0.01, 0.04 (m = 3): 0.03, then max(0.03, 2 x 0.01) = 0.03 whichever 0.01 comes first, then 0.04; the two
    0.01s get the same adjusted p. 0.02 four times: 0.08, max(0.08, 0.06), ...: 0.08 for all."""
    assert evidence.holm([0.04, 0.01, 0.01]) == pytest.approx([0.04, 0.03, 0.03])
    assert evidence.holm([0.02] * 4) == pytest.approx([0.08] * 4)


@pytest.mark.parametrize("mean, higher_is_better, row_removes_technique, expected", [
    (-0.01, True, True, "helps"),   # accuracy falls when the technique is switched off: it helps
    (+0.01, True, True, "hurts"),   # accuracy rises without it: it hurts
    (+0.01, False, True, "helps"),  # ECE rises (worse) without it: it helps
    (-0.01, False, True, "hurts"),  # ECE falls without it
    (+0.01, True, False, "helps"),  # the row switches the technique ON and accuracy rises
    (-0.01, True, False, "hurts"),
])
def test_verdict_describes_the_technique(mean, higher_is_better, row_removes_technique, expected):
    assert evidence.verdict(mean, 0.01, higher_is_better=higher_is_better,
                            row_removes_technique=row_removes_technique) == expected
    assert evidence.verdict(mean, 0.2, higher_is_better=higher_is_better,
                            row_removes_technique=row_removes_technique) == "within noise"


def test_verdict_at_alpha_and_in_the_degenerate_cases():
    assert evidence.verdict(-0.01, 0.05) == "within noise"  # rejects only below alpha
    assert evidence.verdict(-0.01, 0.05, alpha=0.1) == "helps"
    assert evidence.verdict(0.05, None) == "n = 1, no interval"
    assert evidence.verdict(0.02, 0.0, sd=0.0) == "no spread"
    assert evidence.verdict(0.0, 1.0, sd=0.0) == "no change"
    assert evidence.verdict(-0.02, 0.0, sd=0.004) == "helps"


def test_paired_difference_holm_verdict_over_ablation_rows():
    """Three rows switching a technique off, baseline 0.90, 0.91, 0.92. no_a: -0.03, -0.025, -0.02 (p = 1 - sqrt(75 /
    77) = 0.0131, by hand above); no_b: +0.01, -0.01, +0.005 (t = 0.277, p 0.81); no_c: one seed, p None. Holm over the
    two: 0.0131 x 2 = 0.0262 < 0.05, so a helps; b: max(0.0262, 0.81) = 0.81, within noise; c has no interval."""
    baseline = [0.90, 0.91, 0.92]
    rows = {"no_a": [0.87, 0.885, 0.90], "no_b": [0.91, 0.90, 0.925], "no_c": [0.89]}
    results = {name: evidence.paired_difference(baseline[:len(values)], values) for name, values in rows.items()}
    adjusted = evidence.holm([result["p"] for result in results.values()])
    assert adjusted[0] == pytest.approx(2 * (1 - math.sqrt(75 / 77)), rel=1e-6) and adjusted[2] is None
    verdicts = [evidence.verdict(result["mean"], p, sd=result["sd"]) for result, p in zip(results.values(), adjusted)]
    assert verdicts == ["helps", "within noise", "n = 1, no interval"]

def test_mean_sd():
    assert evidence.mean_sd([1.0, 2.0, 4.0]) == pytest.approx((7 / 3, math.sqrt((16 + 1 + 25) / 9 / 2)))
    assert evidence.mean_sd([0.5]) == (0.5, None)


def test_plot_differences_writes_a_png(tmp_path):
    study.plot_differences(["no_mixup", "no_tta", "img_size_128"], [-0.004, -0.002, 0.001], [-0.007, None, -0.002],
                              [-0.001, None, 0.004], [False, True, False], tmp_path / "ablation.png", "ablation")
    assert is_png(tmp_path / "ablation.png")


# ---- 6. --summary over seeds -------------------------------------------------------------------------------------

def test_summary_pools_seed_folders_as_mean_sd_and_n(tmp_path):
    """level2 in results/ and results/seed1, seed2: mean ± SD and n = 3; level1 alone: n = 1, no ±; a folder not
    named seed* (another experiment) is not pooled."""
    def write(path, acc1):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"test": {"acc1": acc1, "ece": 0.05}, "history": [{}, {}], "seconds": 10.0,
                                    "device": "cpu", "commit": "abc"}))
    for folder, acc1 in (("", 0.90), ("seed1", 0.92), ("seed2", 0.97)):
        write(tmp_path / folder / "level2.json", acc1)
    write(tmp_path / "level1.json", 0.8)
    write(tmp_path / "example-quick" / "level1.json", 0.1)
    out = run_cli(level4, "--summary", "--results-dir", tmp_path)
    assert out.returncode == 0, out.stderr
    header, rows = summary_table(tmp_path)
    acc1, n = header.index("test acc1"), header.index("n")
    assert rows["level2"][acc1] == f"0.9300 ± {math.sqrt((0.03**2 + 0.01**2 + 0.04**2) / 2):.4f}"
    assert rows["level2"][n] == "3"
    assert rows["level1"][acc1] == "0.8000" and rows["level1"][n] == "1"


# ---- Issue 25: the ablation's verdicts, decided on validation, Holm over the rows -------------------------------

def fake_runs(name, val_differences, test_difference=0.0):
    """One row's runs over three seeds: validation top-1 0.80, 0.81, 0.82 plus the row's differences; the test top-1
    moved by `test_difference` on every seed (the report, which must not decide)."""
    return [{"name": name, "seed": seed, "change": {}, "evaluation_only": False, "args": {}, "val_acc1": 0.80 + 0.01 * seed
             + difference, "acc1": 0.70, "tta_acc1": 0.71 + 0.01 * seed + test_difference, "ece": 0.05,
             "model_source": "swa", "swa_snapshots": 5, "device": "cpu", "commit": "test"}
            for seed, difference in enumerate(val_differences)]


def test_ablation_verdicts_are_holm_adjusted_on_validation_by_hand(tmp_path):
    """Five rows switching a technique off. Paired t, df 2, p = 1 - t / sqrt(2 + t^2):
    no_randaugment -0.05, -0.051, -0.049: t = 0.05 / (0.001 / sqrt 3) = 86.6, p = 1.33e-4;
    no_mixup_cutmix -0.03, -0.025, -0.02: p = 1 - sqrt(75 / 77) = 0.0131 (its 95 % interval excludes 0);
    no_random_erasing +0.004, -0.002, +0.001: t = 0.001 / (0.003 / sqrt 3) = 0.577, p = 1 - 0.577 / sqrt(2.333) = 0.622;
    no_label_smoothing +0.01, -0.01, +0.005: p = 0.807; no_ema -0.005, +0.005, 0: t = 0, p = 1.
    Holm, m = 5: 5 x 1.33e-4 = 6.7e-4, 4 x 0.0131 = 0.0525, then 3 x 0.622 and up: 1. So RandAugment helps, and
    MixUp/CutMix, which alone (unadjusted 0.0131) would have helped, is within noise. no_randaugment's test top-1 rose
    (+0.01 on every seed): the decision is validation's, and the verdict is about RandAugment, not about its row."""
    args = level4.get_args_parser().parse_args(["--results-dir", str(tmp_path)])
    level4.validate_args(args)
    table = {"baseline": fake_runs("baseline", [0, 0, 0]),
             "no_randaugment": fake_runs("no_randaugment", [-0.05, -0.051, -0.049], test_difference=0.01),
             "no_mixup_cutmix": fake_runs("no_mixup_cutmix", [-0.03, -0.025, -0.02]),
             "no_random_erasing": fake_runs("no_random_erasing", [0.004, -0.002, 0.001]),
             "no_label_smoothing": fake_runs("no_label_smoothing", [0.01, -0.01, 0.005]),
             "no_ema": fake_runs("no_ema", [-0.005, 0.005, 0.0])}
    study.write_ablation_table(table, tmp_path / "ablation.json", args)
    t = 0.05 / (0.001 / math.sqrt(3))
    p_big = 1 - t / math.sqrt(2 + t * t)
    saved = json.loads((tmp_path / "ablation.json").read_text())
    rows = saved["rows"]
    assert rows["no_randaugment"]["delta_val_acc1"]["p"] == pytest.approx(p_big, rel=1e-6)
    expected = {"no_randaugment": 5 * p_big, "no_mixup_cutmix": 4 * (1 - math.sqrt(75 / 77)),
                "no_random_erasing": 1.0, "no_label_smoothing": 1.0, "no_ema": 1.0}
    for name, p_holm in expected.items():
        assert rows[name]["delta_val_acc1"]["p_holm"] == pytest.approx(p_holm, rel=1e-6), name
    assert rows["no_random_erasing"]["delta_val_acc1"]["p"] == pytest.approx(1 - 1 / math.sqrt(3) / math.sqrt(7 / 3))
    assert rows["no_mixup_cutmix"]["delta_val_acc1"]["high"] < 0  # the unadjusted interval says "helps"
    assert {name: row["verdict"] for name, row in rows.items()} == {
        "no_randaugment": "helps", "no_mixup_cutmix": "within noise", "no_random_erasing": "within noise",
        "no_label_smoothing": "within noise", "no_ema": "within noise"}
    assert rows["no_randaugment"]["delta_tta_acc1"]["mean"] == pytest.approx(0.01)  # the report went the other way
    assert saved["decision"] == {"figure": "val_acc1", "test": "paired t", "correction": "holm", "alpha": 0.05,
                                 "rows_tested": 5}
    markdown = (tmp_path / "ablation.md").read_text()
    assert "Holm over the 5 rows tested" in markdown and "decision on validation" in markdown
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")] for line in markdown.splitlines()
             if line.startswith("| no_")}
    assert "RandAugment helps" in cells["no_randaugment"] and "the EMA: within noise" in cells["no_ema"]
    assert "MixUp/CutMix: within noise" in cells["no_mixup_cutmix"]

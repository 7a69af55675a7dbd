"""evaluate.py: the metrics against hand-computed answers and a plain loop, strict JSON, the Markdown table, report(),
and the command line (in this process, through conftest.run_cli) on a few dozen synthetic images at 32 px."""
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import evaluate
from support import records
from conftest import assert_one_line_error, final_line, run_cli, write_synthetic_cifar

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")


# ---- Metrics against a hand-computed example ----------------------------------------------------------------------
# Six images, three classes (seven more, never present and never predicted, padded with zero probability).
# Confidence = top probability; 15 bins (lo, hi] of width 1/15 = 0.0667.
#   probs                label pred correct conf  bin (index: interval)
#   [0.95, 0.03, 0.02]   0     0    yes     0.95  14: (0.933, 1.000]
#   [0.01, 0.97, 0.02]   2     1    no      0.97  14: (0.933, 1.000]
#   [0.25, 0.20, 0.55]   2     2    yes     0.55   8: (0.533, 0.600]
#   [0.58, 0.22, 0.20]   0     0    yes     0.58   8: (0.533, 0.600]
#   [0.28, 0.42, 0.30]   0     1    no      0.42   6: (0.400, 0.467]
#   [0.10, 0.75, 0.15]   1     1    yes     0.75  11: (0.733, 0.800]
# ECE = 2/6 |1/2 - 0.96| + 2/6 |1 - 0.565| + 1/6 |0 - 0.42| + 1/6 |1 - 0.75| = 0.153333 + 0.145 + 0.07 + 0.041667 = 0.41
# NLL = -(ln 0.95 + ln 0.02 + ln 0.55 + ln 0.58 + ln 0.28 + ln 0.75) / 6 = 6.666528 / 6 = 1.111088
# Brier per image = sum_k (p_k - y_k)^2: 0.0038, 1.9014, 0.305, 0.2648, 0.7848, 0.095; mean = 3.3548 / 6
# Confusion matrix (row = true, column = predicted): [[2, 1, 0], [0, 1, 0], [0, 1, 1]]
# recall = per-class accuracy = [2/3, 1, 1/2]; precision (diagonal / column sums [2, 3, 1]) = [1, 1/3, 1]
# F1 = 2PR / (P + R) = [0.8, 0.5, 2/3]
PROBS3 = torch.tensor([[0.95, 0.03, 0.02], [0.01, 0.97, 0.02], [0.25, 0.20, 0.55],
                       [0.58, 0.22, 0.20], [0.28, 0.42, 0.30], [0.10, 0.75, 0.15]], dtype=torch.float64)
PROBS = torch.cat([PROBS3, torch.zeros(6, 7, dtype=torch.float64)], 1)
TRUE = torch.tensor([0, 2, 2, 0, 0, 1])
HAND_CM = [[2, 1, 0], [0, 1, 0], [0, 1, 1]]


def test_confusion_matrix_and_precision_recall_f1_by_hand():
    """The table above: confusion matrix, precision, recall, F1; the 7 absent classes get 0, not nan."""
    preds = PROBS.argmax(-1)
    assert preds.tolist() == [0, 1, 2, 0, 1, 1]
    assert evaluate.confusion_matrix(preds, TRUE, 3).tolist() == HAND_CM
    cm = evaluate.confusion_matrix(preds, TRUE)
    assert cm.shape == (10, 10) and cm[:3, :3].tolist() == HAND_CM and int(cm.sum()) == 6
    precision, recall, f1 = evaluate.precision_recall_f1(cm)
    np.testing.assert_allclose(precision.numpy(), [1, 1 / 3, 1] + [0] * 7, rtol=1e-12)
    np.testing.assert_allclose(recall.numpy(), [2 / 3, 1, 1 / 2] + [0] * 7, rtol=1e-12)
    np.testing.assert_allclose(f1.numpy(), [0.8, 0.5, 2 / 3] + [0] * 7, rtol=1e-12)


def test_precision_recall_f1_of_a_class_predicted_but_never_present_is_zero():
    """Class 3 predicted once but never true: precision 0 (its column all wrong), recall and F1 0, no nan."""
    cm = evaluate.confusion_matrix(torch.tensor([3, 1, 2, 0, 1, 1]), TRUE, 4)
    precision, recall, f1 = evaluate.precision_recall_f1(cm)
    assert not any(torch.isnan(t).any() for t in (precision, recall, f1))
    assert precision[3] == 0 and recall[3] == 0 and f1[3] == 0
    assert recall[0] == pytest.approx(1 / 3) and precision[0] == pytest.approx(1.0)  # true 0 -> 3, 0, 1


def test_expected_calibration_error_hand_computed():
    """ECE 0.41 for the table; bins are (lo, hi]; sure and right 0, sure and wrong 1."""
    assert evaluate.expected_calibration_error(PROBS, TRUE) == pytest.approx(0.41, abs=1e-9)
    # 10 bins: a confidence of exactly 0.5 shares (0.4, 0.5] with 0.45. Right at 0.5, wrong at 0.45:
    # ECE = |1/2 - 0.475| = 0.025 (with [lo, hi) bins: 1/2 * 0.5 + 1/2 * 0.45 = 0.475).
    edge = torch.tensor([[0.5, 0.25, 0.25], [0.45, 0.30, 0.25]], dtype=torch.float64)
    assert evaluate.expected_calibration_error(edge, torch.tensor([0, 1]), 10) == pytest.approx(0.025, abs=1e-9)
    sure = torch.eye(10, dtype=torch.float64)[TRUE]
    assert evaluate.expected_calibration_error(sure, TRUE) == pytest.approx(0.0, abs=1e-12)
    assert evaluate.expected_calibration_error(sure, (TRUE + 1) % 3) == pytest.approx(1.0, abs=1e-12)


def test_calibration_bins_hand_computed():
    """Per bin (count, accuracy, mean confidence): only bins 6, 8, 11 and 14 are occupied (the table above)."""
    count, accuracy, confidence = evaluate.calibration_bins(PROBS, TRUE)
    assert len(count) == len(accuracy) == len(confidence) == 15
    assert {b: int(c) for b, c in enumerate(count) if c} == {6: 1, 8: 2, 11: 1, 14: 2}
    expected = {6: (0.0, 0.42), 8: (1.0, 0.565), 11: (1.0, 0.75), 14: (0.5, 0.96)}
    for b in range(15):
        acc, conf = expected.get(b, (0.0, 0.0))
        assert float(accuracy[b]) == pytest.approx(acc, abs=1e-12) and float(confidence[b]) == pytest.approx(conf)


def test_metrics_hold_the_calibration_bins_by_hand():
    """Issue 26 point 6: the JSON holds each bin's images, accuracy and mean confidence (null where empty), the
    table above; their count-weighted gaps sum to the ECE."""
    bins = evaluate.metrics(PROBS, TRUE)["calibration_bins"]
    assert bins["count"] == [0, 0, 0, 0, 0, 0, 1, 0, 2, 0, 0, 1, 0, 0, 2]
    assert bins["upper_edges"][0] == pytest.approx(1 / 15) and bins["upper_edges"][-1] == 1.0
    assert bins["accuracy"][:6] == [None] * 6 and bins["confidence"][7] is None
    assert bins["accuracy"][8] == 1.0 and bins["accuracy"][14] == 0.5 and bins["confidence"][14] == pytest.approx(0.96)
    gaps = [n / 6 * abs(a - c) for n, a, c in zip(bins["count"], bins["accuracy"], bins["confidence"]) if n]
    assert sum(gaps) == pytest.approx(0.41)


def test_reliability_diagram_shows_the_ece_and_the_images_per_bin(tmp_path, monkeypatch):
    """Issue 26 point 6: each panel's title gives its ECE, and an axis under the bars the images in each of the 15
    bins, as a bar and a number (0 for an empty bin)."""
    drawn = []
    monkeypatch.setattr(evaluate, "_save", lambda fig, path, title: drawn.append(fig))
    evaluate.plot_reliability({"T = 1": (PROBS, TRUE), "sure": (F.one_hot(TRUE, 10).double(), TRUE)},
                              tmp_path / "r.png", "test")
    bars, counts = drawn[0].axes[0], drawn[0].axes[2]  # row by row: the two panels' bars, then their counts
    assert bars.get_title() == "T = 1: ECE 0.4100" and drawn[0].axes[1].get_title() == "sure: ECE 0.0000"
    assert [text.get_text() for text in counts.texts] == ["0"] * 6 + ["1", "0", "2", "0", "0", "1", "0", "0", "2"]
    assert [patch.get_height() for patch in counts.patches] == [0, 0, 0, 0, 0, 0, 1, 0, 2, 0, 0, 1, 0, 0, 2]
    assert [text.get_text() for text in drawn[0].axes[3].texts][-1] == "6"  # all six images sure: the last bin


def test_expected_calibration_error_matches_a_plain_loop():
    """A second ECE, plain Python over 15 bins (lo, hi], on 500 random predictions."""
    torch.manual_seed(0)
    probs = (torch.randn(500, 10) * 3).softmax(-1)
    labels = torch.randint(10, (500,))
    rows = [(float(p.max()), int(p.argmax()) == int(y)) for p, y in zip(probs, labels)]
    expected = 0.0
    for b in range(15):
        members = [(c, ok) for c, ok in rows if b / 15 < c <= (b + 1) / 15]
        if members:
            accuracy = sum(ok for _, ok in members) / len(members)
            confidence = sum(c for c, _ in members) / len(members)
            expected += len(members) / len(rows) * abs(accuracy - confidence)
    assert expected > 0.01  # a non-trivial example
    assert evaluate.expected_calibration_error(probs, labels) == pytest.approx(expected, abs=1e-9)


def test_metrics_by_hand():
    """metrics(): top-1, ECE, NLL, Brier, per-class figures and the matrix of the table above."""
    result = evaluate.metrics(PROBS, TRUE)
    nll = -sum(math.log(p) for p in (0.95, 0.02, 0.55, 0.58, 0.28, 0.75)) / 6
    assert nll == pytest.approx(1.111088, abs=1e-6)  # the comment above, to its 6 decimals
    assert result["acc1"] == pytest.approx(4 / 6) and result["ece"] == pytest.approx(0.41)
    assert result["nll"] == pytest.approx(nll, rel=1e-9) and result["brier"] == pytest.approx(3.3548 / 6, rel=1e-9)
    assert result["num_images"] == 6 and [row[:3] for row in result["confusion_matrix"][:3]] == HAND_CM
    names = common.CLASSES
    assert list(result["per_class_acc"]) == list(names)
    assert [result["per_class_acc"][n] for n in names[:3]] == pytest.approx([2 / 3, 1, 1 / 2])
    assert result["recall"] == result["per_class_acc"]
    assert [result["precision"][n] for n in names[:3]] == pytest.approx([1, 1 / 3, 1])
    assert [result["f1"][n] for n in names[:3]] == pytest.approx([0.8, 0.5, 2 / 3])
    assert all(result[key][n] == 0 for key in ("precision", "recall", "f1") for n in names[3:])
    # A zero probability on the true class stays finite (clamped at 1e-12); Brier = 1 + 1 = 2.
    zero = evaluate.metrics(torch.eye(10)[[0]], torch.tensor([1]))
    assert zero["nll"] == pytest.approx(-math.log(1e-12), rel=1e-9) and zero["brier"] == pytest.approx(2.0)


def test_metrics_with_explicit_preds_uses_them_for_top1_and_for_the_confidence_of_ece():
    """preds (all right here) give top-1, the per-class figures and ECE's confidence (the probability given to the
    predicted class: with TTA at T != 1 it need not be the largest); NLL and Brier stay those of the probabilities."""
    result = evaluate.metrics(PROBS, TRUE, preds=TRUE.clone())
    plain = evaluate.metrics(PROBS, TRUE)
    assert result["acc1"] == 1.0 and plain["acc1"] == pytest.approx(4 / 6)
    assert [row[:3] for row in result["confusion_matrix"][:3]] == [[3, 0, 0], [0, 1, 0], [0, 0, 2]]
    assert [result["per_class_acc"][n] for n in common.CLASSES[:3]] == [1.0, 1.0, 1.0]
    assert [result["precision"][n] for n in common.CLASSES[:3]] == [1.0, 1.0, 1.0]
    for key in ("nll", "brier"):
        assert result[key] == plain[key]
    assert plain["ece"] == pytest.approx(0.41)
    # Confidences of the (right) predictions 0.95, 0.02, 0.55, 0.58, 0.28, 0.75 fall in bins 14, 0, 8, 8, 4, 11:
    # ECE = (0.05 + 0.98 + 2 * 0.435 + 0.72 + 0.25) / 6.
    assert result["ece"] == pytest.approx((0.05 + 0.98 + 2 * 0.435 + 0.72 + 0.25) / 6)


def test_most_confused_by_hand():
    """The k largest off-diagonal cells as (true, predicted, count), the diagonal never, zero counts dropped."""
    cm = torch.diag(torch.full((10,), 50))
    cm[3, 5], cm[5, 3], cm[9, 1], cm[2, 0] = 7, 4, 2, 1  # cat -> dog, dog -> cat, truck -> car, bird -> plane
    assert evaluate.most_confused(cm, k=3) == [("cat", "dog", 7), ("dog", "cat", 4), ("truck", "automobile", 2)]
    assert evaluate.most_confused(cm.tolist(), k=10) == [("cat", "dog", 7), ("dog", "cat", 4),
                                                          ("truck", "automobile", 2), ("bird", "airplane", 1)]
    assert evaluate.most_confused(torch.diag(torch.full((10,), 5))) == []


def test_confident_mistakes_by_hand():
    """Indices of the wrong predictions, the most confident first; right ones never, at most k."""
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [0.45, 0.55], [0.95, 0.05]])
    labels = torch.tensor([0, 0, 1, 1, 0, 1])  # wrong: 1 (0.8), 2 (0.6), 4 (0.55), 5 (0.95)
    assert evaluate.confident_mistakes(probs, labels) == [5, 1, 2, 4]
    assert evaluate.confident_mistakes(probs, labels, k=2) == [5, 1]
    assert evaluate.confident_mistakes(probs, probs.argmax(-1)) == []


# ---- JSON and Markdown -----------------------------------------------------------------------------------------------

def refuse(constant):
    raise ValueError(f"not strict JSON: {constant}")


def strict_json(path):
    """json.loads that refuses NaN / Infinity, as strict JSON readers do."""
    return json.loads(Path(path).read_text(), parse_constant=refuse)


def test_write_json_turns_nan_and_inf_into_null(tmp_path):
    """nan / inf anywhere (nested dicts, lists, tuples, numpy floats) become null; the file is strict JSON."""
    obj = {"acc": 0.5, "nan": math.nan, "nested": {"list": [1.0, math.inf, {"deep": -math.inf, "ok": 2}]},
           "tuple": (math.nan, 3), "numpy": np.float64("nan"), "text": "x", "none": None}
    with pytest.raises(ValueError):  # what a plain json.dumps would write is refused by a strict reader
        json.loads(json.dumps(obj), parse_constant=refuse)
    records.write_json(tmp_path / "r.json", obj)
    assert strict_json(tmp_path / "r.json") == {
        "acc": 0.5, "nan": None, "nested": {"list": [1.0, None, {"deep": None, "ok": 2}]}, "tuple": [None, 3],
        "numpy": None, "text": "x", "none": None}
    assert math.isnan(obj["nan"]) and isinstance(obj["tuple"], tuple)  # the input is not modified
    assert os.listdir(tmp_path) == ["r.json"]  # no temp file left


def test_write_table_writes_markdown(tmp_path):
    """Heading, blank line, header row, separator, rows with floats to 4 decimals; the text is also returned."""
    text = records.write_table(tmp_path / "t.md", "# python x.py on cpu", ["row", "acc1", "epochs"],
                                [["baseline", 0.876543, 3], ["mixup", 0.9, 10]])
    expected = ["# python x.py on cpu", "", "| row | acc1 | epochs |", "|---|---|---|",
                "| baseline | 0.8765 | 3 |", "| mixup | 0.9000 | 10 |"]
    assert text == "\n".join(expected)
    assert (tmp_path / "t.md").read_text() == "\n".join(expected) + "\n"


# ---- report() --------------------------------------------------------------------------------------------------

def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 10))


def random_dataset(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)
    return common.CifarDataset(images, torch.randint(10, (n,), generator=generator))


@pytest.mark.parametrize("average", ["softmax", "logit"])
def test_report_is_the_metrics_of_predict(average):
    """report(): images_per_s, views, temperature, and the figures of predict() + average_views done by hand
    (prediction at T = 1, probabilities at T = 2)."""
    model, dataset, views = tiny_model(), random_dataset(30), ("identity", "flip")
    result, probs = evaluate.report(model, dataset, CPU, 32, views, temperature=2.0, average=average)
    assert result["images_per_s"] > 0 and result["views"] == list(views)
    assert result["temperature"] == 2.0 and result["tta_average"] == average and result["num_images"] == 30
    view_logits, labels = common.predict(model, dataset, CPU, 32, views)
    expected_probs = common.average_views(view_logits, 2.0, average)
    preds = common.average_views(view_logits, 1.0, average).argmax(-1)
    torch.testing.assert_close(probs, expected_probs)
    assert result["acc1"] == pytest.approx(float((preds == labels).double().mean()))
    assert result["ece"] == pytest.approx(evaluate.expected_calibration_error(expected_probs, labels))
    nll = -float(sum(math.log(float(expected_probs[i, y])) for i, y in enumerate(labels.tolist()))) / 30
    assert result["nll"] == pytest.approx(nll, rel=1e-5)
    assert result["confusion_matrix"] == evaluate.confusion_matrix(preds, labels).tolist()


def test_every_tta_set_from_one_pass_per_view_is_its_own_report():
    """Level 4's final test runs each view once (predict over common.TTA_VIEWS) and measures every TTA set from
    those logits: views_report gives what report() gives running the set's views itself."""
    model, dataset = tiny_model(), random_dataset(30)
    all_logits, labels = common.predict(model, dataset, CPU, 32, common.TTA_VIEWS)
    for views in common.TTA_SETS.values():
        alone, alone_probs = evaluate.report(model, dataset, CPU, 32, views, 1.5, "softmax")
        shared, shared_probs = evaluate.views_report(all_logits, labels, views, 1.5, "softmax")
        torch.testing.assert_close(shared_probs, alone_probs)
        assert shared["views"] == list(views) and shared["nll"] == pytest.approx(alone["nll"])
        assert shared["acc1"] == alone["acc1"] and shared["confusion_matrix"] == alone["confusion_matrix"]
    views = ["zoom", "identity", "shift_up"]  # not a prefix of TTA_VIEWS, not in its order: picked by name
    torch.testing.assert_close(evaluate.views_of(all_logits, views), common.predict(model, dataset, CPU, 32, views)[0])
    with pytest.raises(ValueError):
        evaluate.views_of(all_logits[:2], ["identity"])  # logits of two views only


# ---- Command line ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def resnet():
    """A random-init 10-class ResNet-50 (built once per module)."""
    torch.manual_seed(0)
    return common.build_model("none")


@pytest.fixture(scope="module")
def state_dict(resnet):
    return resnet.state_dict()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, state_dict):
    """A bare state_dict saved with torch.save."""
    path = tmp_path_factory.mktemp("ckpt") / "plain.pth"
    torch.save(state_dict, path)
    return path


@pytest.fixture
def fast_plots(monkeypatch):
    """plot_confusion (2 s of matplotlib per run) replaced by a stub that records its title and writes an empty file,
    for the command-line tests that check something else; test_cli_evaluates_a_state_dict draws the real one."""
    titles = []

    def stub(cm, path, title):
        titles.append(title)
        Path(path).write_bytes(b"")
    monkeypatch.setattr(evaluate, "plot_confusion", stub)
    return titles


def cli(checkpoint_path, data_root, out, *extra):
    return run_cli(evaluate, checkpoint_path, "--data-dir", data_root, "--device", "cpu", "--out", out, *extra)


def eval_name(checkpoint, tail, kind="eval"):
    """evaluate.py's output name: the checkpoint's folder and name, then the split or nothing."""
    return f"{kind}_{Path(checkpoint).resolve().parent.name}-{Path(checkpoint).stem}{tail}"


def is_png(path):
    return Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_evaluates_a_state_dict(tmp_path, checkpoint, resnet, synthetic_root):
    """A bare state_dict on 40 test images: exit 0, strict eval_*.json and *_confusion.png, a final: line, and the
    numbers of evaluate.report on the same model and images."""
    out = tmp_path / "out"
    result = cli(checkpoint, synthetic_root, out, "--subset", 40, "-b", 20, "--img-size", 32)
    assert result.returncode == 0, result.stderr
    saved = strict_json(out / eval_name(checkpoint, "_test.json"))
    assert is_png(out / eval_name(checkpoint, "_test_confusion.png"))
    assert saved["split"] == "test" and saved["img_size"] == 32 and saved["tta"] is None
    assert saved["num_images"] == 40 and saved["views"] == ["identity"] and saved["temperature"] == 1.0
    assert saved["checkpoint"] == str(checkpoint) and saved["precision"] == "fp32"
    final = final_line(result.stdout)
    assert final["images"] == 40
    assert final["acc1"] == pytest.approx(saved["acc1"], abs=1e-4)
    assert final["nll"] == pytest.approx(saved["nll"], abs=1e-4)
    test_set = common.cifar10_datasets(synthetic_root, 0, eval_subset=40)[2]
    assert [sum(row) for row in saved["confusion_matrix"]] == np.bincount(test_set.labels, minlength=10).tolist()
    expected, _ = evaluate.report(resnet, test_set, CPU, 32)
    for key in ("acc1", "ece", "nll", "brier"):
        assert saved[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
    assert saved["confusion_matrix"] == expected["confusion_matrix"]


def test_cli_batch_size_sets_the_evaluation_batches(tmp_path, checkpoint, synthetic_root, monkeypatch, fast_plots):
    """-b 10 on 30 images: the model sees three batches of 10 (-b is what to lower when memory runs out)."""
    sizes, prepare_batch = [], common.prepare_batch

    def spy(images, *args, **kwargs):
        sizes.append(len(images))
        return prepare_batch(images, *args, **kwargs)
    monkeypatch.setattr(common, "prepare_batch", spy)
    result = cli(checkpoint, synthetic_root, tmp_path, "--subset", 30, "-b", 10, "--img-size", 32)
    assert result.returncode == 0, result.stderr
    assert sizes == [10, 10, 10]


def test_cli_tta_flip_writes_its_own_files(tmp_path, checkpoint, synthetic_root, fast_plots):
    """--tta flip: two views, named in the JSON and in the file names (_tta-flip)."""
    result = cli(checkpoint, synthetic_root, tmp_path, "--subset", 20, "-b", 20, "--img-size", 32, "--tta", "flip")
    assert result.returncode == 0, result.stderr
    saved = strict_json(tmp_path / eval_name(checkpoint, "_test_tta-flip.json"))
    assert (tmp_path / eval_name(checkpoint, "_test_tta-flip_confusion.png")).is_file() and len(fast_plots) == 1
    assert saved["tta"] == "flip" and saved["views"] == ["identity", "flip"] and saved["num_images"] == 20
    assert "TTA flip" in result.stdout and final_line(result.stdout)["images"] == 20


def test_cli_split_val_uses_the_checkpoints_seed_and_img_size(tmp_path, state_dict, resnet, fast_plots):
    """A checkpoint dict with args {seed: 5, img_size: 32}: --split val measures the validation images of seed 5's
    split (the numbers of report() on them, which seed 0's split does not give), at the stored 32 px. The data has
    1,000 training images per class, so that the 500 held out per class depend on the seed."""
    synthetic_root = tmp_path / "data"
    write_synthetic_cifar(synthetic_root / "cifar-10-batches-py", per_class_per_batch=200, test_per_class=2)
    path = tmp_path / "run.pth"
    torch.save({"model": state_dict, "args": {"seed": 5, "img_size": 32}}, path)
    result = cli(path, synthetic_root, tmp_path / "out", "--split", "val", "--subset", 20, "-b", 20)
    assert result.returncode == 0, result.stderr
    saved = strict_json(tmp_path / "out" / eval_name(path, "_val.json"))
    assert saved["split"] == "val" and saved["img_size"] == 32 and saved["num_images"] == 20
    assert fast_plots == ["run.pth on val (20 images)"]
    val_set = common.cifar10_datasets(synthetic_root, 5, eval_subset=20)[1]
    expected, _ = evaluate.report(resnet, val_set, CPU, 32)
    assert saved["nll"] == pytest.approx(expected["nll"], rel=1e-5)
    assert saved["confusion_matrix"] == expected["confusion_matrix"]
    seed0_val = common.cifar10_datasets(synthetic_root, 0, eval_subset=20)[1]  # the check can tell seeds apart
    assert evaluate.report(resnet, seed0_val, CPU, 32)[0]["nll"] != pytest.approx(expected["nll"], rel=1e-5)


def test_cli_split_val_of_a_train_on_all_checkpoint_is_a_one_line_error(tmp_path, state_dict, synthetic_root):
    """A checkpoint trained on all 50,000 images has no validation split: exit 2, one line naming --split test."""
    path = tmp_path / "all.pth"
    torch.save({"model": state_dict, "args": {"seed": 0, "img_size": 32, "train_on_all": True}}, path)
    assert_one_line_error(cli(path, synthetic_root, tmp_path / "out", "--split", "val", "--subset", 20), "--split test")
    assert not (tmp_path / "out").exists()


class Custom:
    """Any class of the user's: torch.save pickles it by reference, so loading it would import and run code."""

    def __init__(self):
        self.value = 1


class RunsShell:
    """The classic malicious checkpoint: unpickling it calls os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_bad_checkpoint(path, kind, state_dict):
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "html":
        path.write_text("<!DOCTYPE html>\n<html><head><title>Google Drive - Virus scan warning</title></head>\n"
                        "<body>Google Drive can't scan this file for viruses.</body></html>\n")
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    elif kind == "custom_class":
        torch.save({"model": state_dict, "extra": Custom()}, path)
    elif kind == "os_system":
        torch.save({"model": RunsShell(path.parent / "code_ran")}, path)
    elif kind == "imagenet_head":
        torch.save({**state_dict, "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}, path)
    elif kind == "nan":
        weights = dict(state_dict)
        weights["layer1.0.conv1.weight"] = weights["layer1.0.conv1.weight"].clone()
        weights["layer1.0.conv1.weight"][0, 0, 0, 0] = math.nan
        torch.save(weights, path)


BAD_CHECKPOINTS = {"missing": ["not there"], "directory": ["a directory"], "empty": ["not a PyTorch checkpoint"],
                   "html": ["not a PyTorch checkpoint"], "random": ["not a PyTorch checkpoint"],
                   "custom_class": ["could run code"], "os_system": ["could run code"],
                   "imagenet_head": ["no 10-class head"], "nan": ["non-finite", "nan"]}


@pytest.mark.parametrize("kind", BAD_CHECKPOINTS)
def test_cli_bad_checkpoints_are_one_line_errors(tmp_path, state_dict, synthetic_root, kind):
    """Each bad checkpoint: exit 2, one `error:` line naming the file and what is wrong, no traceback, no code run;
    a file that is merely not a checkpoint is not called dangerous."""
    path = tmp_path / f"{kind}.pth"
    write_bad_checkpoint(path, kind, state_dict)
    line = assert_one_line_error(cli(path, synthetic_root, tmp_path / "out"), str(path), *BAD_CHECKPOINTS[kind])
    if kind in ("empty", "html", "random"):
        assert "run code" not in line
    assert not (tmp_path / "code_ran").exists() and not (tmp_path / "out").exists()


def test_cli_applies_the_stored_temperature_unless_told_not_to(tmp_path, state_dict, synthetic_root, fast_plots):
    """"temperature": 2.0 is applied (JSON and printed T = 2), --no-temperature gives T = 1: same top-1, other NLL."""
    path = tmp_path / "calibrated.pth"
    torch.save({"model": state_dict, "temperature": 2.0, "args": {"img_size": 32}}, path)
    applied = cli(path, synthetic_root, tmp_path / "a", "--subset", 20, "-b", 20)
    ignored = cli(path, synthetic_root, tmp_path / "b", "--subset", 20, "-b", 20, "--no-temperature")
    assert applied.returncode == ignored.returncode == 0, applied.stderr + ignored.stderr
    with_t, without_t = (strict_json(tmp_path / d / eval_name(path, "_test.json")) for d in "ab")
    assert with_t["temperature"] == 2.0 and "(T = 2)" in applied.stdout
    assert without_t["temperature"] == 1.0 and "(T = 1)" in ignored.stdout
    assert with_t["acc1"] == without_t["acc1"] and with_t["confusion_matrix"] == without_t["confusion_matrix"]
    assert with_t["nll"] != pytest.approx(without_t["nll"], rel=1e-3)


def test_cli_does_not_apply_a_temperature_at_its_search_bound(tmp_path, state_dict, synthetic_root, fast_plots):
    """Issue 13 point 1: "temperature_at_bound": True means no fit: T = 1 is used and a warning line says so."""
    path = tmp_path / "bound.pth"
    torch.save({"model": state_dict, "temperature": 100.0, "temperature_at_bound": True, "args": {"img_size": 32}},
               path)
    result = cli(path, synthetic_root, tmp_path, "--subset", 20, "-b", 20)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "not applied" in warnings[0] and "100" in warnings[0]
    assert strict_json(tmp_path / eval_name(path, "_test.json"))["temperature"] == 1.0 and "(T = 1)" in result.stdout


def test_cli_applies_the_temperature_of_the_tta_set_measured(tmp_path, state_dict, synthetic_root, fast_plots):
    """Issue 17 point 3: `temperatures` holds one T per TTA set (for the run's --tta-average): --tta SET applies that
    set's; a set without one, or another averaging than the fit's, gets T = 1 and a warning line."""
    path = tmp_path / "sets.pth"
    fits = {"none": {"temperature": 2.0, "at_bound": False}, "flip": {"temperature": 3.0, "at_bound": False}}
    torch.save({"model": state_dict, "temperatures": fits, "temperature": 2.0, "temperature_at_bound": False,
                "args": {"img_size": 32, "tta_average": "softmax"}}, path)
    cases = {"one": [], "flip": ["--tta", "flip"], "translate": ["--tta", "flip+translate"],
             "logit": ["--tta", "flip", "--tta-average", "logit"]}
    measured = {}
    for name, flags in cases.items():
        result = cli(path, synthetic_root, tmp_path / name, "--subset", 20, "-b", 20, *flags)
        assert result.returncode == 0, result.stderr
        warned = any(line.startswith("warning:") and "no temperature" in line for line in result.stdout.splitlines())
        measured[name] = (next((tmp_path / name).glob("eval_*.json")), warned)
    temperatures = {name: (strict_json(json_path)["temperature"], warned) for name, (json_path, warned) in
                    measured.items()}
    assert temperatures == {"one": (2.0, False), "flip": (3.0, False), "translate": (1.0, True), "logit": (1.0, True)}


def test_cli_bn_stats_recomputes_the_statistics_as_the_levels_do(tmp_path, synthetic_root, fast_plots):
    """Issue 17 point 4: --bn-stats train recomputes the BatchNorm statistics on the run's first BN_IMAGES training
    images through its level's training augmentation, drawn with its --seed (clean: without it), as the level does
    for its averages; the JSON names the source; checkpoint keeps the stored ones."""
    import level3
    torch.manual_seed(0)
    model = common.build_model("none", 0.1)
    train_args = level3.get_args_parser().parse_args(["--img-size", "32", "-b", "16", "--subset", "48", "--seed", "3"])
    path = tmp_path / "level3_best.pth"
    epochs = train_args.head_epochs + train_args.epochs + train_args.final_epochs  # the last: every stage trains
    torch.save({"level": "level3", "model": model.state_dict(), "args": vars(train_args), "epoch": epochs}, path)
    figures = {}
    for source in ("checkpoint", "train", "clean"):
        result = cli(path, synthetic_root, tmp_path / source, "--subset", 20, "-b", 20, "--bn-stats", source)
        assert result.returncode == 0, result.stderr
        saved = strict_json(next((tmp_path / source).glob("eval_*.json")))
        assert saved["bn_stats"] == source and f"BatchNorm statistics: {source}" in result.stdout
        figures[source] = saved["nll"]
    assert len(set(figures.values())) == 3  # each source gives other statistics, so other probabilities
    train_set, _, _ = common.cifar10_datasets(synthetic_root, 3, 48)
    expected = common.build_model("none", 0.1)
    expected.load_state_dict(model.state_dict())
    bn_set = common.bn_images(train_set, common.BN_IMAGES, level3.train_transform(train_args), 3)
    common.recompute_bn(expected, bn_set, CPU, 32, 16)
    ours, _ = evaluate.load_model(path)
    args = evaluate.get_args_parser().parse_args([str(path), "--data-dir", str(synthetic_root), "--bn-stats", "train"])
    evaluate.recompute_statistics(ours, torch.load(path, weights_only=True), args, CPU, 32)
    assert torch.equal(ours.layer2[0].bn1.running_var, expected.layer2[0].bn1.running_var)
    bare = tmp_path / "bare.pth"
    torch.save(model.state_dict(), bare)
    assert_one_line_error(cli(bare, synthetic_root, tmp_path / "bare", "--bn-stats", "clean"), "--bn-stats clean")


def buffers_by_stage(model):
    """{stage: [its BatchNorm buffers, copied]} (evaluate.bn_stage names them)."""
    stages = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            stages.setdefault(evaluate.bn_stage(name), []).extend(
                [module.running_mean.clone(), module.running_var.clone()])
    return stages


@pytest.mark.parametrize("level_name, flags, epoch, trained", [
    ("level1", ["--head-epochs", "2"], 2, []),  # the head stage: the backbone in eval mode, nothing trained
    ("level1", ["--head-epochs", "2"], 3, list(evaluate.BN_STAGES)),  # stage 2: every layer
    ("level3", ["--head-epochs", "2", "--unfreeze-every", "1"], 4, ["layer3", "layer4"]),  # 0-based epoch 3
])
def test_bn_stats_recompute_only_the_stages_that_trained_at_the_checkpoints_epoch(
        level_name, flags, epoch, trained, tmp_path, synthetic_root, fast_plots):
    """Issue 26 point 4: --bn-stats train recomputes the statistics of the stages that trained in the checkpoint's
    epoch, by its level's rule; every frozen stage's statistics stay as saved (a Level 1 head-stage checkpoint's all
    of them), and the JSON names the stages recomputed."""
    import importlib
    level = importlib.import_module(level_name)
    torch.manual_seed(0)
    model = common.build_model("none")
    train_args = level.get_args_parser().parse_args(["--img-size", "32", "-b", "16", "--subset", "48", *flags])
    path = tmp_path / f"{level_name}_best.pth"
    torch.save({"level": level_name, "model": model.state_dict(), "args": vars(train_args), "epoch": epoch}, path)
    result = cli(path, synthetic_root, tmp_path / "out", "--subset", 20, "-b", 20, "--bn-stats", "train")
    assert result.returncode == 0, result.stderr
    assert strict_json(next((tmp_path / "out").glob("eval_*.json")))["bn_stages"] == trained
    ours, checkpoint = evaluate.load_model(path)
    args = evaluate.get_args_parser().parse_args([str(path), "--data-dir", str(synthetic_root), "--bn-stats", "train"])
    assert evaluate.recompute_statistics(ours, checkpoint, args, CPU, 32) == trained
    saved, recomputed = buffers_by_stage(model), buffers_by_stage(ours)
    assert set(saved) == set(evaluate.BN_STAGES)
    for stage in evaluate.BN_STAGES:
        same = all(torch.equal(a, b) for a, b in zip(saved[stage], recomputed[stage]))
        assert same == (stage not in trained), stage


@pytest.mark.parametrize("epoch, trained", [(2, []), (4, ["layer3", "layer4"])])
def test_ablation_bn_clean_recomputes_the_trained_stages_and_names_its_candidate(epoch, trained, tmp_path,
                                                                                 synthetic_root):
    """Issue 26 point 4: the ablation's bn_clean row (study.measure_row) recomputes clean statistics only in the stages
    that trained at the baseline checkpoint's epoch (none in the head stage: then it measures the checkpoint as
    saved), and says in the table which candidate's weights it measured (model_source)."""
    import level4
    from support import study
    torch.manual_seed(0)
    model = common.build_model("none")
    args = level4.get_args_parser().parse_args(["--img-size", "32", "-b", "16", "--head-epochs", "2",
                                                 "--unfreeze-every", "1", "--tta-set", "flip"])
    fits = {name: {"temperature": 1.0, "at_bound": False} for name in common.TTA_SETS}
    path = tmp_path / "level4_best.pth"
    torch.save({"level": "level4", "model": model.state_dict(), "args": vars(args), "epoch": epoch,
                "model_source": "ema", "temperatures": fits}, path)
    datasets = common.cifar10_datasets(synthetic_root, 0, 48, 20)
    row = study.measure_row({"bn_stats": "clean"}, tmp_path, datasets, CPU, args)
    assert row["bn_stages"] == trained and row["model_source"] == "ema"
    as_saved = study.measure_row({}, tmp_path, datasets, CPU, args)  # the checkpoint's own statistics
    assert "bn_stages" not in as_saved  # only bn_clean recomputes; every row names its candidate
    if trained:
        assert row["ece"] != as_saved["ece"]  # other statistics, other probabilities
    else:  # nothing trained in the head stage: the checkpoint as saved
        assert (row["tta_acc1"], row["ece"]) == (as_saved["tta_acc1"], as_saved["ece"])
    runs = {name: [{"name": name, "seed": 0, "change": change, "evaluation_only": name != "baseline", "args": {},
                    **figures, "device": "cpu", "commit": "test"}]
            for name, change, figures in (("baseline", {}, as_saved), ("bn_clean", {"bn_stats": "clean"}, row))}
    args.ablate_epochs = 1
    study.write_ablation_table(runs, tmp_path / "ablation.json", args)
    line = next(line for line in (tmp_path / "ablation.md").read_text().splitlines() if line.startswith("| bn_clean"))
    assert '{"bn_stats": "clean"} on ema' in line


def write_images(folder):
    """Two small PNGs (an RGB 48 x 40 and a greyscale 32 x 32) and a text file that is no image."""
    from PIL import Image
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / "wide.png")
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(folder / "grey.png")
    (folder / "notes.txt").write_text("not an image")
    return [folder / "wide.png", folder / "grey.png", folder / "notes.txt"]


def test_cli_images_prints_top3_and_skips_unreadable_files(tmp_path, checkpoint, resnet):
    """--images: a top-3 line per readable image (the softmax of the model on the image made 32 px), the broken one
    reported as skipped, predictions.json (strict) and predictions.png written."""
    files = write_images(tmp_path / "photos")
    result = run_cli(evaluate, checkpoint, "--images", *files, "--out", tmp_path, "--img-size", 32, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    skipped = [line for line in result.stdout.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 1 and str(files[2]) in skipped[0]
    saved = strict_json(tmp_path / eval_name(checkpoint, ".json", "predictions"))
    assert is_png(tmp_path / eval_name(checkpoint, ".png", "predictions"))
    assert [row["file"] for row in saved["images"]] == [str(f) for f in files[:2]]
    images = np.stack([evaluate.load_as_cifar(f) for f in files[:2]])
    logits, _ = common.predict(resnet, common.CifarDataset(images, np.zeros(2, dtype=np.int64)), CPU, 32)
    for row, p in zip(saved["images"], logits[0].softmax(-1)):
        top = p.argsort(descending=True)[:3].tolist()
        assert [name for name, _ in row["top3"]] == [common.CLASSES[i] for i in top]
        assert [q for _, q in row["top3"]] == pytest.approx(p[top].tolist(), abs=1e-5)
        line = f"{row['file']}: " + ", ".join(f"{c} {q:.3f}" for c, q in row["top3"])
        assert line in result.stdout.splitlines()


def test_cli_images_creates_the_out_folder(tmp_path, checkpoint):
    """--images with an --out folder that does not exist yet: made, as the split evaluation makes it."""
    files = write_images(tmp_path / "photos")[:1]
    result = run_cli(evaluate, checkpoint, "--images", *files, "--out", tmp_path / "new", "--img-size", 32,
                     "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "new" / eval_name(checkpoint, ".json", "predictions")).is_file()
    assert is_png(tmp_path / "new" / eval_name(checkpoint, ".png", "predictions"))


def test_cli_images_with_only_unreadable_files_is_a_one_line_error(tmp_path, checkpoint):
    """--images given nothing readable: exit 2 and one line."""
    broken = write_images(tmp_path / "photos")[2]
    result = run_cli(evaluate, checkpoint, "--images", broken, tmp_path / "missing.jpg", "--out", tmp_path,
                     "--device", "cpu")
    assert_one_line_error(result, "no readable")
    assert "skipped" in result.stdout and not list(tmp_path.glob("predictions*.json"))


def test_cli_accepts_the_prefixed_keys_of_ddp_and_torch_compile(tmp_path, state_dict, synthetic_root, fast_plots):
    """A state_dict saved from a DDP- or torch.compile-wrapped model (module. / _orig_mod. keys) evaluates."""
    for prefix in ("module.", "_orig_mod."):
        path = tmp_path / f"{prefix.strip('.')}.pth"
        torch.save({prefix + key: value for key, value in state_dict.items()}, path)
        result = cli(path, synthetic_root, tmp_path / "out", "--subset", 20, "--img-size", 32)
        assert result.returncode == 0, result.stderr


def test_cli_images_ranks_classes_by_the_temperature_free_average(tmp_path, checkpoint, monkeypatch):
    """--images with TTA and a stored T: the top class comes from the T = 1 average of the views, as everywhere.
    Views [10, 0], [0, 1], [0, 1]: T = 1 ranks class 0 first, T = 0.5 would rank class 1 first."""
    views = torch.zeros(3, 1, 10)
    views[0, 0, 0], views[1, 0, 1], views[2, 0, 1] = 10.0, 1.0, 1.0
    monkeypatch.setattr(common, "predict", lambda *args, **kwargs: (views, torch.zeros(1, dtype=torch.long)))
    state = torch.load(checkpoint, weights_only=True)
    path = tmp_path / "calibrated.pth"
    fits = {"flip+translate": {"temperature": 0.5, "at_bound": False}}  # the T of the views measured
    torch.save({"model": state, "temperatures": fits, "args": {"tta_set": "flip+translate", "img_size": 32}}, path)
    image = write_images(tmp_path / "photos")[0]
    result = run_cli(evaluate, path, "--images", image, "--tta", "--out", tmp_path, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    top3 = strict_json(tmp_path / eval_name(path, ".json", "predictions"))["images"][0]["top3"]
    assert top3[0][0] == common.CLASSES[0]
    assert top3[0][1] == pytest.approx(float(common.average_views(views, 0.5)[0, 0]))  # shown at the stored T

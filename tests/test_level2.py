"""Level 2: every technique flag changes what is trained, and the level runs end to end with evaluate --tta."""
import json

import pytest
from conftest import cached_level_runs, final_line, run_cli, run_quick, run_script
from test_level1 import assert_one_line_error, run_in_process

import level2

TINY = ["--weights", "none", "--img-size", "32", "--subset", "48", "--eval-subset", "16", "--batch-size", "16",
        "-j", "0", "--head-epochs", "0", "--epochs", "1", "--seed", "3"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_root):
    """Run level2 in-process with extra flags; returns the first epoch's training loss (cached per flag set)."""
    return cached_level_runs(level2, [*TINY, "--data-dir", data_root], tmp_path_factory,
                             lambda out: json.loads((out / "level2.json").read_text())["history"][0]["train_loss"])


# Every batch mixed by MixUp (switch 0), so both alphas have something to change; CUTMIX mixes by CutMix only.
MIXUP = ("--mix-prob", "1", "--switch-prob", "0")
CUTMIX = ("--mix-prob", "1", "--switch-prob", "1")
NO_WARMUP = (*MIXUP, "--warmup-epochs", "0")  # the 3-step cosine then runs, so --min-lr matters


@pytest.mark.parametrize("base,flags", [
    (MIXUP, ("--randaug-n", "0")), (MIXUP, ("--randaug-m", "20")), (MIXUP, ("--mix-prob", "0")),
    (MIXUP, ("--mixup-alpha", "0.2")), (MIXUP, ("--switch-prob", "1")), (CUTMIX, ("--cutmix-alpha", "0.3")),
    (MIXUP, ("--label-smoothing", "0.3")), (MIXUP, ("--erase-prob", "1")), (MIXUP, ("--warmup-epochs", "0")),
    (NO_WARMUP, ("--min-lr", "5e-5"))])
def test_each_technique_flag_changes_training(tiny_run, base, flags):
    assert tiny_run(*base, *flags) != tiny_run(*base)


def test_tiny_run_is_deterministic(tmp_path, data_root, tiny_run):
    """So that in the test above any difference comes from the flag, not from chance."""
    run_in_process(level2, [*TINY, *MIXUP, "--data-dir", str(data_root), "--checkpoint-dir", str(tmp_path),
                            "--results-dir", str(tmp_path)])
    assert json.loads((tmp_path / "level2.json").read_text())["history"][0]["train_loss"] == tiny_run(*MIXUP)


def test_level2_end_to_end_then_evaluate_tta(tmp_path, data_root):
    result, results, checkpoints = run_quick("level2", tmp_path, data_root)
    assert (checkpoints / "level2_last.pth").stat().st_size > 0
    assert "train_acc" not in results["history"][0]  # no accuracy against mixed targets
    assert results["tta_set"] == "flip+translate" and results["tta_images_per_s"] > 0
    final = final_line(result.stdout)
    assert final["tta_acc1"] == pytest.approx(results["test_tta"]["acc1"], abs=1e-4)
    # The LR follows the schedule: warmup in the full stage means its first epoch ends below --lr.
    assert results["history"][1]["lr"] < 1e-4

    evaluated = run_script("evaluate.py", checkpoints / "level2_best.pth", "--tta", "--data-dir", data_root,
                           "--subset", "128", "--out", tmp_path / "eval", "-j", "0")
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads((tmp_path / "eval" / "eval_level2_best_test_tta-flip+translate.json").read_text())
    assert report["tta_views"] == ["identity", "flip", "shift_right", "shift_left", "shift_down", "shift_up"]
    assert report["acc1"] == pytest.approx(results["test_tta"]["acc1"], abs=1e-6)


@pytest.mark.parametrize("flag,value", [("--mix-prob", "1.5"), ("--erase-prob", "-0.1"), ("--randaug-m", "40")])
def test_bad_technique_values_are_one_line_errors(flag, value, data_root):
    assert_one_line_error(run_cli(level2, "--data-dir", data_root, "--weights", "none", flag, value),
                          flag.lstrip("-").split("-")[0])

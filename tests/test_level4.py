"""Level 4: SWA in the loop, calibration stored and applied, error analysis, ablation grid, summary."""
import json

import pytest
import torch
from conftest import cached_level_runs, final_line, run_quick, run_script
from test_level1 import assert_one_line_error, run_in_process
from test_level3 import without_timing

import common
import level4

TINY = ["--weights", "none", "--img-size", "32", "--subset", "32", "--eval-subset", "32", "--batch-size", "16",
        "-j", "0", "--head-epochs", "0", "--epochs", "1", "--final-epochs", "0", "--swa-epochs", "2", "--seed", "7",
        "--print-freq", "100"]


def test_most_confused_pairs_and_confident_mistakes_by_hand():
    cm = torch.tensor([[5, 3, 0], [1, 4, 0], [0, 6, 2]])
    assert common.most_confused_pairs(cm, ["a", "b", "c"], k=2) == [("c", "b", 6), ("a", "b", 3)]
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4], [0.95, 0.05]])
    labels = torch.tensor([1, 1, 0, 1, 0])
    # wrong: 0 (p 0.9), 2 (p 0.7), 3 (p 0.6); most confident first
    assert common.confident_mistakes(probs, labels, k=2) == [0, 2]
    assert common.confident_mistakes(probs, labels, k=10) == [0, 2, 3]


def test_swa_snapshots_once_per_cycle_and_schedule():
    args = level4.get_args_parser().parse_args(["--head-epochs", "1", "--epochs", "2", "--final-epochs", "1",
                                                "--swa-epochs", "2", "--swa-lr", "1e-4"])
    assert level4.swa_steps(10, args) == (40, 10)
    assert level4.lr_at(45, "fc", 10, args) == 1e-4  # constant SWA LR on the head
    args.swa_schedule, args.swa_every = "cyclic", 5
    assert level4.swa_steps(10, args) == (40, 5)
    lrs = [level4.lr_at(40 + k, "fc", 10, args) for k in range(5)]
    assert lrs == pytest.approx([1e-4 * (1 - t) + 1e-5 * t for t in (0.2, 0.4, 0.6, 0.8, 1.0)])
    assert level4.lr_at(45, "fc", 10, args) == pytest.approx(lrs[0])  # the next cycle starts high again


@pytest.fixture(scope="module")
def level4_run(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("level4")
    result, results, _ = run_quick("level4", out, data_root)
    return out, result, results


def test_level4_end_to_end_outputs(level4_run):
    out, result, results = level4_run
    for name in ("level4_curves.png", "level4_reliability.png", "level4_confusion.png", "level4_mistakes.png"):
        assert (out / "res" / "quick" / name).stat().st_size > 0, name
    assert set(results["val_final"]) == {"raw", "ema", "swa"} and set(results["test_final"]) == {"raw", "ema", "swa"}
    assert results["best_model_source"] in ("raw", "ema", "swa")
    assert set(results["tta_sets"]) == set(common.TTA_SETS)
    assert all(row["images_per_s"] > 0 for row in results["tta_sets"].values())
    calibration = results["calibration"]
    assert calibration["temperature"] > 0
    assert calibration["before"]["acc1"] == calibration["after"]["acc1"]  # scaling never changes the arg-max
    assert len(results["errors"]["confident_mistakes"]) <= 24
    assert final_line(result.stdout)["acc1"] == pytest.approx(results["test"]["acc1"], abs=1e-4)
    best = common.load_checkpoint(out / "ck" / "quick" / "level4_best.pth", "level4")
    assert best["temperature"] == pytest.approx(calibration["temperature"])


def test_evaluate_applies_the_stored_temperature_and_tta_sets(level4_run, data_root):
    out, _, results = level4_run
    evaluated = run_script("evaluate.py", out / "ck" / "quick" / "level4_best.pth", "--tta", "--data-dir", data_root,
                           "--subset", "128", "--out", out / "eval", "-j", "0")
    assert evaluated.returncode == 0, evaluated.stderr
    assert "applying the calibration temperature stored in the checkpoint" in evaluated.stdout
    report = json.loads((out / "eval" / "eval_level4_best_test_tta-flip+translate.json").read_text())
    assert report["temperature"] == pytest.approx(results["calibration"]["temperature"])
    assert report["acc1"] == pytest.approx(results["tta_sets"]["flip+translate"]["acc1"], abs=1e-6)
    assert report["ece"] == pytest.approx(results["tta_sets"]["flip+translate"]["ece"], abs=1e-5)
    scaled = run_script("evaluate.py", out / "ck" / "quick" / "level4_best.pth", "--tta", "flip+translate+scale",
                        "--tta-average", "logit", "--data-dir", data_root, "--subset", "128", "--out", out / "eval",
                        "-j", "0")
    assert scaled.returncode == 0, scaled.stderr
    report = json.loads((out / "eval" / "eval_level4_best_test_tta-flip+translate+scale.json").read_text())
    assert len(report["tta_views"]) == 8 and report["tta_average"] == "logit"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_root):
    """Run level4 in-process with extra flags; returns (the SWA state, the results), cached per flag set."""
    def read(out):
        checkpoint = torch.load(out / "level4_last.pth", weights_only=True)
        return checkpoint["model_swa"], json.loads((out / "level4.json").read_text())
    return cached_level_runs(level4, [*TINY, "--data-dir", data_root], tmp_path_factory, read)


@pytest.mark.parametrize("flags", [("--swa-lr", "1e-3"), ("--swa-schedule", "cyclic"), ("--swa-every", "1")])
def test_each_swa_flag_changes_the_average(tiny_run, flags):
    changed, base = tiny_run(*flags)[0]["module"], tiny_run()[0]["module"]
    assert not torch.equal(changed["fc.weight"], base["fc.weight"])
    assert tiny_run("--swa-every", "1")[0]["num_averaged"] == 4 and tiny_run()[0]["num_averaged"] == 2


def test_tta_average_flag_changes_the_tta_results(tiny_run):
    logit, softmax = tiny_run("--tta-average", "logit")[1], tiny_run()[1]
    assert logit["tta_sets"]["flip+translate"]["nll"] != softmax["tta_sets"]["flip+translate"]["nll"]
    assert logit["tta_sets"]["none"]["nll"] == pytest.approx(softmax["tta_sets"]["none"]["nll"])


def test_resume_inside_the_swa_phase_is_exact(tmp_path, data_root):
    flags = [*TINY, "--data-dir", str(data_root)]
    run_in_process(level4, [*flags, "--checkpoint-dir", str(tmp_path / "a"), "--results-dir", str(tmp_path / "a")])
    for extra in (["--stop-after-epochs", "2"], ["--resume", str(tmp_path / "b" / "level4_last.pth")]):
        run_in_process(level4, [*flags, "--checkpoint-dir", str(tmp_path / "b"), "--results-dir", str(tmp_path / "b"),
                                *extra])
    a = torch.load(tmp_path / "a" / "level4_last.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "level4_last.pth", weights_only=True)
    for key in a["model_swa"]["module"]:
        assert torch.equal(a["model_swa"]["module"][key], b["model_swa"]["module"][key]), key
    assert without_timing(a["history"]) == without_timing(b["history"])


def test_ablation_grid_rows_are_computed_and_resumed(tmp_path, data_root):
    argv = [*TINY, "--swa-epochs", "1", "--subset", "16", "--eval-subset", "16",
            "--data-dir", str(data_root), "--checkpoint-dir", str(tmp_path / "ck"), "--results-dir", str(tmp_path),
            "--ablate", "--ablate-epochs", "1", "--ablate-sizes", "32", "40"]
    grid = [name for name, _, _ in level4.ablation_grid(level4.get_args_parser().parse_args(argv))]
    assert grid[0] == "baseline" and len(grid) == 10  # 8 techniques off, one other size
    assert "img_size_40" in grid and "img_size_32" not in grid  # 32 px is the baseline itself
    # Two rows (and the baseline, always) to keep the test short; every row is the same code with other flags.
    run_in_process(level4, [*argv, "--ablate-rows", "no_ema", "img_size_40"])
    rows = json.loads((tmp_path / "ablation.json").read_text())["rows"]
    assert [row["name"] for row in rows] == ["baseline", "no_ema", "img_size_40"]
    assert len({row["command"] for row in rows}) == len(rows)
    for row in rows:  # each row's numbers come from its own run's results file
        result = json.loads((tmp_path / "ablation" / row["name"] / "level4.json").read_text())
        assert row["tta_acc1"] == result["test_tta"]["acc1"] and row["seconds"] == result["seconds"]
    table = (tmp_path / "ablation.md").read_text()
    assert all(f"| {row['name']} |" in table and row["command"] in table for row in rows)
    assert (tmp_path / "ablation.png").stat().st_size > 0
    # Delete one row, run again with another selection: only the missing row is computed, finished rows stay.
    kept = [row for row in rows if row["name"] != "no_ema"]
    common.write_json(tmp_path / "ablation.json", {"rows": kept})
    (tmp_path / "ablation" / "no_ema" / "level4.json").unlink()
    run_in_process(level4, [*argv, "--ablate-rows", "no_ema"])
    again = {row["name"]: row for row in json.loads((tmp_path / "ablation.json").read_text())["rows"]}
    assert list(again) == ["baseline", "no_ema", "img_size_40"]
    assert (tmp_path / "ablation" / "no_ema" / "level4.json").is_file()
    for row in kept:
        assert again[row["name"]] == row  # untouched, seconds and all


def test_unknown_ablation_row_is_a_one_line_error_that_lists_the_grid():
    from conftest import run_cli
    result = run_cli(level4, "--ablate", "--ablate-rows", "no_ema", "no_dropout")
    assert_one_line_error(result, "--ablate-rows: no row named no_dropout", "baseline no_randaugment")
    assert_one_line_error(run_cli(level4, "--ablate-rows", "no_ema"), "add --ablate")


def test_summary_table_from_level_results(tmp_path, level4_run):
    out, _, results = level4_run
    (tmp_path / "level4.json").write_text(json.dumps(results))
    result = run_script("level4.py", "--summary", "--results-dir", tmp_path)
    assert result.returncode == 0, result.stderr
    summary = (tmp_path / "summary.md").read_text()
    assert f"| level4 | {results['test']['acc1']:.4f} |" in summary and results["commit"] in summary
    assert (tmp_path / "summary.png").stat().st_size > 0
    assert_one_line_error(run_script("level4.py", "--summary", "--results-dir", tmp_path / "empty"), "level")

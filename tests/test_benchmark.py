"""support/benchmark.py: a CPU smoke run times each level's own step (and, with --epochs, Level 1's epoch loop); a new
train_one_epoch parameter fails by name."""
import json

import pytest
import torch
from conftest import assert_one_line_error, run_cli

import level1
from support import benchmark


def test_smoke_run_prints_parseable_lines_json_and_markdown(tmp_path, data_root):
    out = run_cli(benchmark, "--level", "1", "4", "--img-size", "32", "-b", "8", "--steps", "1", "--warmup-steps", "1",
                  "-j", "0", "--device", "cpu", "--tta-set", "flip", "--data-dir", data_root, "--json", tmp_path / "b.json",
                  "--markdown",
                  tmp_path / "b.md")
    assert out.returncode == 0, out.stderr
    lines = [dict(item.split("=") for item in line.split()[1:]) for line in out.stdout.splitlines()
             if line.startswith("benchmark:")]
    assert [line["level"] for line in lines] == ["1", "4"]
    for line in lines:
        assert float(line["level_img_s"]) > 0 and float(line["ratio"]) == pytest.approx(
            float(line["level_img_s"]) / float(line["bare_img_s"]), rel=0.02)
    rows = json.loads((tmp_path / "b.json").read_text())
    assert [row["level"] for row in rows] == [1, 4] and all(row["commit"] and row["device"] for row in rows)
    table = (tmp_path / "b.md").read_text()
    assert "python -m support.benchmark --level 1 4" in table and table.count("\n| ") == 3


def test_a_train_one_epoch_parameter_the_benchmark_cannot_supply_is_named(monkeypatch, data_root):
    def train_one_epoch(model, loader, optimizer, scaler, device, args, new_thing):
        return 0.0
    monkeypatch.setattr(level1, "train_one_epoch", train_one_epoch)
    with pytest.raises(RuntimeError, match="new_thing"):
        run_cli(benchmark, "--level", "1", "--img-size", "32", "-b", "8", "--steps", "1", "--warmup-steps", "0",
                "-j", "0", "--device", "cpu", "--data-dir", data_root)


def test_epochs_times_the_level_loop_after_its_first_epoch(tmp_path, data_root):
    out = run_cli(benchmark, "--level", "1", "--img-size", "32", "-b", "8", "--steps", "1", "--warmup-steps", "0",
                  "-j", "0", "--device", "cpu", "--tta-set", "flip", "--data-dir", data_root, "--epochs", "2",
                  "--epoch-images", "16", "--markdown", tmp_path / "b.md")
    assert out.returncode == 0, out.stderr
    line = [dict(item.split("=") for item in line.split()[1:]) for line in out.stdout.splitlines()
            if line.startswith("benchmark:")][0]
    assert float(line["epoch_img_s"]) > 0 and float(line["outside_s"]) >= 0
    ratio = float(line["epoch_img_s"]) / float(line["level_img_s"])
    assert float(line["epoch_ratio"]) == pytest.approx(ratio, rel=0.02)
    assert "final:" not in out.stdout  # the level's own lines are not the benchmark's
    table = (tmp_path / "b.md").read_text()
    assert "| epoch line img/s | epoch / level step | s per epoch outside the steps |" in table


@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_epochs_gives_each_level_its_last_stage_and_the_epoch_line_leaves_the_first_out(level, monkeypatch):
    """The level's main (replaced here) gets 3 epochs of 16 images with every layer training (Level 4: the last one
    SWA's); of the history it returns, the first epoch is warm-up: 2 epochs of 5 s in all, 1.5 s outside the steps."""
    history = [{"epoch_seconds": 60.0, "train_seconds": 50.0}, {"epoch_seconds": 2.0, "train_seconds": 1.5},
               {"epoch_seconds": 3.0, "train_seconds": 2.0}]
    seen = []
    module = benchmark.LEVELS[level]
    monkeypatch.setattr(module, "main", lambda args: seen.append(args) or {"history": history})
    args = benchmark.get_args_parser().parse_args(["--epochs", "3", "--epoch-images", "17", "-b", "8"])
    assert benchmark.epoch_img_s(module, args, torch.device("cpu")) == (2 * 16 / 5.0, 0.75)
    level_args = vars(seen[0])
    epochs = level_args["head_epochs"] + level_args["epochs"] + level_args.get("final_epochs", 0)
    assert level_args["head_epochs"] == 0 and level_args["subset"] == 17 and level_args["eval_subset"] == 8
    assert level_args.get("unfreeze_every", 0) == 0 and epochs + level_args.get("swa_epochs", 0) == 3
    assert level_args.get("swa_epochs", 1) == 1


def test_epochs_1_is_refused():
    assert_one_line_error(run_cli(benchmark, "--epochs", "1"), "--epochs 0 (off) or >= 2")

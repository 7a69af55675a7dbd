"""benchmark.py: a CPU smoke run times each level's own step, and a new train_one_epoch parameter fails by name."""
import json

import pytest
from conftest import run_cli

import benchmark
import level1


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
    assert "python benchmark.py --level 1 4" in table and table.count("\n| ") == 3


def test_a_train_one_epoch_parameter_the_benchmark_cannot_supply_is_named(monkeypatch, data_root):
    def train_one_epoch(model, loader, optimizer, scaler, device, args, new_thing):
        return 0.0
    monkeypatch.setattr(level1, "train_one_epoch", train_one_epoch)
    with pytest.raises(RuntimeError, match="new_thing"):
        run_cli(benchmark, "--level", "1", "--img-size", "32", "-b", "8", "--steps", "1", "--warmup-steps", "0",
                "-j", "0", "--device", "cpu", "--data-dir", data_root)

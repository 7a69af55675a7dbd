"""benchmark.py: a CPU smoke run of two levels (parseable lines, JSON), its plumbing, and its one-line errors."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import run_cli, run_script

import benchmark
import common
import level2

SMOKE = ["--img-size", "32", "-b", "8", "--steps", "2", "--warmup-steps", "1", "-j", "0", "--device", "cpu"]
POSITIVE = ("bare_img_s", "level_img_s", "ratio", "eval_img_s", "tta_img_s", "peak_mem_mb")


def benchmark_lines(stdout):
    """The `benchmark: level=...` lines as dicts: numbers as floats, the device as text."""
    rows = []
    for line in stdout.splitlines():
        if line.startswith("benchmark: level="):
            fields = dict(item.split("=", 1) for item in line.split()[1:])
            rows.append({key: value if key == "device" else float(value) for key, value in fields.items()})
    return rows


def test_smoke_levels_1_and_2_lines_and_json(tmp_path, data_root):
    path = tmp_path / "benchmark.json"
    # One thread: this run checks the plumbing, not the speed, and two threads on two cores that another
    # process is also using can run tens of times slower (each thread waits for the other at every op).
    table = tmp_path / "benchmark.md"
    result = run_script("benchmark.py", "--level", "1", "2", *SMOKE, "--data-dir", data_root, "--json", path,
                        "--markdown", table, timeout=300, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    rows = benchmark_lines(result.stdout)
    assert [row["level"] for row in rows] == [1, 2]
    for row in rows:
        assert tuple(row) == benchmark.LINE_FIELDS
        assert (row["img_size"], row["batch"], row["device"]) == (32, 8, "cpu")
        assert all(row[key] > 0 for key in POSITIVE), row
        # Both rates are printed rounded to 0.01 img/s: the ratio agrees with them to that rounding.
        assert row["ratio"] == pytest.approx(row["level_img_s"] / row["bare_img_s"], rel=1e-2, abs=1e-3)
    saved = json.loads(path.read_text())
    assert [{key: entry[key] for key in benchmark.LINE_FIELDS} for entry in saved] == rows
    assert all(entry["commit"] and entry["torch"] and entry["device_name"] for entry in saved)
    assert "level1:" in result.stdout and "% of bare" in result.stdout  # the human-readable blocks
    # The README table: what produced it (command, device, commit), then one row per level.
    heading, _, header, _, *table_rows = table.read_text().splitlines()
    assert heading.startswith("`python benchmark.py --level 1 2 --img-size 32 --batch-size 8 --steps 2")
    assert f"commit {saved[0]['commit']}" in heading and "cpu" in heading
    assert header.startswith("| level | px | batch | bare step img/s | level step img/s | level / bare |")
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in table_rows]
    assert [(int(c[0]), int(c[1]), int(c[2]), float(c[5])) for c in cells] == [
        (int(row["level"]), 32, 8, round(row["ratio"], 2)) for row in rows]


@pytest.mark.parametrize("flags,message", [
    (["--steps", "0"], "--steps must be > 0"), (["-b", "-4"], "--batch-size must be > 0"),
    (["--warmup-steps", "-1"], "--warmup-steps must be >= 0"), (["-j", "-1"], "--workers must be >= 0"),
    (["--img-size", "16"], "--img-size must be at least 32")])
def test_bad_input_is_one_line_error(flags, message):
    result = run_cli(benchmark, *flags)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(f"error: {message}")


def test_bad_input_from_the_command_line():
    result = run_script("benchmark.py", "--steps", "0")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error:") and len(result.stderr.strip().splitlines()) == 1


def test_batch_larger_than_the_training_split_is_one_line_error(synthetic_root):
    """The synthetic training split holds 100 images: no full batch of 200, caught before any timing."""
    result = run_cli(benchmark, "--level", "1", "-b", "200", "--img-size", "32", "-j", "0", "--device", "cpu",
                     "--data-dir", synthetic_root)
    assert result.returncode == 2
    assert result.stderr.startswith("error: the training split (100 images) holds no full batch of 200")


def test_level_args_are_the_level_defaults_with_the_benchmark_sizes():
    """So the timed step has every technique on exactly as in a real run."""
    args = benchmark.get_args_parser().parse_args(["--img-size", "64", "-b", "16", "-j", "0"])
    level_args = benchmark.level_args_for(level2, args)
    defaults = level2.get_args_parser().parse_args([])
    assert (level_args.img_size, level_args.batch_size, level_args.workers, level_args.weights) == (64, 16, 0, "none")
    assert level_args.print_freq >= benchmark.NEVER
    changed = {key for key in vars(defaults) if getattr(defaults, key) != getattr(level_args, key)}
    assert changed <= {"img_size", "batch_size", "workers", "weights", "print_freq", "data_dir", "device"}


def test_first_batches_continue_one_stream_across_epochs():
    """Warm-up and timed steps draw from one live iterator, and the stream runs on into the next epoch."""
    images = np.zeros((10, 32, 32, 3), dtype=np.uint8)
    dataset = common.CifarDataset(images, np.arange(10))  # label == index, to see which images came
    loader = common.make_loader(dataset, 2, common.EpochSampler(10, seed=0), drop_last=True)
    stream = benchmark.batch_stream(loader)
    first, second = list(benchmark.FirstBatches(stream, 3, loader)), benchmark.FirstBatches(stream, 4, loader)
    assert len(second) == 4 and second.sampler is loader.sampler
    batches = first + list(second)
    assert len(batches) == 7
    assert sorted(int(label) for _, labels in batches[:5] for label in labels) == list(range(10))  # epoch 0 whole
    assert loader.sampler.epoch == 1


def test_unknown_train_one_epoch_parameter_is_named():
    def train_one_epoch(model, loader, new_thing):
        return {}
    module = SimpleNamespace(LEVEL="level9", train_one_epoch=train_one_epoch)
    with pytest.raises(RuntimeError, match="new_thing"):
        benchmark.call_train_one_epoch(module, {"model": None}, [])

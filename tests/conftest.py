"""Shared test helpers: the real CIFAR-10 when it is there (a synthetic folder in the same format otherwise), tiny
level runs in this process, the scripts' command lines in this process or in a subprocess."""
import contextlib
import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
from support import run  # noqa: E402

# A level run small enough for 2 CPU cores: 64 training images at 32 px, every stage one epoch.
TINY = ["--weights", "none", "--img-size", "32", "--subset", "64", "--eval-subset", "32", "-b", "16", "-j", "0",
        "--head-epochs", "1", "--epochs", "1", "--print-freq", "0"]
# Level 4's CIFAR-10-C-style report on 4 images: 75 passes over 32 would add 5 s to each run.
TINY_LEVEL = {1: [], 2: [], 3: ["--final-epochs", "1"], 4: ["--swa-epochs", "1", "--corruption-images", "4"]}


def real_cifar_dir():
    """The real cifar-10-batches-py folder: $CIFAR10_DIR, else ../shared/data beside the repository."""
    for candidate in (os.environ.get("CIFAR10_DIR"), ROOT.parent / "shared" / "data" / "cifar-10-batches-py"):
        if candidate and (Path(candidate) / "data_batch_1").is_file():
            return Path(candidate)
    return None


def write_synthetic_cifar(folder, per_class_per_batch=102, test_per_class=10, seed=0):
    """A complete cifar-10-batches-py folder of random images: 510 training images per class (enough for the
    500-per-class validation split) and 100 test images. Returns {file: (N x 3 x 32 x 32 uint8, labels)}."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, per_class in [*((f"data_batch_{i}", per_class_per_batch) for i in range(1, 6)),
                            ("test_batch", test_per_class)]:
        labels = np.tile(np.arange(10), per_class)
        rng.shuffle(labels)
        images = rng.integers(0, 256, size=(len(labels), 3, 32, 32), dtype=np.uint8)
        batch = {"batch_label": name, "labels": labels.tolist(), "data": images.reshape(len(labels), 3072),
                 "filenames": [f"{name}_{i}.png" for i in range(len(labels))]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        written[name] = (images, labels)
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list(common.CLASSES)}, protocol=2))
    return written


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A --data-dir holding a synthetic cifar-10-batches-py."""
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_cifar(root / "cifar-10-batches-py")
    return root


@pytest.fixture(scope="session")
def data_root(synthetic_root):
    """--data-dir for level runs: the real data when present (so that runs are real), else the synthetic folder."""
    real = real_cifar_dir()
    return real.parent if real is not None else synthetic_root


def run_script(*args, env=None, timeout=600):
    """Run a project script as a user would, in a subprocess; returns the CompletedProcess (text)."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def run_cli(module, *args):
    """A script's command line run in this process (sys.argv, run.run_main, exit code, captured output): the same
    path as `python script.py ...` without an interpreter start, for the many bad-input checks."""
    stdout, stderr = io.StringIO(), io.StringIO()
    old_argv, sys.argv = sys.argv, [module.__file__, *map(str, args)]
    returncode = 0
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            run.run_main(module.main, module.get_args_parser(), module.validate_args)
    except SystemExit as exit_:
        returncode = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = old_argv
    return SimpleNamespace(returncode=returncode, stdout=stdout.getvalue(), stderr=stderr.getvalue())


def assert_one_line_error(result, *fragments):
    """Exit code 2, no traceback, exactly one stderr line starting "error:" that holds every fragment."""
    assert result.returncode == 2, (result.returncode, result.stdout[-800:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def one_thread():
    """Small models on a shared 2-core machine run far faster on one thread (a test module opts in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`); the setting is restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def summary_table(folder):
    """results/summary.md's first table read back: (the header's cells, {level: its row's cells})."""
    lines = (Path(folder) / "summary.md").read_text().splitlines()
    header = [cell.strip() for cell in lines[2].split("|")]
    table = lines[4:lines.index("", 4)] if "" in lines[4:] else lines[4:]  # the sections after it: blank line first
    rows = {cells[1]: cells for cells in ([c.strip() for c in line.split("|")] for line in table)}
    return header, rows


def final_line(stdout):
    """The `final: key=value ...` line every script ends with, as a dict of floats."""
    line = [line for line in stdout.splitlines() if line.startswith("final:")][-1]
    return {key: float(value) for key, value in (item.split("=") for item in line.split()[1:])}


def level_args(module, folder, data_root, *extra):
    """A tiny run's parsed and validated arguments, writing to `folder`."""
    level = int(module.LEVEL[-1])
    args = module.get_args_parser().parse_args([*TINY, *TINY_LEVEL[level], "--data-dir", str(data_root),
                                                "--checkpoint-dir", str(folder), "--results-dir", str(folder),
                                                *map(str, extra)])
    module.validate_args(args)
    return args


def run_level(module, folder, data_root, *extra):
    """A tiny run in this process; returns (results dict, folder)."""
    module.main(level_args(module, folder, data_root, *extra))
    return json.loads((Path(folder) / f"{module.LEVEL}.json").read_text()), Path(folder)


@pytest.fixture(scope="module")
def cached_run(tmp_path_factory, data_root):
    """cached_run(module, *extra): a tiny run, once per module and set of flags (flag-effect tests share baselines)."""
    cache = {}

    def run(module, *extra):
        key = (module.LEVEL, *map(str, extra))
        if key not in cache:
            cache[key] = run_level(module, tmp_path_factory.mktemp(module.LEVEL), data_root, *extra)
        return cache[key]
    return run

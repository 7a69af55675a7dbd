"""Shared fixtures: the real CIFAR-10 when it is there, a synthetic folder in the same format otherwise."""
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def real_cifar_dir():
    """The real cifar-10-batches-py folder: $CIFAR10_DIR, else ../shared/data beside the repository."""
    candidates = [os.environ.get("CIFAR10_DIR"), ROOT.parent / "shared" / "data" / "cifar-10-batches-py"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "data_batch_1").is_file():
            return Path(candidate)
    return None


def write_synthetic_cifar(folder, per_class_per_batch=102, test_per_class=10, seed=0):
    """A complete cifar-10-batches-py folder with random images: 510 training images per class (enough for the
    500-per-class validation split) and 100 test images. Returns the arrays written, in NHWC uint8."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}

    def write(name, n_per_class):
        labels = np.tile(np.arange(10), n_per_class)
        rng.shuffle(labels)
        images = rng.integers(0, 256, size=(len(labels), 32, 32, 3), dtype=np.uint8)
        data = images.transpose(0, 3, 1, 2).reshape(len(labels), 3072)  # channel-planar rows
        batch = {"batch_label": name, "labels": labels.tolist(), "data": data,
                 "filenames": [f"{name}_{i}.png" for i in range(len(labels))]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        written[name] = (images, labels)

    for i in range(1, 6):
        write(f"data_batch_{i}", per_class_per_batch)
    write("test_batch", test_per_class)
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                            "truck"], "num_cases_per_batch": 10 * per_class_per_batch, "num_vis": 3072}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return written


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A --data-dir holding a synthetic cifar-10-batches-py."""
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_cifar(root / "cifar-10-batches-py")
    return root


@pytest.fixture(scope="session")
def data_root(synthetic_root):
    """--data-dir for end-to-end runs: the real data when present (so runs are real), else synthetic."""
    real = real_cifar_dir()
    return real.parent if real is not None else synthetic_root


def run_script(*args, cwd=ROOT, timeout=600, env=None):
    """Run a project script as a user would; returns the CompletedProcess (text)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def final_line(stdout):
    """The `final: k=v ...` line every script ends with, as a dict of floats."""
    line = [line for line in stdout.splitlines() if line.startswith("final:")][-1]
    return {key: float(value) for key, value in (item.split("=") for item in line.split()[1:])}


def run_cli(module, *args):
    """Run a script's command line in this process (sys.argv, run_main, exit code, captured output): the
    same path as `python script.py ...` without the interpreter start-up, for the many bad-input checks."""
    import contextlib
    import io
    from types import SimpleNamespace

    import common
    stdout, stderr = io.StringIO(), io.StringIO()
    old_argv, sys.argv = sys.argv, [module.__file__, *map(str, args)]
    returncode = 0
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            common.run_main(module.main, module.get_args_parser(), module.validate_args)
    except SystemExit as exit_:
        returncode = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = old_argv
    return SimpleNamespace(returncode=returncode, stdout=stdout.getvalue(), stderr=stderr.getvalue())


def cached_level_runs(module, flags, tmp_path_factory, read):
    """run(*extra): `module` run in-process with `flags` + `extra` into a fresh folder, returning read(folder);
    each distinct `extra` runs once per test module, so flag-effect tests share their baseline run."""
    cache = {}

    def run(*extra):
        if extra not in cache:
            out = tmp_path_factory.mktemp("run")
            args = module.get_args_parser().parse_args([*map(str, flags), "--checkpoint-dir", str(out),
                                                        "--results-dir", str(out), *extra])
            module.validate_args(args)
            module.main(args)
            cache[extra] = read(out)
        return cache[extra]
    return run


def run_quick(level, tmp_path, data_root):
    """`levelN.py --quick` as a user would run it, with a real run's best checkpoint already in place: the
    smoke run must write only under quick/ and leave that checkpoint byte-identical. Returns
    (CompletedProcess, results dict, checkpoint folder of the quick run)."""
    import json

    import torch
    real = tmp_path / "ck" / f"{level}_best.pth"
    real.parent.mkdir(parents=True)
    torch.save({"model": {"w": torch.arange(5.0)}, "epoch": 40, "args": {"epochs": 40}, "best_val_acc": 0.97}, real)
    before = real.read_bytes()
    result = run_script(f"{level}.py", "--quick", "--weights", "none", "--data-dir", data_root, "-j", "0",
                        "--checkpoint-dir", tmp_path / "ck", "--results-dir", tmp_path / "res")
    assert result.returncode == 0, result.stderr
    assert "smoke run (--quick)" in result.stdout
    assert real.read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [real.name, "quick"]
    assert [p.name for p in (tmp_path / "res").iterdir()] == ["quick"]
    assert (tmp_path / "ck" / "quick" / f"{level}_best.pth").is_file()
    assert (tmp_path / "res" / "quick" / f"{level}_curves.png").stat().st_size > 0
    return result, json.loads((tmp_path / "res" / "quick" / f"{level}.json").read_text()), tmp_path / "ck" / "quick"

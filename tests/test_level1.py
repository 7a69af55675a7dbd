"""Level 1: stage 1 really freezes, a CPU run is bit-reproducible, end to end with evaluate.py, bad input."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import final_line, run_cli, run_quick, run_script

import common
import evaluate
import level1

TINY = ["--weights", "none", "--img-size", "32", "--subset", "64", "--eval-subset", "64", "--batch-size", "32",
        "-j", "0", "--head-epochs", "1", "--epochs", "1"]


def tiny_loader(n=32, batch_size=16):
    images = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(n) % 10
    dataset = common.CifarDataset(images, labels, common.train_transform())
    sampler = common.EpochSampler(n, seed=0)
    return common.make_loader(dataset, batch_size, sampler, workers=0)


def test_stage_one_freezes_backbone_weights_and_batchnorm_statistics():
    torch.manual_seed(0)
    model = common.build_model("none")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = SimpleNamespace(head_lr=1e-2, lr=1e-4, weight_decay=0.05, img_size=32, print_freq=100)
    optimizer, trainable = level1.make_optimizer(model, "head", args, torch.device("cpu"))
    stop, progress = SimpleNamespace(requested=False), common.Progress(1)
    cpu = torch.device("cpu")
    scaler = common.grad_scaler(cpu)  # disabled: fp32 on the CPU
    level1.train_one_epoch(model, trainable, tiny_loader(), optimizer, scaler, cpu, args, 0, stop, progress)
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert sorted(changed) == ["fc.bias", "fc.weight"]  # running_mean/var and num_batches_tracked too
    # Stage 2 trains everything, BatchNorm statistics included.
    optimizer, trainable = level1.make_optimizer(model, "full", args, torch.device("cpu"))
    level1.train_one_epoch(model, trainable, tiny_loader(), optimizer, scaler, cpu, args, 0, stop, progress)
    assert not torch.equal(model.layer1[0].bn1.running_mean, before["layer1.0.bn1.running_mean"])
    assert not torch.equal(model.conv1.weight, before["conv1.weight"])


def run_in_process(module, argv):
    args = module.get_args_parser().parse_args(argv)
    module.validate_args(args)
    module.main(args)


def test_same_seed_same_weights_other_seed_other_weights(tmp_path, data_root):
    weights = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        run_in_process(level1, [*TINY, "--data-dir", str(data_root), "--seed", str(seed), "--head-epochs", "0",
                                "--checkpoint-dir", str(tmp_path / name), "--results-dir", str(tmp_path / name)])
        weights.append(torch.load(tmp_path / name / "level1_last.pth", weights_only=True)["model"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


def test_level1_quick_end_to_end_then_evaluate(tmp_path, data_root):
    result, results, checkpoints = run_quick("level1", tmp_path, data_root)
    assert (checkpoints / "level1_last.pth").stat().st_size > 0
    assert [row["epoch"] for row in results["history"]] == [1, 2]
    assert [row["stage"] for row in results["history"]] == ["head", "full"]
    assert results["test"]["num_images"] == 128 and results["commit"]
    assert final_line(result.stdout)["acc1"] == pytest.approx(results["test"]["acc1"], abs=1e-4)

    evaluated = run_script("evaluate.py", checkpoints / "level1_best.pth", "--data-dir", data_root,
                           "--subset", "128", "--out", tmp_path / "eval", "-j", "0")
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads((tmp_path / "eval" / "eval_level1_best_test.json").read_text())
    assert (tmp_path / "eval" / "eval_level1_best_test_confusion.png").stat().st_size > 0
    # The same checkpoint on the same 128 test images: evaluate.py agrees with the level's own final test.
    assert report["acc1"] == pytest.approx(results["test"]["acc1"], abs=1e-6)
    assert final_line(evaluated.stdout)["acc1"] == pytest.approx(report["acc1"], abs=1e-4)
    assert sum(map(sum, report["confusion_matrix"])) == 128
    assert "per_class_acc" in report and "ece" in report and "nll" in report


def test_a_longer_runs_best_checkpoint_needs_overwrite(tmp_path, synthetic_root):
    longer = {"model": {}, "epoch": 30, "args": {"head_epochs": 2, "epochs": 30}, "best_val_acc": 0.97}
    common.save_checkpoint(tmp_path / "level1_best.pth", longer)
    before = (tmp_path / "level1_best.pth").read_bytes()
    flags = [*TINY, "--data-dir", synthetic_root, "--checkpoint-dir", tmp_path, "--results-dir", tmp_path / "res"]
    assert_one_line_error(run_cli(level1, *flags), "longer run", "--overwrite")
    assert (tmp_path / "level1_best.pth").read_bytes() == before
    replaced = run_cli(level1, *flags, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert "stays until this run writes its first checkpoint" in replaced.stdout
    assert common.load_checkpoint(tmp_path / "level1_best.pth")["epoch"] <= 2


def test_device_auto_resolves_to_what_is_there():
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert common.resolve_device("auto").type == expected


def test_evaluate_own_images_top3_sheet_and_unreadable_files(tmp_path):
    from PIL import Image
    checkpoint = tmp_path / "model.pth"
    torch.save(common.build_model("none").state_dict(), checkpoint)
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (120, 90, 3), dtype=np.uint8)).save(folder / "tall.png")
    Image.fromarray(rng.integers(0, 256, (40, 64, 3), dtype=np.uint8)).save(folder / "wide.jpg")
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(tmp_path / "grey.png")
    (folder / "broken.png").write_bytes(b"not an image")
    result = run_cli(evaluate, checkpoint, "--images", folder, tmp_path / "grey.png", "--out", tmp_path / "out",
                     "--img-size", "32")
    assert result.returncode == 0, result.stderr
    top3_lines = [line for line in result.stdout.splitlines() if line.count(",") == 2 and ": " in line]
    assert len(top3_lines) == 3
    assert "skipped" in result.stdout and "broken.png" in result.stdout
    predictions = json.loads((tmp_path / "out" / "predictions.json").read_text())["images"]
    assert len(predictions) == 3
    for row in predictions:
        assert sum(row["probs"].values()) == pytest.approx(1.0, abs=1e-5)
        assert [p for _, p in row["top3"]] == sorted(row["probs"].values(), reverse=True)[:3]
    assert (tmp_path / "out" / "predictions.png").stat().st_size > 0
    # Area downsampling: a flat colour stays exactly that colour at 32 px.
    Image.fromarray(np.full((64, 48, 3), 200, dtype=np.uint8)).save(tmp_path / "flat.png")
    assert (evaluate.load_as_cifar(tmp_path / "flat.png") == 200).all()
    only_broken = run_cli(evaluate, checkpoint, "--images", folder / "broken.png", "--out", tmp_path / "out2")
    assert_one_line_error(only_broken, "no readable")


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("flag,value", [("--epochs", "0"), ("--batch-size", "-1"), ("--lr", "0"),
                                        ("--subset", "0"), ("--img-size", "16"), ("--head-lr", "-0.001"),
                                        ("--weight-decay", "-0.1"), ("--workers", "-1")])
def test_bad_numbers_are_one_line_errors(flag, value, data_root):
    assert_one_line_error(run_cli(level1, "--data-dir", data_root, "--weights", "none", flag, value),
                          flag.lstrip("-").split("-")[0])


def test_missing_data_offline_is_one_line_error(tmp_path):
    result = run_script("level1.py", "--data-dir", tmp_path / "nodata", "--weights", "none")
    assert_one_line_error(result, "cifar-10-batches-py", "could not be downloaded")


def test_corrupt_data_is_one_line_error(tmp_path):
    from conftest import write_synthetic_cifar
    write_synthetic_cifar(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"\x00" * 100)
    assert_one_line_error(run_cli(level1, "--data-dir", tmp_path, "--weights", "none"), "data_batch_2")


def test_imagenet_weights_offline_names_file_cache_and_alternatives(tmp_path, synthetic_root):
    result = run_script("level1.py", "--data-dir", synthetic_root, env={"TORCH_HOME": str(tmp_path / "hub")})
    assert_one_line_error(result, "resnet50-11ad3fa6.pth", str(tmp_path / "hub" / "hub" / "checkpoints"),
                          "--weights none", "--weights PATH")


def make_bad_checkpoint(tmp_path, kind):
    path = tmp_path / f"{kind}.pth"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        torch.save({"model": common.build_model("none").state_dict(), "epoch": 1}, path)
        path.write_bytes(path.read_bytes()[:5000])
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    elif kind == "directory":
        path.mkdir()
    elif kind == "resnet18":
        import torchvision
        torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    elif kind == "five_classes":
        import torchvision
        torch.save(torchvision.models.resnet50(num_classes=5).state_dict(), path)
    elif kind == "code":
        class RunsCode:
            def __reduce__(self):
                return (print, ("code ran",))
        torch.save({"model": RunsCode()}, path)
    return path


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "random", "directory", "resnet18",
                                  "five_classes", "code"])
def test_evaluate_bad_checkpoints_are_one_line_errors(tmp_path, kind, synthetic_root):
    path = make_bad_checkpoint(tmp_path, kind)
    before = sorted(p.name for p in tmp_path.iterdir())
    # One of them through a real interpreter start, the rest in-process (same code path, faster).
    run = run_script if kind == "code" else lambda script, *args: run_cli(evaluate, *args)
    result = run("evaluate.py", path, "--data-dir", synthetic_root, "-j", "0")
    assert_one_line_error(result, str(path))
    assert "code ran" not in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing on disk touched


def test_resume_from_bad_checkpoint_is_one_line_error(tmp_path, synthetic_root):
    path = make_bad_checkpoint(tmp_path, "random")
    assert_one_line_error(run_cli(level1, "--data-dir", synthetic_root, "--weights", "none", "--resume",
                                     path, "--checkpoint-dir", tmp_path / "ck"), str(path))

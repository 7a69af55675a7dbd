"""Run records: what produced each number (command, device, precision, commit, versions), every session of a
resumed run, and the strict JSON and Markdown the results are written as. Called by the levels (start_session,
print_epoch, write_results, write_per_image), evaluate.py (run_info, write_json), support.study and support.benchmark
(write_json, write_table)."""
import io
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import common
from support import files

ROOT = Path(__file__).resolve().parent.parent  # the repository whose commit a result names


def run_info(device):
    """What produced a result: the command, the device, the precision, the commit and the library versions."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout
    try:
        top = git("rev-parse", "--show-toplevel").strip()
        commit = git("rev-parse", "--short", "HEAD").strip()
        if git("status", "-s", "-uno"):
            commit += "-dirty"
    except OSError:  # no git
        top, commit = "", ""
    if not top or Path(top).resolve() != ROOT:  # no repository, or an enclosing one's
        commit = ""
    name = f"{device.type} ({os.cpu_count()} cores)"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[common.amp_dtype(device)]
    script = Path(sys.argv[0]).resolve()
    command = ["python", script.name]  # python level1.py, python evaluate.py
    if script.parent.name == "support":  # run as a module: python -m support.benchmark
        command = ["python", "-m", f"support.{script.stem}"]
    return {"command": " ".join([*command, *sys.argv[1:]]), "device": name,
            "precision": precision, "commit": commit or "unknown", "torch": torch.__version__}


def start_session(level, args, device, world_size, start_epoch, datasets, master):
    """A level's session record (run_info, the training images, the start time), and its first line on rank 0."""
    train_set, val_set, test_set = datasets
    info = {**run_info(device), "train_images": len(train_set), "started": time.time()}
    if master:
        print(f"{level}: {info['device']} x {world_size}, {info['precision']}, {args.img_size} px, {args.weights} "
              f"weights, epoch {start_epoch + 1} on; train images: {len(train_set)}, val {len(val_set)}, test "
              f"{len(test_set)}; Ctrl-C stops the run, {level}_last.pth keeps its last epoch", flush=True)
    return info


def print_epoch(row, total_epochs, start_epoch, info):
    """The epoch line: loss, every validation figure of the row ("val loss 0.51 acc 0.83 loss_ema 0.49 acc_ema 0.84"),
    speed, the time so far and the time left at this session's pace."""
    elapsed = time.time() - info["started"]
    eta = elapsed / (row["epoch"] - start_epoch) * (total_epochs - row["epoch"])
    figures = [f"{key.removeprefix('val_')} {value:.4f}" for key, value in row.items() if key.startswith("val_")]
    val_text = ""
    if figures:
        val_text = " | val " + " ".join(figures)
    print(f"epoch {row['epoch']}/{total_epochs} [{row['stage']}] lr {row['lr']:.1e} train loss {row['train_loss']:.4f}"
          f"{val_text} | {row['images_per_s']:.0f} img/s | {elapsed:.0f} s, ETA {eta:.0f} s", flush=True)


def run_sessions(history, info):
    """Every session of a run (a resumed run has several), from the history rows, which name the session that ran
    them: its command, epochs and seconds (the current session's until now, its final test included), and the total
    seconds of the run: {"sessions": [...], "total_seconds": ...}."""
    sessions = {}
    for row in history:
        new = {"command": row.get("command"), "epochs": 0, "seconds": 0.0}
        session = sessions.setdefault(row.get("session_started"), new)
        session["epochs"] += 1
        session["seconds"] += row.get("epoch_seconds") or row.get("train_seconds") or 0.0
    current = sessions.setdefault(info["started"], {"command": info.get("command"), "epochs": 0, "seconds": 0.0})
    current["seconds"] = time.time() - info["started"]
    return {"sessions": list(sessions.values()), "total_seconds": sum(s["seconds"] for s in sessions.values())}


def write_results(path, level, args, history, info, figures):
    """results/levelN.json: the session record, the flags, the history, the level's `figures`, the seconds and every
    session. Returns the dict written."""
    results = {"level": level, **info, "args": vars(args), "history": history, **figures,
               "seconds": time.time() - info["started"], **run_sessions(history, info)}
    write_json(path, results)
    return results


def write_per_image(results_dir, level, view_logits, labels, temperature=1.0):
    """results/levelN_per_image.npz beside levelN.json: each test image's label, predicted class, whether it is
    right, its confidence and its exact NLL at `temperature` (evaluate.per_image), so that `level4.py --summary`
    compares the levels on the same images without running a model again. Plain arrays, no pickle: it loads with
    np.load(path, allow_pickle=False)."""
    from evaluate import per_image  # evaluate.py imports this module: imported where it is used
    figures = per_image(view_logits, labels, temperature)
    arrays = {"labels": labels.numpy(), "temperature": np.float64(temperature),
              **{name: values.numpy() for name, values in figures.items()}}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    files.atomic_write(Path(results_dir) / f"{level}_per_image.npz", buffer.getvalue())


def _finite(obj):
    """nan and inf -> None (JSON's null): json.dumps would write the bare NaN that strict JSON readers reject."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {key: _finite(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(value) for value in obj]
    return obj


def _refuse(constant):
    raise ValueError(f"{constant} is not strict JSON")


def read_json(path):
    """A JSON file read back as strictly as write_json writes it: bare NaN and Infinity (which json.loads accepts)
    and a path that is not a regular file (a named pipe would block the read for ever) raise ValueError."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} is not a regular file")
    return json.loads(path.read_text(), parse_constant=_refuse)


def write_json(path, obj):
    files.atomic_write(path, (json.dumps(_finite(obj), indent=2, allow_nan=False) + "\n").encode())


def table_text(heading, columns, rows):
    """A Markdown table under `heading` (which names the command, device and commit), each row a list of cells."""
    lines = [heading, "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    lines += ["| " + " | ".join(f"{c:.4f}" if isinstance(c, float) else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_table(path, heading, columns, rows):
    """table_text written to `path`; returns the text."""
    text = table_text(heading, columns, rows)
    files.atomic_write(path, (text + "\n").encode())
    return text

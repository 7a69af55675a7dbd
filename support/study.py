"""Level 4's studies, run through `python level4.py --ablate` and `--summary`: the ablation grid (the recipe scaled
down, each row switching one technique off, over paired seeds, with a 95 % interval and a verdict per row; rows
that change only the measurement reuse the baseline's checkpoints) and the summary across levels and seeds; and
the robustness report of Level 4's final test. They train nothing themselves: `run_ablation` calls the level's own
`main` for every trained (row, seed). Called by level4.py: add_arguments, check_arguments, run, robustness."""
import argparse
import json
import math
import os
from pathlib import Path

import torch

import common
import evaluate
from support import evidence, records, run as runner
from support.errors import UserError
from support.files import check_writable, load_checkpoint, remove_orphans

# --quick: the study's part of Level 4's smoke run
QUICK = {"corruption_images": 16, "ablate_sizes": [48], "ablate_epochs": 1}


def add_arguments(parser):
    """Level 4's robustness, ablation and summary flags, in their own groups."""
    robust = parser.add_argument_group("robustness: CIFAR-10-C-style corruptions (evaluate.py --corruptions)")
    robust.add_argument("--corruption-images", type=runner.non_negative_int,
                        help="test images per corruption and severity in the final report, 0 = no report (default: "
                             "all of the test set: 75 passes over it)")
    studies = parser.add_argument_group("ablation and summary")
    studies.add_argument("--ablate", action="store_true", help="run the ablation grid, not one run (default: off)")
    studies.add_argument("--ablate-epochs", type=runner.positive_int, default=6,
                         help="--epochs of each ablation run; every other phase scales with it (default: 6)")
    # One run's test top-1 varies by about 0.17 points at 97 % on 10,000 images (binomial; Jordan 2024): a few tenths
    # of a point between techniques needs paired seeds, as torchvision's recipe work uses 3-5 runs per change.
    studies.add_argument("--ablate-seeds", type=runner.positive_int, default=3,
                         help="seeds per trained row, paired (default: 3)")
    studies.add_argument("--ablate-sizes", type=runner.number(int, at_least=32), nargs="+", default=[128, 160, 224],
                         help="the input sizes of the img_size_N rows, each a trained row of the recipe at N px "
                              "(default: 128 160 224)")
    studies.add_argument("--ablate-rows", nargs="+", metavar="ROW", help="only these rows, and baseline (default: all)")
    studies.add_argument("--summary", action="store_true", help="only write results/summary.{md,png} (default: off)")


def check_arguments(args):
    """The study's --quick sizes, then the checks of its flags against each other and Level 4's."""
    if args.quick:
        vars(args).update(QUICK)
    grid = ablation_grid(args)
    unknown = sorted(set(args.ablate_rows or []) - set(grid))
    if unknown:
        raise UserError(f"unknown --ablate-rows {' '.join(unknown)}: choose among {' '.join(grid)}")
    if args.ablate_rows and not args.ablate:
        raise UserError("--ablate-rows needs --ablate")
    if args.ablate and (args.resume or "RANK" in os.environ):
        raise UserError("--ablate runs its rows itself: one process (python, not torchrun), no --resume")
    if args.ablate and args.ablate_epochs > args.epochs:
        raise UserError(f"--ablate-epochs scales the recipe down: at most --epochs ({args.epochs}), got "
                        f"{args.ablate_epochs}")


def run(args, train):
    """--summary, or --ablate with `train` (level4.main) for every trained (row, seed)."""
    if args.summary:
        return write_summary(args)
    return run_ablation(args, train)


def robustness(model, test_set, device, args, temperature):
    """Level 4's final report on the generated CIFAR-10-C-style corruptions: the first --corruption-images test
    images, one view at the fitted T; None with --corruption-images 0. README, "Robustness"."""
    if args.corruption_images == 0:
        return None
    from support import corruptions  # 75 passes over the test set: imported only where they run
    corruption_set = common.CifarDataset(test_set.images[:args.corruption_images],
                                         test_set.labels[:args.corruption_images])
    return corruptions.corruption_report(model, corruption_set, device, args.img_size, temperature=temperature)

def scaled_recipe(args):
    """The full recipe's phases scaled by --ablate-epochs / --epochs: head, cosine, SWA (or final) epochs and the
    unfreezing calendar, each rounded to whole epochs and kept at 1 or more where the recipe has the phase; the
    warmups (fractions of an epoch) scaled as they are. A row then runs a shorter copy of the same schedule."""
    factor = args.ablate_epochs / args.epochs
    scaled = {"epochs": args.ablate_epochs}
    for name in ("head_epochs", "swa_epochs", "final_epochs", "unfreeze_every"):
        scaled[name] = 0
        if getattr(args, name) > 0:  # a phase the recipe has keeps at least one epoch
            scaled[name] = max(1, math.floor(getattr(args, name) * factor + 0.5))
    for name in ("warmup_epochs", "unfreeze_warmup_epochs"):
        scaled[name] = getattr(args, name) * factor
    return scaled

def ablation_grid(args):
    """The declared grid: each trained row switches one technique of the full recipe off, or changes the input size
    (no_swa runs Level 3's final low-LR epochs in the SWA phase's place: the same budget); each evaluation row changes
    only how the baseline's checkpoints are measured. {name: (change, evaluation_only)}."""
    swa_epochs = scaled_recipe(args)["swa_epochs"]
    trained = {"baseline": {}, "no_randaugment": {"randaug_n": 0}, "no_mixup_cutmix": {"mix_prob": 0.0},
               "no_label_smoothing": {"label_smoothing": 0.0}, "no_random_erasing": {"erase_prob": 0.0},
               "no_ema": {"ema_decay": 0.0}, "no_swa": {"swa_epochs": 0, "final_epochs": swa_epochs},
               "no_progressive_unfreezing": {"unfreeze_every": 0},
               **{f"img_size_{size}": {"img_size": size} for size in args.ablate_sizes if size != args.img_size}}
    measured = {}
    for tta_set in common.TTA_SETS:
        if tta_set != args.tta_set:  # the baseline's own set is the baseline
            measured["no_tta" if tta_set == "none" else f"tta_{tta_set}"] = {"tta_set": tta_set}
    measured.update({"no_temperature": {"temperature": "off"}, "bn_clean": {"bn_stats": "clean"}})
    grid = {name: (change, False) for name, change in trained.items()}
    grid.update({name: (change, True) for name, change in measured.items()})
    return grid

def measure_row(change, checkpoint_path, datasets, device, args):
    """An evaluation row on one seed: the baseline's best checkpoint measured with `change` (other TTA views, T = 1,
    or BatchNorm statistics recomputed on clean training images), on the test and validation sets."""
    train_set, val_set, test_set = datasets
    checkpoint = load_checkpoint(checkpoint_path)
    model = common.build_model("none", args.dropout).to(device, memory_format=torch.channels_last)
    model.load_state_dict(checkpoint["model"])
    if change.get("bn_stats") == "clean":
        clean_set = common.bn_images(train_set, common.BN_IMAGES)
        common.recompute_bn(model, clean_set, device, args.img_size, args.batch_size)
    tta_set = change.get("tta_set", args.tta_set)
    temperature = 1.0
    if change.get("temperature") != "off":
        temperature = common.applied_temperature(checkpoint["temperatures"][tta_set])
    views = common.TTA_SETS[tta_set]
    test, _ = evaluate.report(model, test_set, device, args.img_size, views, temperature, args.tta_average)
    one_view, _ = evaluate.report(model, test_set, device, args.img_size)
    _, val_acc1 = evaluate.loss_and_accuracy(model, val_set, device, args.img_size)  # one view, as a trained row's
    return {"acc1": one_view["acc1"], "tta_acc1": test["acc1"], "ece": test["ece"], "val_acc1": val_acc1}

def run_ablation(args, train):
    """Every trained row (or each of --ablate-rows, and the baseline) a real run of the scaled recipe, `train(args)`
    (level4.main), with each of --ablate-seeds seeds, the same seeds for every row; the evaluation rows from the
    baseline's checkpoint of each seed, no retraining. Runs done earlier with the same settings are kept. Writes
    results/ablation.{json,md,png}."""
    path = Path(args.results_dir) / "ablation.json"
    runner.set_stop_hint("run the same --ablate command again (finished rows are reused)")  # not --resume
    remove_orphans([args.results_dir], ".ablation.*.tmp", min_age_s=60)
    try:
        runs = records.read_json(path)["runs"] if path.exists() else []
        done = {(run["name"], run["seed"]): _finished_run(run) for run in runs}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise UserError(f"{path} is not this suite's ablation table ({type(error).__name__}): move it away")
    recipe, seeds = scaled_recipe(args), [args.seed + i for i in range(args.ablate_seeds)]
    print(f"ablation recipe (--epochs {args.epochs} scaled by {args.ablate_epochs / args.epochs:.3g}): "
          + ", ".join(f"{name} {value:g}" for name, value in recipe.items()) + f"; seeds {seeds}", flush=True)
    chosen = ["baseline", *(args.ablate_rows or ablation_grid(args))]
    grid = {name: row for name, row in ablation_grid(args).items() if name in chosen}
    table = {}
    for name, (change, evaluation_only) in grid.items():
        table[name] = []
        for seed in seeds:
            row_args = ablation_arguments(args, recipe, name, seed)
            if not evaluation_only:
                vars(row_args).update(change)
            # The row's settings as JSON stores them (tuples become lists), to compare with a finished run's.
            settings = json.loads(json.dumps({k: v for k, v in vars(row_args).items() if not k.startswith("ablate")}))
            earlier = done.get((name, seed))
            if earlier is None or earlier["args"] != settings or earlier["change"] != change:
                done[(name, seed)] = ablation_run(name, seed, change, evaluation_only, row_args, settings, args,
                                                  train)
                records.write_json(path, {"runs": list(done.values())})  # an interrupted grid keeps finished runs
            table[name].append(done[(name, seed)])
    return write_ablation_table(table, path, args)

def _finished_run(run):
    """A run of ablation.json as the table reads it back: its settings, and each figure a number or null (a figure
    with no validation); else KeyError or TypeError, and the file is not reused."""
    if not isinstance(run["args"], dict) or not isinstance(run["change"], dict):
        raise TypeError("args and change must be objects")
    for figure in ("val_acc1", "acc1", "tta_acc1", "ece"):
        if run[figure] is not None:
            number(run[figure])
    return run

def ablation_arguments(args, recipe, name, seed):
    """The flags of one (row, seed) run: the scaled recipe, the seed, its own folders, no corruption report."""
    row_args = argparse.Namespace(**vars(args))
    vars(row_args).update(recipe)
    row_args.ablate = False
    row_args.seed = seed
    row_args.overwrite = True  # a changed row reruns in its folder
    row_args.corruption_images = 0  # 75 passes over the test set per run: measure robustness with evaluate.py
    row_args.checkpoint_dir = f"{args.checkpoint_dir}/ablation/{name}/seed{seed}"
    row_args.results_dir = f"{args.results_dir}/ablation/{name}/seed{seed}"
    return row_args

def ablation_run(name, seed, change, evaluation_only, row_args, settings, args, train):
    """One (row, seed): a training run of the scaled recipe, or the baseline's checkpoint of that seed measured."""
    print(f"ablation row {name}, seed {seed}: {change or 'the full recipe'}", flush=True)
    if evaluation_only:
        device = runner.resolve_device(args.device)
        datasets = common.cifar10_datasets(args.data_dir, seed, args.subset, args.eval_subset)
        baseline = Path(args.checkpoint_dir) / "ablation" / "baseline" / f"seed{seed}" / "level4_best.pth"
        figures = measure_row(change, baseline, datasets, device, row_args)
        info = records.run_info(device)
    else:
        result = train(row_args)
        figures = {"acc1": result["test"]["acc1"], "tta_acc1": result["test_tta"]["acc1"],
                   "ece": result["test_tta"]["ece"], "val_acc1": result["best_val_acc"]}
        info = result
    return {"name": name, "seed": seed, "change": change, "evaluation_only": evaluation_only, "args": settings,
            **figures, "device": info["device"], "commit": info["commit"]}

def write_ablation_table(table, path, args):
    """results/ablation.{md,png}: per row, mean ± SD over the seeds and the paired difference from the baseline
    (evidence.paired_difference: 95 % Student t interval, verdict). Choose on validation, report test."""
    baseline = table["baseline"]
    lines, plotted = [], []
    for name, runs in table.items():
        evaluation_only = runs[0]["evaluation_only"]
        cells = {}
        for figure in ("val_acc1", "acc1", "tta_acc1", "ece"):
            mean, sd = evidence.mean_sd([run[figure] for run in runs])
            cells[figure] = f"{mean:.4f}" if sd is None else f"{mean:.4f} ± {sd:.4f}"
        accuracy = evidence.paired_difference([r["tta_acc1"] for r in baseline], [r["tta_acc1"] for r in runs])
        ece = evidence.paired_difference([r["ece"] for r in baseline], [r["ece"] for r in runs], higher_is_better=False)
        kind = "evaluation only" if evaluation_only else "trained"
        lines.append([name, kind, json.dumps(runs[0]["change"]), len(runs), cells["val_acc1"], cells["acc1"],
                      cells["tta_acc1"], interval_text(accuracy), accuracy["verdict"], cells["ece"],
                      interval_text(ece)])
        if name != "baseline":
            plotted.append((name, accuracy, evaluation_only))
    runs = [run for row_runs in table.values() for run in row_runs]
    devices = ", ".join(sorted({run["device"] for run in runs}))
    commits = ", ".join(sorted({run["commit"] for run in runs}))  # finished runs are reused across commits
    heading = (f"Ablation (`python level4.py --ablate`): --ablate-epochs {args.ablate_epochs}, seeds "
               f"{[run['seed'] for run in baseline]}, on {devices}, commit {commits}. Differences are paired by "
               f"seed (row - baseline) with a 95 % Student t interval.")
    print(records.write_table(path.with_suffix(".md"), heading,
                               ["row", "kind", "change", "n", "val acc1", "test acc1", "test acc1 (TTA)",
                                "Δ TTA acc1 [95 % CI]", "verdict", "ECE (TTA, T)", "Δ ECE [95 % CI]"], lines))
    if plotted:
        names, differences, evaluation_only = zip(*plotted)
        plot_differences(list(names), [d["mean"] for d in differences], [d["low"] for d in differences],
                                  [d["high"] for d in differences], list(evaluation_only), path.with_suffix(".png"),
                                  "ablation: test top-1 (TTA), row - baseline, paired by seed")
    return table

def interval_text(difference):
    """"+0.0012 [-0.0008, +0.0031]", or the mean alone where one seed gives no interval."""
    if difference["low"] is None:
        return f"{difference['mean']:+.4f}"
    return f"{difference['mean']:+.4f} [{difference['low']:+.4f}, {difference['high']:+.4f}]"

def mean_sd_cell(values):
    """"0.9512 ± 0.0011" over several runs, the bare figure for one, "-" for none."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean, sd = evidence.mean_sd(values)
    if sd is None:
        return f"{mean:.4f}"
    return f"{mean:.4f} ± {sd:.4f}"

def number(value):
    """A figure read from a results JSON: a finite int or float, else TypeError (a string, a bool, a list)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{value!r} is not a finite number")
    return float(value)

def optional(section, key):
    """A figure that a results JSON may lack (no TTA, no temperature, no corruptions): None, or number()."""
    if section is None or section.get(key) is None:
        return None
    return number(section[key])

def write_summary(args):
    """results/summary.{md,png}: one row per level, pooling results/levelN.json with results/seed*/levelN.json (the
    same level run with other seeds) as mean ± SD over n runs; a malformed file is skipped, with a warning."""
    results_dir, runs = Path(args.results_dir), {}
    remove_orphans([results_dir], ".summary.*.tmp", min_age_s=60)
    for path in sorted([*results_dir.glob("level[1-4].json"), *results_dir.glob("seed*/level[1-4].json")]):
        try:
            r = records.read_json(path)  # strict: a bare NaN or Infinity is no figure
            corruption = r.get("corruptions_generated") or {}  # {}: not measured
            run = {"test acc1": number(r["test"]["acc1"]), "with TTA": optional(r.get("test_tta"), "acc1"),
                   "ECE": number(r["test"]["ece"]), "ECE (T)": optional(r.get("test_calibrated"), "ece"),
                   "corruption acc": optional(corruption, "mean_acc1"), "epochs": len(r["history"]),
                   "seconds": number(r["seconds"]), "device": str(r["device"]), "commit": str(r["commit"])}
            runs.setdefault(path.stem, []).append(run)  # after the reads: a malformed file adds nothing
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            print(f"warning: skipped {path}: not a results file of this suite ({type(error).__name__})")
    if not runs:
        raise UserError(f"no readable levelN.json in {args.results_dir}: run a level first")
    check_writable(args.results_dir, "--results-dir")  # one line, not a traceback between the table and plot
    figures = ["test acc1", "with TTA", "ECE", "ECE (T)", "corruption acc"]
    rows, mean_acc1 = [], []
    for level, level_runs in sorted(runs.items()):
        values = {key: [run[key] for run in level_runs] for key in level_runs[0]}  # each figure over the runs
        mean_acc1.append(evidence.mean_sd(values["test acc1"])[0])
        epochs = ", ".join(map(str, sorted(set(values["epochs"]))))
        rows.append([level, *[mean_sd_cell(values[key]) for key in figures], len(level_runs), epochs,
                     f"{evidence.mean_sd(values['seconds'])[0]:.0f}", ", ".join(sorted(set(values["device"]))),
                     ", ".join(sorted(set(values["commit"])))])
    print(records.write_table(results_dir / "summary.md", "Summary (`python level4.py --summary`): mean ± SD over "
                               "n runs (results/levelN.json and results/seed*/levelN.json)",
                               ["level", *figures, "n", "epochs", "seconds", "device", "commit"], rows))
    plot_bars([r[0] for r in rows], mean_acc1, results_dir / "summary.png", "", "top-1 (mean over runs)")
    return rows


# ---- Plots of the studies -------------------------------------------------------------------------------------
def plot_bars(names, values, path, title, xlabel, reference=None):
    """Horizontal bars (ablation rows, levels); `reference` draws the baseline as a dashed line."""
    fig, axis = evaluate._pyplot().subplots(figsize=(8, 0.45 * len(names) + 1.5))
    axis.barh(range(len(names)), values)
    for i, value in enumerate(values):
        axis.text(value, i, f" {value:.4f}", va="center", fontsize=8)
    if reference is not None:
        axis.axvline(reference, color="red", linestyle="--", label="baseline")
        axis.legend(loc="lower right")
    axis.set(yticks=range(len(names)), yticklabels=names, xlabel=xlabel)
    axis.set_xlim(max(0.0, min(values) - 0.05), min(1.0, max(values) + 0.05))
    axis.invert_yaxis()
    evaluate._save(fig, path, title)


def plot_differences(names, means, lows, highs, evaluation_only, path, title):
    """Each row's mean paired difference from the baseline with its 95 % CI as an error bar (none where a low is
    None: n = 1), a zero line; evaluation-only rows (no retraining) in another colour."""
    fig, axis = evaluate._pyplot().subplots(figsize=(8, 0.45 * len(names) + 1.5))
    handles = {}  # one legend entry per colour
    for i, (mean, low, high, eval_only) in enumerate(zip(means, lows, highs, evaluation_only)):
        error = None if low is None else [[mean - low], [high - mean]]
        colour, label = ("tab:orange", "evaluation only") if eval_only else ("tab:blue", "trained")
        handles.setdefault(label, axis.errorbar(mean, i, xerr=error, fmt="o", color=colour, capsize=4))
        if low is None:
            axis.text(mean, i, "  n = 1, no interval", va="center", fontsize=8)
    axis.axvline(0.0, color="black", linewidth=1)
    axis.legend(handles.values(), handles.keys(), loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2,
                frameon=False)  # above the axes: clear of every error bar
    axis.set(yticks=range(len(names)), yticklabels=names, xlabel="difference from the baseline (95 % CI)")
    axis.invert_yaxis()
    axis.grid(axis="x", alpha=0.3)
    evaluate._save(fig, path, title)

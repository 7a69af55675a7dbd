"""Level 4's studies, run through `python level4.py --ablate` and `--summary`: the ablation grid (the recipe scaled
down, each row switching one technique off, over paired seeds, with 95 % intervals and a verdict per row decided on
validation, Holm-corrected over the rows; rows that change only the measurement reuse the baseline's checkpoints)
and the summary across levels and seeds, each level against the one before on the same test images; and the
robustness report of Level 4's final test. They train nothing themselves: `run_ablation` calls the level's own
`main` for every trained (row, seed). Called by level4.py: add_arguments, prepare_arguments, run, robustness."""
import argparse
import collections
import json
import math
import os
import zipfile
from pathlib import Path

import numpy as np
import torch

import common
import evaluate
from support import evidence, files, records, run as runner
from support.errors import UserError
from support.files import check_writable, load_checkpoint, remove_orphans

# --quick: the study's part of Level 4's smoke run; with --ablate, the whole grid in about 7 minutes on 2 CPU cores:
# two seeds (the fewest a paired interval takes), 64 images to validate and test on
QUICK = {"corruption_images": 16, "ablate_sizes": [48], "ablate_epochs": 1}
QUICK_ABLATION = {"ablate_seeds": 2, "eval_subset": 64}


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


def prepare_arguments(args):
    """The study's --quick sizes, then the checks of its flags against each other and Level 4's."""
    if args.quick:
        vars(args).update(QUICK)
    if args.quick and args.ablate:
        vars(args).update(QUICK_ABLATION)
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
    if args.ablate and args.train_on_all:
        raise UserError("--ablate decides on validation: not with --train-on-all, which holds no image out")
    if args.ablate and args.ema_decay > 0 and scaled_recipe(args)["ema_decay"] <= 0:
        raise UserError(f"--ema-decay {args.ema_decay:g} scaled to --ablate-epochs leaves a horizon under one step: "
                        f"use an --ema-decay above {1 - args.ablate_epochs / args.epochs:g}")


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

def scaled_recipe(args, steps_per_epoch=None):
    """The full recipe's phases scaled by f = --ablate-epochs / --epochs: head, cosine, SWA (or final) epochs and the
    unfreezing calendar, each rounded to whole epochs and kept at 1 or more where the recipe has the phase; the
    warmups (fractions of an epoch) scaled as they are. What the averages average is kept, not shortened with the
    run: the EMA's horizon, about 1 / (1 - decay) steps, covers the same share of it ((1 - decay) / f), and, given
    the steps per epoch, the SWA phase takes the full recipe's number of snapshots (--swa-every in steps,
    scaled_swa_every). A row then runs a shorter copy of the same schedule."""
    factor = args.ablate_epochs / args.epochs
    scaled = {"epochs": args.ablate_epochs}
    for name in ("head_epochs", "swa_epochs", "final_epochs", "unfreeze_every"):
        scaled[name] = 0
        if getattr(args, name) > 0:  # a phase the recipe has keeps at least one epoch
            scaled[name] = max(1, math.floor(getattr(args, name) * factor + 0.5))
    for name in ("warmup_epochs", "unfreeze_warmup_epochs"):
        scaled[name] = getattr(args, name) * factor
    scaled["ema_decay"] = args.ema_decay  # 0: no EMA
    if args.ema_decay > 0:  # 0.999 (a horizon of 1,000 steps) at f = 0.2: 0.995 (200 steps)
        scaled["ema_decay"] = 1 - (1 - args.ema_decay) / factor
    if steps_per_epoch is not None and scaled["swa_epochs"] > 0:
        scaled["swa_every"] = scaled_swa_every(args, scaled["swa_epochs"], steps_per_epoch)
    return scaled

def swa_snapshots(swa_epochs, swa_every, steps_per_epoch):
    """The snapshots an SWA phase of `swa_epochs` averages: one at the end of every `swa_every` steps of the phase,
    or of every epoch with swa_every 0 (level4.py's train_one_epoch)."""
    return swa_epochs * steps_per_epoch // (swa_every or steps_per_epoch)

def scaled_swa_every(args, scaled_swa_epochs, steps_per_epoch):
    """The --swa-every (steps) at which the scaled SWA phase of S steps takes the full recipe's K snapshots (at most
    one per step): S // K. That gives exactly K wherever a whole-step cadence can (always for S >= K (K + 1): 30
    steps for K = 5), a few more elsewhere; never fewer."""
    wanted = max(1, swa_snapshots(args.swa_epochs, args.swa_every, steps_per_epoch))
    phase_steps = scaled_swa_epochs * steps_per_epoch
    return max(1, phase_steps // min(wanted, phase_steps))

def averages_text(args, recipe, steps_per_epoch):
    """What the scaled recipe's averages hold, in a sentence, against the full recipe's."""
    text = "no SWA"
    if recipe["swa_epochs"] > 0:
        snapshots = swa_snapshots(recipe["swa_epochs"], recipe["swa_every"], steps_per_epoch)
        text = (f"SWA snapshots {snapshots}, one every {recipe['swa_every']} steps (the full recipe's: "
                f"{swa_snapshots(args.swa_epochs, args.swa_every, steps_per_epoch)})")
    if recipe["ema_decay"] > 0:
        text += (f"; EMA decay {recipe['ema_decay']:.4g}, a horizon of about {1 / (1 - recipe['ema_decay']):.0f} "
                 f"steps (the full recipe's: {1 / (1 - args.ema_decay):.0f}, the same share of a longer run)")
    return text

def ablation_grid(args):
    """The declared grid: each trained row switches one technique of the full recipe off, or changes the input size
    or the SWA LR; each evaluation row changes only how the baseline's run is measured (its checkpoints, no
    retraining). {name: (change, evaluation_only)}. The SWA phase has two rows: no_swa_schedule trains Level 3's
    tail in its place (schedule and average switched off together), swa_weights_off measures the baseline's own
    raw weights at the end of its run (the average alone switched off)."""
    swa_epochs = scaled_recipe(args)["swa_epochs"]
    trained = {"baseline": {}, "no_randaugment": {"randaug_n": 0}, "no_mixup_cutmix": {"mix_prob": 0.0},
               "no_label_smoothing": {"label_smoothing": 0.0}, "no_random_erasing": {"erase_prob": 0.0},
               "no_ema": {"ema_decay": 0.0}, "no_swa_schedule": {"swa_epochs": 0, "final_epochs": swa_epochs},
               "swa_lr_low": {"swa_lr": args.lr / 20}, "no_progressive_unfreezing": {"unfreeze_every": 0},
               **{f"img_size_{size}": {"img_size": size} for size in args.ablate_sizes if size != args.img_size}}
    measured = {"swa_weights_off": {"weights": "raw, last epoch"}}
    for tta_set in common.TTA_SETS:
        if tta_set != args.tta_set:  # the baseline's own set is the baseline
            measured["no_tta" if tta_set == "none" else f"tta_{tta_set}"] = {"tta_set": tta_set}
    measured.update({"no_temperature": {"temperature": "off"}, "bn_clean": {"bn_stats": "clean"}})
    grid = {name: (change, False) for name, change in trained.items()}
    grid.update({name: (change, True) for name, change in measured.items()})
    return grid

# What the baseline has and each row lacks: a verdict is about it ("RandAugment helps"), the row switching it off.
TECHNIQUES = {"baseline": "the full recipe", "no_randaugment": "RandAugment", "no_mixup_cutmix": "MixUp/CutMix",
              "no_label_smoothing": "label smoothing", "no_random_erasing": "random erasing", "no_ema": "the EMA",
              "no_swa_schedule": "the SWA phase", "swa_weights_off": "weight averaging",
              "no_progressive_unfreezing": "progressive unfreezing", "no_temperature": "temperature scaling",
              "bn_clean": "BatchNorm statistics as chosen"}
# What a row isolates, where its name alone does not say (printed under the table).
ISOLATES = {
    "no_swa_schedule": "trained: Level 3's tail (the cosine down to --min-lr, then --final-lr) for the SWA phase's "
                       "epochs; the SWA schedule and its average switched off together",
    "swa_weights_off": "evaluation only: the baseline's own run, its raw weights at the end (level4_last.pth, "
                       "BatchNorm as trained, a T fitted for them) instead of the weights validation chose (SWA, EMA "
                       "or raw): the averaging (and that choice) alone. Its validation figure skips the choice on "
                       "validation that the baseline's had, so the decision leans towards averaging; the test "
                       "columns do not",
    "swa_lr_low": "trained: the SWA phase at --lr / 20 instead of the baseline's --swa-lr",
    "no_temperature": "evaluation only: T = 1; T does not change a prediction, so top-1 cannot move: read its ECE",
    "bn_clean": "evaluation only: the chosen weights' BatchNorm statistics recomputed on clean training images"}

def technique(name, args):
    """The technique of a row's verdict: what the baseline has and the row lacks (or has otherwise)."""
    if name.startswith("img_size_"):
        return f"{args.img_size} px (vs {name.removeprefix('img_size_')})"
    if name == "no_tta":
        return f"TTA {args.tta_set}"
    if name.startswith("tta_"):
        return f"TTA {args.tta_set} (vs {name.removeprefix('tta_')})"
    if name == "swa_lr_low":
        return f"--swa-lr {args.swa_lr:g} (vs {args.lr / 20:g})"
    return TECHNIQUES.get(name, name)

def load_weights(path, args, device):
    """(model, checkpoint) of a checkpoint of this suite's Level 4."""
    checkpoint = load_checkpoint(path)
    model = common.build_model("none", args.dropout).to(device, memory_format=torch.channels_last)
    model.load_state_dict(checkpoint["model"])
    return model, checkpoint

def validation_acc1(model, val_set, device, args, tta_set):
    """Every row's decision figure, measured alike for trained and evaluation rows: validation top-1 with the views of
    the row's TTA set, predicted as its test figure is (the T = 1 average), so that a decision can see TTA. Returns
    (top-1, V x N view logits, labels)."""
    view_logits, labels = common.predict(model, val_set, device, args.img_size, common.TTA_SETS[tta_set])
    result, _ = evaluate.from_logits(view_logits, labels, 1.0, args.tta_average)
    return result["acc1"], view_logits, labels

def measure_row(change, checkpoint_dir, datasets, device, args):
    """An evaluation row on one seed: the baseline's run in `checkpoint_dir` measured with `change`: other TTA views,
    T = 1, the chosen weights' BatchNorm statistics recomputed on clean training images (as evaluate.py --bn-stats
    clean: in the stages that trained at its epoch; bn_clean names the candidate and the stages), or the raw weights
    at the end of the run (level4_last.pth, with a T of their own fitted on validation, as the final test fits one)."""
    train_set, val_set, test_set = datasets
    raw_last = change.get("weights") == "raw, last epoch"
    checkpoint_name = "level4_best.pth"
    if raw_last:
        checkpoint_name = "level4_last.pth"
    model, checkpoint = load_weights(Path(checkpoint_dir) / checkpoint_name, args, device)
    measured = {}
    if change.get("bn_stats") == "clean":
        clean_set = common.bn_images(train_set, common.BN_IMAGES)
        stages = evaluate.recompute_trained_bn(model, checkpoint, clean_set, device, args.img_size, args.batch_size)
        measured = {"model_source": checkpoint["model_source"], "bn_stages": stages}
    tta_set = change.get("tta_set", args.tta_set)
    val_acc1, val_logits, val_labels = validation_acc1(model, val_set, device, args, tta_set)
    if change.get("temperature") == "off":
        temperature = 1.0
    elif raw_last:  # never calibrated
        fitted, at_bound = common.fit_temperature(val_logits, val_labels, args.tta_average)
        temperature = common.applied_temperature({"temperature": fitted, "at_bound": at_bound})
    else:
        temperature = common.applied_temperature(checkpoint["temperatures"][tta_set])
    views = common.TTA_SETS[tta_set]
    test_logits, test_labels = common.predict(model, test_set, device, args.img_size, views)  # each view once
    test, _ = evaluate.from_logits(test_logits, test_labels, temperature, args.tta_average)
    one_view, _ = evaluate.from_logits(test_logits[[views.index("identity")]], test_labels)  # every set has it
    model_source = "raw (last epoch)" if raw_last else checkpoint["model_source"]
    return {"acc1": one_view["acc1"], "tta_acc1": test["acc1"], "ece": test["ece"], "val_acc1": val_acc1,
            "model_source": model_source, "swa_snapshots": None, **measured}  # None: the baseline's run, see its row

def run_ablation(args, train):
    """Every trained row (or each of --ablate-rows, and the baseline) a real run of the scaled recipe, `train(args)`
    (level4.main), with each of --ablate-seeds seeds, the same seeds for every row; the evaluation rows from the
    baseline's checkpoints of each seed, no retraining. Runs done earlier with the same settings are kept. Writes
    results/ablation.{json,md,png}."""
    path = Path(args.results_dir) / "ablation.json"
    runner.set_stop_hint("run the same --ablate command again (finished rows are reused)")  # not --resume
    remove_orphans([args.results_dir], ".ablation.*.tmp", min_age_s=60)
    try:
        runs = records.read_json(path)["runs"] if path.exists() else []
        done = {(run["name"], run["seed"]): _finished_run(run) for run in runs}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise UserError(f"{path} is not this suite's ablation table ({type(error).__name__}): move it away")
    train_set, _, _ = common.cifar10_datasets(args.data_dir, args.seed, args.subset)
    steps_per_epoch = len(train_set) // args.batch_size  # one process (--ablate refuses torchrun), drop_last
    if steps_per_epoch == 0:
        raise UserError(f"{len(train_set)} training images hold no batch of --batch-size {args.batch_size}: lower it")
    recipe, seeds = scaled_recipe(args, steps_per_epoch), [args.seed + i for i in range(args.ablate_seeds)]
    print(f"ablation recipe (--epochs {args.epochs} scaled by {args.ablate_epochs / args.epochs:.3g}): "
          + ", ".join(f"{name} {value:g}" for name, value in recipe.items()) + f"; seeds {seeds}; "
          + averages_text(args, recipe, steps_per_epoch), flush=True)
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
                records.write_json(path, {"runs": list(done.values())})  # an interrupted grid keeps its runs
            table[name].append(done[(name, seed)])
    return write_ablation_table(table, path, args, list(done.values()))

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
    """One (row, seed): a training run of the scaled recipe, or the baseline's checkpoints of that seed measured;
    either way, the validation top-1 of the weights measured, at the row's TTA views (validation_acc1)."""
    print(f"ablation row {name}, seed {seed}: {change or 'the full recipe'}", flush=True)
    device = runner.resolve_device(args.device)
    datasets = common.cifar10_datasets(args.data_dir, seed, args.subset, args.eval_subset)  # the seed's split
    if evaluation_only:
        baseline = Path(args.checkpoint_dir) / "ablation" / "baseline" / f"seed{seed}"
        figures = measure_row(change, baseline, datasets, device, row_args)
        info = records.run_info(device)
    else:
        result = train(row_args)
        model, _ = load_weights(Path(row_args.checkpoint_dir) / "level4_best.pth", row_args, device)
        val_acc1, _, _ = validation_acc1(model, datasets[1], device, row_args, row_args.tta_set)
        figures = {"acc1": result["test"]["acc1"], "tta_acc1": result["test_tta"]["acc1"],
                   "ece": result["test_tta"]["ece"], "val_acc1": val_acc1, "model_source": result["model_source"],
                   "swa_snapshots": result["swa_snapshots"]}
        info = result
    return {"name": name, "seed": seed, "change": change, "evaluation_only": evaluation_only, "args": settings,
            **figures, "device": info["device"], "commit": info["commit"]}

ALPHA = 0.05  # the family-wise error rate that Holm's adjustment holds over the rows of the table
# The paired differences of each row from the baseline: (key in ablation.json, per-run figure, higher is better).
DIFFERENCES = (("delta_val_acc1", "val_acc1", True), ("delta_tta_acc1", "tta_acc1", True), ("delta_ece", "ece", False))

def row_differences(table):
    """{row: {key: paired difference from the baseline (evidence.paired_difference, its verdict on the row left
    out)}} for the rows other than the baseline; then the Holm-adjusted p of delta_val_acc1 over those rows, and the
    verdict on each row's technique taken from it (evidence.verdict): the decision, on validation."""
    baseline, rows = table["baseline"], {}
    for name, runs in table.items():
        if name == "baseline":
            continue
        rows[name] = {}
        for key, figure, higher_is_better in DIFFERENCES:
            difference = evidence.paired_difference([r[figure] for r in baseline], [r[figure] for r in runs],
                                                    higher_is_better)
            rows[name][key] = {k: v for k, v in difference.items() if k != "verdict"}
    adjusted = evidence.holm([row["delta_val_acc1"]["p"] for row in rows.values()])
    for row, p_holm in zip(rows.values(), adjusted):
        decision = row["delta_val_acc1"]
        decision["p_holm"] = p_holm
        row["verdict"] = evidence.verdict(decision["mean"], p_holm, ALPHA, sd=decision["sd"])  # the row removes it
    return rows

def verdict_text(technique_name, verdict):
    """"RandAugment helps", "the EMA: within noise"."""
    if verdict in ("helps", "hurts"):
        return f"{technique_name} {verdict}"
    return f"{technique_name}: {verdict}"

def write_ablation_table(table, path, args, runs=None):
    """results/ablation.{json,md,png}: per row, mean ± SD over the seeds and the paired differences from the baseline
    (95 % Student t intervals). The verdict on the row's technique is a decision on validation: the row's paired
    t-test of validation top-1, Holm-adjusted over the rows (row_differences); the test columns report, they do not
    decide. `runs`: every run of ablation.json (default: the table's)."""
    differences = row_differences(table)
    lines, plotted = [], []
    for name, row_runs in table.items():
        cells = {}
        for figure in ("val_acc1", "acc1", "tta_acc1", "ece"):
            cells[figure] = mean_sd_cell([run[figure] for run in row_runs])
        chosen = collections.Counter(str(run["model_source"]) for run in row_runs)  # raw, ema, swa over the seeds
        sources = ", ".join(f"{source} ×{count}" for source, count in chosen.items())
        snapshots = sorted({str(run["swa_snapshots"]) for run in row_runs if run["swa_snapshots"] is not None})
        kind = "evaluation only" if row_runs[0]["evaluation_only"] else "trained"
        change = json.dumps(row_runs[0]["change"])
        if name == "bn_clean":  # whose weights got the clean statistics, seed by seed
            change += " on " + "/".join(str(run["model_source"]) for run in row_runs)
        start = [name, technique(name, args), kind, change, len(row_runs), cells["val_acc1"]]
        end = [cells["acc1"], cells["tta_acc1"]]
        if name == "baseline":
            lines.append([*start, "-", "-", "-", *end, "-", cells["ece"], "-", sources, ", ".join(snapshots) or "-"])
            continue
        row = differences[name]
        p_holm = row["delta_val_acc1"]["p_holm"]
        lines.append([*start, interval_text(row["delta_val_acc1"]), "-" if p_holm is None else f"{p_holm:.3g}",
                      verdict_text(technique(name, args), row["verdict"]), *end, interval_text(row["delta_tta_acc1"]),
                      cells["ece"], interval_text(row["delta_ece"]), sources, ", ".join(snapshots) or "-"])
        row["technique"], row["isolates"] = technique(name, args), ISOLATES.get(name)
        plotted.append((name, row["delta_val_acc1"], row_runs[0]["evaluation_only"]))
    all_runs = [run for row_runs in table.values() for run in row_runs]
    tested = sum(row["delta_val_acc1"]["p"] is not None for row in differences.values())
    devices = ", ".join(sorted({run["device"] for run in all_runs}))
    commits = ", ".join(sorted({run["commit"] for run in all_runs}))  # finished runs are reused across commits
    heading = (f"Ablation (`python level4.py --ablate`): --ablate-epochs {args.ablate_epochs}, seeds "
               f"{[run['seed'] for run in table['baseline']]}, on {devices}, commit {commits}. Differences are paired "
               f"by seed (row - baseline) with a 95 % Student t interval. **The verdict is a decision on validation**: "
               f"the paired t-test of Δ val acc1 (top-1 at the row's TTA views), its p adjusted by Holm over the "
               f"{tested} rows tested (family-wise error {ALPHA:g}); it is about the technique the baseline has and "
               f"the row lacks. The test columns are the report, not the decision.")
    columns = ["row", "technique", "kind", "change", "n", "val acc1 (decides)", "Δ val acc1 [95 % CI]",
               "p (Holm)", "verdict (validation, Holm)", "test acc1", "test acc1 (TTA)",
               "Δ test acc1 (TTA) [95 % CI], report", "ECE (TTA, T)", "Δ ECE [95 % CI], report", "weights chosen",
               "SWA snapshots"]
    notes = [f"- {name}: {ISOLATES[name]}" for name in table if name in ISOLATES]
    text = records.table_text(heading, columns, lines)
    if notes:
        text += "\n\nWhat a row isolates:\n" + "\n".join(notes)
    files.atomic_write(path.with_suffix(".md"), (text + "\n").encode())
    print(text)
    records.write_json(path, {"runs": runs or all_runs, "rows": differences, "decision": {
        "figure": "val_acc1", "test": "paired t", "correction": "holm", "alpha": ALPHA, "rows_tested": tested}})
    if plotted:
        names, decided, evaluation_only = zip(*plotted)
        plot_differences(list(names), [d["mean"] for d in decided], [d["low"] for d in decided],
                         [d["high"] for d in decided], list(evaluation_only), path.with_suffix(".png"),
                         "ablation: validation top-1 (the decision), row - baseline, paired by seed")
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

def load_per_image(path):
    """A levelN_per_image.npz (records.write_per_image) as tensors: evaluate.per_image's dict, the labels, the T."""
    with np.load(path, allow_pickle=False) as arrays:
        return {name: torch.from_numpy(arrays[name]) for name in arrays.files}

def level_pairs(results_dir):
    """"Each level against the one before": in results/ and each results/seed*/, level N + 1 against level N (N = 1,
    2, 3) from their levelN_per_image.npz alone (no model runs again), where both were tested on the same images
    (the same number, the same labels): evidence.compare_figures, as `evaluate.py levelN+1_best.pth --compare
    levelN_best.pth` computes it (one view, each at its own T, 2,000 resamples, seed 0). Returns (the pairs
    compared, a line for each pair that could not be)."""
    pairs, notes = [], []
    for folder in [results_dir, *sorted(path for path in results_dir.glob("seed*") if path.is_dir())]:
        where = folder.relative_to(results_dir).as_posix()  # "." for results/ itself
        for level in (1, 2, 3):
            before, after = f"level{level}", f"level{level + 1}"
            paths = [folder / f"{name}_per_image.npz" for name in (before, after)]
            missing = [path.name for path in paths if not path.is_file()]
            if missing:
                if all((folder / f"{name}.json").is_file() for name in (before, after)):  # both levels ran
                    notes.append(f"{after} vs {before} ({where}): not compared, no {' or '.join(missing)} (a run "
                                 f"from before per-image files: run it again)")
                continue
            try:
                figures = [load_per_image(path) for path in paths]
            except (ValueError, OSError, KeyError, zipfile.BadZipFile) as error:
                notes.append(f"{after} vs {before} ({where}): not compared, unreadable ({type(error).__name__})")
                continue
            labels = [f["labels"] for f in figures]
            if len(labels[0]) != len(labels[1]):
                notes.append(f"{after} vs {before} ({where}): not compared, tested on different images "
                             f"({len(labels[1])} and {len(labels[0])} test images)")
                continue
            if not torch.equal(labels[0], labels[1]):
                notes.append(f"{after} vs {before} ({where}): not compared, tested on different images "
                             f"({len(labels[0])} each, with other labels)")
                continue
            compared = evidence.compare_figures(figures[1], figures[0])  # A = the later level, B = the one before
            pairs.append({"folder": where, "a": after, "b": before, "num_images": len(labels[0]),
                          "temperatures": [float(figures[1]["temperature"]), float(figures[0]["temperature"])],
                          **compared})
    return pairs, notes

def level_pairs_text(pairs, notes):
    """The summary's section "Each level against the one before", in Markdown."""
    rows = []
    for pair in pairs:
        acc1, ece, mcnemar = pair["acc1"], pair["ece"], pair["mcnemar"]
        rows.append([pair["folder"], f"{pair['a']} vs {pair['b']}", pair["num_images"], acc1["b"], acc1["a"],
                     interval_text_ci(acc1), ece["b"], ece["a"], interval_text_ci(ece),
                     f"{mcnemar['b']} / {mcnemar['c']}", f"{mcnemar['p']:.3g}"])
    heading = ("## Each level against the one before\n\nOn the same test images, from results/levelN_per_image.npz "
               "(no model run again): one view, each level at its own T (Level 4 its fitted T, the others T = 1), as "
               "`evaluate.py levelN+1_best.pth --compare levelN_best.pth` measures it. Δ = the later level - the one "
               "before, with a paired-bootstrap 95 % interval (2,000 resamples); McNemar's exact test on the images "
               "exactly one of the two gets right (b: the later level only, c: the earlier only).")
    text = records.table_text(heading, ["folder", "pair", "images", "top-1 before", "top-1 after",
                                        "Δ top-1 [95 % CI]", "ECE before", "ECE after", "Δ ECE [95 % CI]",
                                        "McNemar b / c", "p"], rows)
    if notes:
        text += "\n\n" + "\n".join(f"- {note}" for note in notes)
    return text

def interval_text_ci(figure):
    """"+0.0120 [+0.0040, +0.0200]" of a compare_figures entry."""
    low, high = figure["ci95"]
    return f"{figure['difference']:+.4f} [{low:+.4f}, {high:+.4f}]"

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
    """results/summary.{md,json,png}: one row per level, pooling results/levelN.json with results/seed*/levelN.json
    (the same level run with other seeds) as mean ± SD over n runs; a malformed file is skipped, with a warning.
    Then "Each level against the one before" (level_pairs), from the per-image files of the final tests."""
    results_dir, runs = Path(args.results_dir), {}
    remove_orphans([results_dir], ".summary.*.tmp", min_age_s=60)
    for path in sorted([*results_dir.glob("level[1-4].json"), *results_dir.glob("seed*/level[1-4].json")]):
        try:
            r = records.read_json(path)  # strict: a bare NaN or Infinity is no figure
            corruption = (r.get("corruptions_generated") or {}).get("benchmark") or {}  # {}: not measured
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
    text = records.table_text("Summary (`python level4.py --summary`): mean ± SD over n runs (results/levelN.json "
                              "and results/seed*/levelN.json)",
                              ["level", *figures, "n", "epochs", "seconds", "device", "commit"], rows)
    pairs, notes = level_pairs(results_dir)
    text += "\n\n" + level_pairs_text(pairs, notes)
    files.atomic_write(results_dir / "summary.md", (text + "\n").encode())
    records.write_json(results_dir / "summary.json", {"level_pairs": pairs, "not_compared": notes})
    print(text)
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

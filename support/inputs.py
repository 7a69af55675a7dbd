"""What evaluate.py is given, checked before the work: the input size and TTA set a checkpoint stores (one line
where the command line would refuse them), and its output files, named by run and source and claimed so that
another checkpoint's results are kept unless --overwrite. Called by evaluate.py (main, compare, robustness)."""
from pathlib import Path

import common
from support import records, run
from support.errors import UserError
from support.files import check_writable, remove_orphans


def input_size(args, train_args, path):
    """--img-size, else the checkpoint's own, else 224; a stored size that the command line would refuse (not an
    integer from 32 to run.LIMITS' bound) is one line, not a measurement at 8 px or a traceback."""
    if args.img_size:
        return args.img_size
    size = train_args.get("img_size") or 224
    largest = run.LIMITS["img_size"][0]
    if type(size) is not int or not 32 <= size <= largest:
        raise UserError(f"{path} stores img_size {size!r}, which is not a size in px from 32 to {largest}: give "
                        f"--img-size")
    return size


def tta_set_of(args, train_args, path):
    """The TTA set measured: --tta's, or with plain --tta the checkpoint's own (a name unknown here is one line)."""
    tta_set = args.tta
    if args.tta == "default":
        tta_set = train_args.get("tta_set", "flip")
    if not isinstance(tta_set or "none", str) or (tta_set or "none") not in common.TTA_SETS:
        raise UserError(f"{path} names the TTA set {tta_set!r}, unknown here: give --tta with one of "
                        f"{', '.join(common.TTA_SETS)}")
    return tta_set


def output_path(args, tta_set):
    """--out/eval_RUN-NAME_SPLIT[_tta-SET][_bn-SOURCE].json, eval_RUN-NAME_corruptions[-official][_tta-SET].json or
    predictions_RUN-NAME.json: named by the checkpoint's folder and name, checked before the work; another
    checkpoint's file is kept unless --overwrite."""
    name = f"{Path(args.checkpoint).resolve().parent.name}-{Path(args.checkpoint).stem}"
    tag = f"eval_{name}_{args.split}"
    if args.corruptions:
        tag = f"eval_{name}_corruptions"
    if args.corruptions and args.corruptions != "generated" and holds_npy(Path(args.corruptions)):
        tag += "-official"  # the official files' results beside the generated ones', not over them
    if tta_set:
        tag += f"_tta-{tta_set}"
    if args.bn_stats != "checkpoint":
        tag += f"_bn-{args.bn_stats}"
    if args.images:
        tag = f"predictions_{name}"
    return claim_output(args, tag, {"checkpoint": args.checkpoint})


def holds_npy(folder):
    """Whether --corruptions DIR holds the official .npy files (in it or its CIFAR-10-C/), as support.corruptions'
    read_official finds them; without any, the generated corruptions are measured."""
    return any(folder.glob("*.npy")) or any((folder / "CIFAR-10-C").glob("*.npy"))


def claim_output(args, tag, owner):
    """--out/TAG.json, checked before the work: the folder writable, an earlier TAG.json of other checkpoints
    (`owner`: {"checkpoint": A} or {"a": A, "b": B}, as the JSON records them) kept unless --overwrite, the temp
    files of a killed write of TAG removed."""
    path = Path(args.out) / f"{tag}.json"
    check_writable(args.out, "--out")
    try:
        earlier = records.read_json(path) if path.exists() else owner
        earlier = {key: earlier[key] for key in owner}
        same = all(Path(earlier[key]).resolve() == Path(value).resolve() for key, value in owner.items())
    except (OSError, ValueError, KeyError, TypeError):
        earlier, same = {"file": "something else (not a JSON of evaluate.py)"}, False
    if not args.overwrite and not same:
        raise UserError(f"{path} holds the results of {' vs '.join(map(str, earlier.values()))}: keep them with "
                        f"another --out, or replace them with --overwrite")
    remove_orphans([args.out], f".{tag}.*.tmp", min_age_s=60)  # no lock here: one in flight is younger
    return path

"""How a script runs: the runner that turns every failure into one line (run_main), Ctrl-C and SIGTERM, the flags
every level shares and the argparse types that check a flag's range beside it, the start of a run (torchrun's
processes, the device, the run folder and its lock) and its end. Each level calls these in one line per concern:
run.add_arguments, run.prepare_args, run.start, run.rank_zero_first, run.worker_init, run.check_finite, run.barrier,
run.finish, run.run_main; evaluate.py and support.benchmark use run_main, number and resolve_device."""
import argparse
import contextlib
import math
import os
import re
import signal
import sys
from pathlib import Path

import torch

from support import files
from support.errors import UserError, fail

# The signal that is stopping this process, once one came; whether further ones are ignored; what to do next
_STOP = {"signal": None, "held": False, "hint": None}
WRITE_WAIT_S = 300  # how long a stop waits for the checkpoint write in flight (472 MB at Level 4) before it gives up


# ---- The runner: one line and exit code 2 for every failure a user can fix ----------------------------------------
def run_main(main, parser, validate):
    """Parse, check each flag against LIMITS, validate, run: a UserError, a bad flag, a full or read-only disk, a
    folder removed mid-run or running out of memory is one line and exit code 2; Ctrl-C and SIGTERM one line and 128 +
    the signal's number (the first one's: a second is ignored while the stop finishes its writes)."""
    parser.error = _one_line_usage_error
    args = parser.parse_args()
    check_flags(args)
    handlers = {signum: signal.signal(signum, _on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
    _STOP.update(signal=None, held=False, hint=None)
    files.RUN.update(last=None, interrupted=False)  # last: set by a level's start_run (evaluate.py has none)
    try:
        try:
            validate(args)
            return main(args)
        except UserError as error:
            fail(error)
        except OSError as error:  # a write outside atomic_write, e.g. a plot
            if error.errno not in files.WRITE_ERRNOS and not files.folder_gone(error):
                raise
            fail(files.write_error(error.filename or "a file", error))
        except (MemoryError, RuntimeError) as error:  # torch.OutOfMemoryError is a RuntimeError
            _fail_runtime(error, args)
            raise
    # Ctrl-C or SIGTERM during main, or while a handler above was writing its line (torchrun's SIGTERM reaches a
    # rank whose peer is gone as it reads the error); one signal at most: the first one holds the rest
    except KeyboardInterrupt:
        _stop(_STOP["signal"] or signal.SIGINT)
    finally:
        # A script that stops on a signal (or whose torchrun peer is gone) keeps ignoring further ones until the
        # process has ended: a Ctrl-C during Python's exit would print "Exception ignored in threading._shutdown",
        # torchrun's SIGTERM would replace exit code 2. Called in-process (the tests), the handlers are put back.
        if not _STOP["held"] or main.__module__ != "__main__":
            for signum, handler in handlers.items():
                signal.signal(signum, handler)


def _one_line_usage_error(message):
    """argparse's usage and error as one line: "argument --wd/--weight-decay: must be ..." -> "--weight-decay must
    be ..." (the flag's long name), other messages after "FLAG: "."""
    found = re.match(r"argument (?:[^:\s]+/)*([^:\s]+): (.*)", message, re.DOTALL)
    if found and found[2].startswith("must be"):
        message = f"{found[1]} {found[2]}"
    elif found:
        message = f"{found[1]}: {found[2]}"
    fail(f"{message} (see --help)")


def _fail_runtime(error, args):
    """The one line for the RuntimeErrors a user can fix; returns for any other, which the caller re-raises."""
    text = str(error).lower()
    if "dataloader worker" in text and _STOP["signal"]:  # it ended in the same Ctrl-C or SIGTERM
        _stop(_STOP["signal"])
    rank = os.environ.get("RANK")  # set by torchrun
    if rank not in (None, "0") and (isinstance(error, torch.distributed.DistBackendError) or _lost_peer(text)):
        _hold_signals()  # torchrun sends SIGTERM to the ranks left: this one is ending already
        sys.exit(2)  # torchrun: rank 0 stopped (with its own line) or was killed while this rank waited for it
    if rank == "0" and _lost_peer(text):
        _hold_signals()
        fail(f"torchrun: another process of this run stopped or was killed ({text.splitlines()[0][:80]}); its line "
             f"or torchrun's table says why{_resume_hint()}")
    memory = isinstance(error, MemoryError) or "out of memory" in text or "allocate memory" in text
    if "overflow" in text and "storage size" not in text:  # e.g. AdamW given --lr 1e38
        fail(f"a number overflowed ({text.splitlines()[0][:80]}): lower --lr/--head-lr")
    if memory or "storage size" in text:  # "storage size calculation overflowed": a tensor larger than any memory
        sizes = [f"--{flag.replace('_', '-')} {getattr(args, flag)}" for flag in ("batch_size", "img_size")
                 if getattr(args, flag, None) is not None]
        fail(f"out of memory at {' and '.join(sizes) or 'these sizes'}: halve --batch-size, or lower --img-size")


def _lost_peer(text):
    """Whether an error's text says that another process of the run is gone: gloo's (from a barrier, or from DDP's
    all-reduce inside backward), NCCL's."""
    gone = ("connection closed by peer", "connection reset by peer", "broken pipe", "remote process exited",
            "communicator was aborted")
    return any(phrase in text for phrase in gone)


# ---- Ctrl-C and SIGTERM (what Colab, Kaggle, Slurm, Kubernetes send at preemption) -------------------------------
def _on_signal(signum, frame):
    _STOP["signal"] = signum
    _hold_signals()  # a second Ctrl-C or SIGTERM must not break the stop while it finishes the checkpoint write
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # a DataLoader worker that ends now is part of the stop, no error
    if files.RUN["saving"]:  # inside CheckpointWriter.save: raised there once the save is in its thread's hands
        files.RUN["interrupted"] = True
        return
    raise KeyboardInterrupt


def _hold_signals():
    """SIGINT and SIGTERM ignored from now on (the first signal set the exit code). SIG_IGN, not a Python function:
    Python's exit resets a function handler to the default (a second SIGTERM then killed the process as it unloaded
    torch, exit code -15), but keeps SIG_IGN."""
    _STOP["held"] = True
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def set_stop_hint(text):
    """What the line of a Ctrl-C or SIGTERM tells the user to do next, instead of a level's --resume (the ablation:
    run the same command again)."""
    _STOP["hint"] = text


def _stop(signum):
    """Ctrl-C or SIGTERM: the checkpoint write in flight finished first (further signals ignored), then one line and
    exit code 128 + signum; a write that failed before the stop has its own line first."""
    _hold_signals()
    error = _finish_writes(signum)
    hint = _resume_hint()
    if _STOP["hint"]:
        hint = f"; {_STOP['hint']}"
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        hint = ""  # the write error's line says what is kept and what to do
    print(f"\n{signal.Signals(signum).name}: interrupted{hint}", file=sys.stderr)
    sys.exit(128 + signum)


def _resume_hint():
    """"; --resume it" where a level's levelN_last.pth holds a finished epoch, nothing where no run folder is open."""
    last = files.RUN["last"]
    if last is None:
        return ""
    if not last.is_file():
        return f"; no epoch had finished: there is no {last.name} to resume, start anew"
    return f"; {last} holds the last finished epoch: --resume {last}"


def _finish_writes(signum):
    """A stop first lets the save in flight end, up to WRITE_WAIT_S: levelN_last.pth then holds the last finished
    epoch. Returns the write's UserError if it failed (the previous file is whole), else None. A write stuck longer
    (a hung network disk) is abandoned: one line, and the process ends without waiting for its thread."""
    for writer in files.RUN["writers"]:
        if writer.busy():
            print("stopping: waiting for the checkpoint write in flight (a second Ctrl-C is ignored)", flush=True)
        try:
            writer.wait(timeout=WRITE_WAIT_S)
        except UserError as error:
            return error
        except TimeoutError:
            print(f"\n{signal.Signals(signum).name}: interrupted; the checkpoint write in flight did not end in "
                  f"{WRITE_WAIT_S} s and was abandoned: the previous checkpoint files are whole", file=sys.stderr)
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(128 + signum)  # sys.exit would wait for the writer thread at the interpreter's exit
    return None


def worker_init(worker_id):
    """DataLoader workers leave SIGINT to the main process, which stops them; SIGTERM ends them quietly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


# ---- Flags: a range beside each flag, the run-flag group every level shares ---------------------------------------
def number(kind, above=None, at_least=None, at_most=None, below=None, why=None):
    """An argparse `type`: the text parsed as `kind` (int or float), finite (nan passes every `x <= 0` check), and
    within each bound given; else argparse's one line, which names the flag (and `why`, the reason of a bound)."""
    bounds = [(above, ">", lambda v, b: v > b), (at_least, ">=", lambda v, b: v >= b),
              (at_most, "<=", lambda v, b: v <= b), (below, "<", lambda v, b: v < b)]
    wanted = " and ".join(f"{sign} {bound}" for bound, sign, _ in bounds if bound is not None)
    reason = ""
    if why:
        reason = f": {why}"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number (got {value})")
        for bound, _, holds in bounds:
            if bound is not None and not holds(value, bound):
                raise argparse.ArgumentTypeError(f"must be {wanted} (got {value}){reason}")
        return value
    return parse


# The largest value of a flag that can run, and why, checked by run_main in every script that has the flag (the
# levels, evaluate.py, the benchmark, the ablation's sizes): beyond these a run hangs, forks without end, overflows or
# asks for more memory than any machine has, rather than failing.
LIMITS = {
    "img_size": (1024, "the 32-px images hold no more detail, and activation memory grows with its square"),
    "ablate_sizes": (1024, "the 32-px images hold no more detail, and activation memory grows with its square"),
    "workers": (max(8, 4 * (os.cpu_count() or 1)), f"more than 4 worker processes per CPU core (this machine has "
                f"{os.cpu_count()}) only compete for the cores, and each holds a copy of the data"),
    # torchvision's RandAugment draws each operation from 14; its paper searched N in 1..3 (Cubuk et al. 2020, 4.1)
    "randaug_n": (14, "RandAugment draws from 14 operations, and each is one more transform per image"),
    # AdamW's decoupled decay multiplies each weight by 1 - lr x wd at every step (Loshchilov & Hutter 2019)
    "weight_decay": (10, "AdamW multiplies each weight by 1 - lr x wd at every step; common values are 0.01 to 0.1"),
    "warmup_epochs": (1000, "a warmup in epochs, longer than any run: larger values overflow the step count"),
    "unfreeze_warmup_epochs": (1000, "a warmup in epochs, longer than any run: larger values overflow the step count"),
}


def check_flags(args):
    """Each flag of LIMITS that `args` has, within its bound, and a --data-dir that is a folder (not a file, which
    would be taken for a missing dataset and downloaded): else argparse's one line, naming the flag and why."""
    data_dir = getattr(args, "data_dir", None)
    if data_dir is not None and Path(data_dir).exists() and not Path(data_dir).is_dir():
        _one_line_usage_error(f"argument --data-dir: {data_dir} is a file, not the folder holding "
                              f"cifar-10-batches-py")
    for name, (at_most, why) in LIMITS.items():
        values = getattr(args, name, None)
        if not isinstance(values, list):
            values = [values]
        for value in values:
            if value is not None and value > at_most:
                _one_line_usage_error(f"argument --{name.replace('_', '-')}: must be <= {at_most} (got {value}): "
                                      f"{why}")


positive_int = number(int, above=0)
non_negative_int = number(int, at_least=0)
positive_float = number(float, above=0)
non_negative_float = number(float, at_least=0)
fraction = number(float, at_least=0, at_most=1)  # a probability, a share


def add_arguments(parser):
    """The run flags of every level, in one group: the device, the seed, resume, the folders, logging, compile,
    torchrun's --sync-bn and the smoke run."""
    run = parser.add_argument_group("run")
    run.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, cpu (default: auto)")
    run.add_argument("--seed", type=number(int, at_least=0, below=2**32),  # numpy's generators take no other seed
                     default=0, help="seeds the split, the augmentation and the head (default: 0)")
    run.add_argument("--resume", help="continue from a levelN_last.pth, at the epoch after it (default: off)")
    run.add_argument("--overwrite", action="store_true", help="replace an earlier run's checkpoints (default: off)")
    run.add_argument("--checkpoint-dir", default="checkpoints", help="where .pth files go (default: checkpoints)")
    run.add_argument("--results-dir", default="results", help="where JSON and PNG results go (default: results)")
    run.add_argument("--print-freq", type=non_negative_int, default=50,
                     help="a step line every N steps, 0 = none (default: 50)")
    # Dynamo guards on requires_grad: each change of what trains compiles the forward and backward again.
    run.add_argument("--compile", action="store_true",
                     help="torch.compile the model, again each time what trains changes (default: off)")
    run.add_argument("--sync-bn", action="store_true", help="torchrun, GPUs: BatchNorm over all GPUs (default: off)")
    run.add_argument("--quick", action="store_true", help="smoke run: 128 images, 32 px, in quick/ (default: off)")
    return run


def prepare_args(args, quick):
    """--quick's sizes applied first (in quick/ folders, which keep real runs' files apart), then what every level
    needs: at least one batch of training images; Level 4's SWA averaging at least once."""
    if args.quick:
        vars(args).update(quick, checkpoint_dir=f"{args.checkpoint_dir}/quick", results_dir=f"{args.results_dir}/quick")
    train_images = 45000  # the training split; all 50,000 with --train-on-all
    if args.train_on_all:
        train_images = 50000
    if args.subset is not None:
        train_images = min(train_images, args.subset)
    if train_images < args.batch_size:
        raise UserError(f"need --subset >= --batch-size: {train_images} training images, --batch-size "
                        f"{args.batch_size}")
    _check_swa_every(args, train_images)


def _check_swa_every(args, train_images):
    """Level 4: --swa-every N steps must fit in the SWA phase, or SWA would never average (and never be chosen)."""
    if not getattr(args, "swa_every", 0) or not args.swa_epochs:
        return
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun: each process takes 1 / world_size of a batch
    steps_per_epoch = train_images // world_size // max(1, args.batch_size // world_size)  # DistributedSampler
    phase_steps = args.swa_epochs * steps_per_epoch
    if args.swa_every > phase_steps:
        raise UserError(f"--swa-every {args.swa_every} is more steps than the SWA phase has ({phase_steps}: "
                        f"--swa-epochs {args.swa_epochs} x {steps_per_epoch} steps): SWA would never average; give "
                        f"at most {phase_steps}, or 0 (once per epoch)")


# ---- torchrun: the start and the end of a run ---------------------------------------------------------------------
def resolve_device(name):
    """'auto': CUDA, else Apple's MPS, else the CPU; any other name is checked and taken as given."""
    if name == "auto":
        name = "cpu"
        if torch.backends.mps.is_available():
            name = "mps"
        if torch.cuda.is_available():
            name = "cuda"
    try:
        torch.ones(1, device=name).sum().item()  # a value computed and read back: "meta" holds no data
    except (RuntimeError, AssertionError) as error:
        raise UserError(f"device {name!r} is not usable here ({str(error)[:80]}): use --device cpu or auto") from None
    return torch.device(name)


def start(level, args):
    """The start of a run, before any data is read: torchrun's process group (one process without torchrun), the
    device, the run folder and its lock (rank 0; its error stops every rank), the checks that need the device or the
    number of processes. Returns (rank, world_size, device)."""
    rank, world_size, device = _setup_distributed(args)
    _start_ranks(level, args, rank, world_size)
    if args.sync_bn and device.type != "cuda":
        raise UserError(f"--sync-bn needs CUDA GPUs (the device is {device.type}): leave it out")
    if args.batch_size % world_size or args.batch_size // world_size < 2:
        raise UserError("--batch-size must be a multiple of the processes, 2 or more each")
    return rank, world_size, device


def _setup_distributed(args):
    """torchrun starts one process per GPU and sets RANK, LOCAL_RANK and WORLD_SIZE; without it, one process."""
    if "RANK" not in os.environ:
        return 0, 1, resolve_device(args.device)
    rank, world_size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    device = torch.device("cpu")
    if torch.cuda.is_available() and args.device != "cpu":
        device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)  # first: else every process opens a context on GPU 0
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def _start_ranks(level, args, rank, world_size):
    """files.start_run on rank 0; under torchrun its error stops every rank: rank 0 prints it, the others exit 2
    silently (rather than with the traceback of a barrier whose peer is gone)."""
    message = [None]
    try:
        if rank == 0:
            files.start_run(level, args.checkpoint_dir, args.results_dir, args.resume, args.overwrite)
    except UserError as error:
        message = [str(error)]
    if world_size > 1:
        torch.distributed.broadcast_object_list(message)  # from rank 0
    if message[0] and rank == 0:
        raise UserError(message[0])
    if message[0]:
        sys.exit(2)


@contextlib.contextmanager
def rank_zero_first(rank, world_size):
    """Under torchrun, rank 0 runs the block first (it downloads CIFAR-10 if it is missing), then the others."""
    if world_size > 1 and rank > 0:
        torch.distributed.barrier()
    yield
    if world_size > 1 and rank == 0:
        torch.distributed.barrier()


def check_finite(epoch, lr, *losses):
    """Once per epoch (a check in every step would make the CPU wait for the GPU): a loss that became nan or inf
    stops the run with one line, before any checkpoint of it is written."""
    bad = [loss for loss in losses if not math.isfinite(loss)]
    if bad:
        raise UserError(f"loss became {bad[0]} in epoch {epoch + 1} (lr {lr:.0e}): lower --lr/--head-lr")


def barrier(world_size):
    """Under torchrun, the other ranks wait here while rank 0 validates and saves."""
    if world_size > 1:
        torch.distributed.barrier()


def finish(writer, world_size):
    """The end of the epochs: the last checkpoints on disk before the final test reads them (their write error, if
    any, raised here), and torchrun's process group closed."""
    writer.wait()
    if world_size > 1:
        torch.distributed.destroy_process_group()

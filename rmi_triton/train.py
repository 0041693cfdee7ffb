"""Training tool: ``python -m rmi_triton.train`` (console script ``rmi-train``).

    python -m rmi_triton.train --model deeplabv3plus --backbone resnet18 --dataset synthetic \\
        --loss rmi --batch-size 8 --iterations 2000 --out runs/rmi

What it does:

* SGD (momentum 0.9, weight decay 1e-4) with the paper's poly schedule
  ``lr = base_lr * (1 - it / total) ** 0.9`` (base 0.007).
* Losses: ``ce`` (``F.cross_entropy`` with ignore_index), ``bce`` (the sigmoid BCE
  pixel term of docs/DESIGN.md section 1 alone), ``rmi`` (``RMILoss``: BCE + RMI, paper
  defaults, tunable with the ``--rmi-*`` options).
* Reproducible data: the sample order of epoch ``e`` is ``randperm`` from a
  generator seeded with ``seed + e``; item ``i`` of epoch ``e`` is augmented with a
  generator seeded by ``(seed, e, i)``. Nothing depends on worker count or timing,
  so a resumed run (``--resume``) repeats the uninterrupted one exactly.
* Checkpoints (``<out>/last.pt``, atomic) hold the network, its build config and
  the training state (iteration, optimizer, grad scaler, RNG states, loss history).
* SIGINT / SIGTERM: the current iteration finishes, a checkpoint is written, exit 0.
* A non-finite loss or weight stops the run (exit 1) naming the iteration; the last
  checkpoint stays as it was and non-finite weights are never written.
* Distributed: under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK set) the network is
  wrapped in DistributedDataParallel (gloo on CPU, nccl on CUDA); each rank takes a
  disjoint shard of every epoch's permutation; ``--batch-size`` is per process.
  Only rank 0 prints and writes files.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
import uuid
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, default_collate

from .checkpoint import CONFIG_KEYS, CheckpointError, load_checkpoint, save_checkpoint
from .files import atomic_writer, folder_problem, json_safe, remove_leftovers, same_file, write_atomically
from .metrics import SegmentationMetrics, format_table

_AUG_TAG = 0x41554721  # keeps the augmentation streams apart from other users of the seed
_ORDER_TAG = 0x4F524452  # likewise the data orders
# How an epoch's order is seeded: 2 (since train_config saves it), its own stream of (seed,
# epoch); 1, the checkpoints before, seed + epoch -- run `seed` then saw run `seed + 1`'s
# orders one epoch early. A resumed run keeps its checkpoint's.
DATA_ORDER = 2

# Options a resumed run must share with the run it continues (the schedule, the optimizer's
# settings, the precision; `_schedule_config` adds the loss's).
_SCHEDULE_KEYS = ("model", "backbone", "output_stride", "dataset", "num_classes", "loss", "batch_size",
                  "crop", "iterations", "epochs", "seed", "lr", "lr_power", "augment", "train_length",
                  "momentum", "weight_decay", "amp")


# ---------------------------------------------------------------------------------------------
# command line

class _DefaultsHelp(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default (also of options without a help text), except None: those
    options' help says what they mean."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is argparse.SUPPRESS or "%(default)" in text:
            return action.help
        return f"{text} (default: %(default)s)".strip()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rmi-train", description=__doc__.split("\n\n")[0],
                                formatter_class=_DefaultsHelp)
    g = p.add_argument_group("network")
    g.add_argument("--model", default="deeplabv3plus", choices=("deeplabv3", "deeplabv3plus", "pspnet"),
                   help="segmentation network")
    g.add_argument("--backbone", default="resnet101",
                   choices=("resnet18", "resnet34", "resnet50", "resnet101"), help="dilated ResNet backbone")
    g.add_argument("--output-stride", type=int, default=16, choices=(8, 16), help="backbone output stride")
    g.add_argument("--pretrained", default=None, help="local torchvision ResNet state dict for the backbone")
    g.add_argument("--sync-bn", action="store_true",
                   help="SyncBatchNorm across processes (torchrun on CUDA devices only)")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="synthetic", choices=("synthetic", "voc", "camvid"),
                   help="synthetic: the embedded scenes, generated on the fly; voc, camvid: from --data-root")
    g.add_argument("--data-root", default=None, help="dataset folder (voc / camvid)")
    g.add_argument("--num-classes", type=int, default=None,
                   help="synthetic only: classes incl. background (2..7, default 5); voc and camvid have 21 "
                        "and 11, which their labels fix")
    g.add_argument("--train-split", default="train",
                   help="voc: train, trainval or train_aug (the SBD list the paper trains on); camvid: train, "
                        "val, test or trainval")
    g.add_argument("--val-split", default="val", help="split evaluated")
    g.add_argument("--train-length", type=int, default=None, help="synthetic only: number of training scenes")
    g.add_argument("--val-length", type=int, default=None,
                   help="synthetic only: validation scenes; other datasets: evaluate the first N")
    g.add_argument("--crop", type=int, default=None,
                   help="training crop (synthetic: rendered scene size); default: synthetic 128, voc 513, "
                        "camvid 360x480")
    aug = g.add_mutually_exclusive_group()
    aug.add_argument("--augment", dest="augment", action="store_true", default=None,
                     help="scale 0.5-2 / crop / flip (default: on for voc/camvid, off for synthetic)")
    aug.add_argument("--no-augment", dest="augment", action="store_false")
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")

    g = p.add_argument_group("loss")
    g.add_argument("--loss", default="rmi", choices=("ce", "bce", "rmi"),
                   help="ce: cross-entropy; bce: the sigmoid BCE pixel term alone; rmi: RMILoss (BCE + RMI)")
    g.add_argument("--rmi-radius", type=int, default=3, help="R, the region side (1..10)")
    g.add_argument("--rmi-pool", default="avg", choices=("avg", "max", "interp", "none"),
                   help="downsampling before the regions")
    g.add_argument("--rmi-pool-size", type=int, default=4, help="s (1..8)")
    g.add_argument("--rmi-weight", type=float, default=0.5, help="lambda")
    g.add_argument("--rmi-combine", default="weighted", choices=("weighted", "additive"),
                   help="weighted: lambda pixel + (1 - lambda) rmi; additive: pixel + lambda rmi")
    g.add_argument("--rmi-pixel-loss", default="bce", choices=("bce", "ce", "none"), help="the pixel term")
    g.add_argument("--rmi-probs", default="sigmoid", choices=("sigmoid", "softmax"),
                   help="probabilities the RMI term sees")
    g.add_argument("--rmi-exclude-ignored", action="store_true",
                   help="leave region vectors that touch an ignored pixel out of the statistics")
    g.add_argument("--rmi-backend", default="auto", choices=("auto", "torch", "triton"),
                   help="auto: Triton on CUDA where Triton >= 3.5 runs, PyTorch otherwise")

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=8, help="per process")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--iterations", type=int, default=None, help="total iterations (default 1000)")
    length.add_argument("--epochs", type=int, default=None, help="total epochs (alternative to --iterations)")
    g.add_argument("--lr", type=float, default=0.007, help="base learning rate")
    g.add_argument("--lr-power", type=float, default=0.9, help="poly schedule power")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay")
    g.add_argument("--amp", action="store_true",
                   help="autocast: bfloat16 on CPU, float16 + GradScaler on CUDA")

    g = p.add_argument_group("run")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    g.add_argument("--seed", type=int, default=0, help="seeds the initialisation, data order and augmentation")
    g.add_argument("--out", default="runs/train", help="output folder (checkpoint, log, metrics)")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N iterations (0: only at the end)")
    g.add_argument("--no-final-eval", action="store_true", help="skip the evaluation at the end")
    g.add_argument("--eval-batch-size", type=int, default=None, help="images a batch in evaluation "
                   "(default: --batch-size)")
    g.add_argument("--boundary-tolerance", type=int, default=2, help="px, for the boundary F-score")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N iterations (0: only at the end)")
    g.add_argument("--log-every", type=int, default=10, help="print a log line every N iterations")
    g.add_argument("--resume", default=None, help="checkpoint to continue from ('auto': <out>/last.pt if any)")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out that holds an earlier run (else refused)")
    g.add_argument("--stop-at", type=int, default=None,
                   help="stop (with a checkpoint) after this iteration; the schedule still spans --iterations")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p


MIN_CROP = 16  # px: the synthetic scenes' least size


def _launch_world() -> int:
    """Processes of the launch: torchrun's WORLD_SIZE, 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def _device_or_default(device_arg: Optional[str]) -> str:
    """--device, or the default: cuda where this torch has a CUDA device, else cpu."""
    return device_arg or ("cuda" if torch.cuda.is_available() else "cpu")

# --rmi-* flag -> RMIOptions field
_RMI_FLAGS = {"rmi_radius": "radius", "rmi_pool": "pool", "rmi_pool_size": "pool_size", "rmi_weight": "rmi_weight",
              "rmi_combine": "combine", "rmi_pixel_loss": "pixel_loss", "rmi_probs": "probs",
              "rmi_exclude_ignored": "exclude_ignored", "rmi_backend": "backend"}
# The --rmi-* options a resumed run must share (the engine may change: both compute the same loss).
_RMI_COMPARED = tuple(dest for dest in _RMI_FLAGS if dest != "rmi_backend")
# Saved in train_config since a later version: a checkpoint without them is not compared on them.
_LATER_KEYS = ("momentum", "weight_decay", "amp") + _RMI_COMPARED


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check the command line: a mistake ends here with a usage line that names the
    flag (exit 2), not with a traceback from deep inside the run."""
    parser = build_parser()
    if not _speaks_for_the_run():  # each rank checks its own flags and files: name the rank
        rank, error = os.environ.get("RANK"), parser.error
        parser.error = lambda message: error(f"rank {rank}: {message}")
    args = parser.parse_args(argv)
    if args.iterations is None and args.epochs is None:
        args.iterations = 1000
    for name, least in (("batch_size", 1), ("iterations", 1), ("epochs", 1), ("train_length", 1),
                        ("val_length", 1), ("eval_batch_size", 1), ("threads", 1), ("stop_at", 1),
                        ("workers", 0), ("eval_every", 0), ("save_every", 0), ("log_every", 0),
                        ("boundary_tolerance", 0), ("lr", 0), ("momentum", 0), ("weight_decay", 0),
                        ("lr_power", 0)):
        v = getattr(args, name)
        if v is not None and not v >= least:  # NaN too
            extra = " (--no-final-eval skips the evaluation)" if name == "val_length" else ""
            parser.error(f"--{name.replace('_', '-')} must be >= {least}, got {v}{extra}")
    if not 0 <= args.seed < 2 ** 32:  # numpy's global seed takes 32 bits
        parser.error(f"--seed must be in [0, 2**32), got {args.seed}")
    if args.crop is not None and args.crop < MIN_CROP:
        parser.error(f"--crop must be >= {MIN_CROP} px (the synthetic scenes' least size; the networks "
                     f"downsample 16-fold), got {args.crop}")
    if args.dataset == "synthetic" and args.train_length is not None and args.train_length < args.batch_size:
        parser.error(f"--train-length {args.train_length} does not fill one batch of --batch-size "
                     f"{args.batch_size}")
    if args.sync_bn and (_launch_world() < 2 or not _device_or_default(args.device).startswith("cuda")):
        parser.error("--sync-bn needs a distributed run (torchrun) on CUDA devices: PyTorch's SyncBatchNorm "
                     "does not run on CPU or in a single process")
    if args.batch_size == 1 and not args.sync_bn:
        parser.error("--batch-size 1: the networks' global-pooling branch gives BatchNorm one value per "
                     "channel in training; use 2 or more images a process (or --sync-bn across processes)")
    _check_paths(parser, args)
    if args.dataset != "synthetic":
        for name in ("num_classes", "train_length"):
            if getattr(args, name) is not None:  # refused, not ignored
                parser.error(f"--{name.replace('_', '-')} applies to the synthetic scenes only (--dataset "
                             f"{args.dataset} has {'its own classes' if name == 'num_classes' else 'its split'})")
        if args.augment is False and args.crop is not None:
            parser.error("--crop is the augmentation's random crop: with --no-augment the images go in whole "
                         f"(--dataset {args.dataset})")
    elif args.num_classes is None:
        args.num_classes = 5
    elif not 2 <= args.num_classes <= 7:
        parser.error(f"--num-classes must be in 2..7 for the synthetic scenes, got {args.num_classes}")
    if args.augment is None:  # resolved here, so that checkpoints record what the run does
        args.augment = args.dataset != "synthetic"
    check_device(parser, args.device)
    _check_rmi_flags(parser, args)
    _check_out(parser, args)
    return args


def _check_crop_fits(parser: argparse.ArgumentParser, args, opts) -> None:
    """The loss's pooled map must hold one R x R region. The training images are the --crop (the
    synthetic scenes' size, or the augmentation's crop; parse_args refuses it with --no-augment,
    where a real dataset's images go in whole) and the networks' logits are at that size. The
    default crops (128, 513, 360 x 480) hold the largest region at the coarsest pooling."""
    if args.crop is None:
        return
    h_low, w_low = opts.pooled_size(args.crop, args.crop)
    if h_low < opts.radius or w_low < opts.radius:
        parser.error(f"--crop {args.crop}: --rmi-pool {opts.pool} --rmi-pool-size {opts.pool_size} makes it "
                     f"{h_low} x {w_low}, smaller than the --rmi-radius {opts.radius} region; use a larger --crop, "
                     "a smaller --rmi-pool-size or a smaller --rmi-radius")


# what a run writes into its --out
RUN_FILES = ("last.pt", "log.jsonl", "metrics.json")


def _check_out(parser: argparse.ArgumentParser, args) -> None:
    problem = folder_problem(args.out, RUN_FILES)
    if problem:
        parser.error(f"--out {args.out!r} {problem}")
    if args.overwrite and args.resume is not None:
        parser.error(f"--overwrite starts afresh and --resume {args.resume} continues: pass one of them")
    if args.resume is None and not args.overwrite and os.path.isfile(os.path.join(args.out, "last.pt")):
        parser.error(f"--out {args.out} holds an earlier run (last.pt): continue it with --resume auto, "
                     "start over there with --overwrite (its checkpoint, log and metrics are removed), "
                     "or choose another --out")


def rmi_options(args) -> Dict[str, Any]:
    """The --rmi-* flags as RMIOptions fields (--rmi-pixel-loss none: pixel_loss=None)."""
    options = {field: getattr(args, dest) for dest, field in _RMI_FLAGS.items()}
    if options["pixel_loss"] == "none":
        options["pixel_loss"] = None
    return options


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _check_paths(parser: argparse.ArgumentParser, args) -> None:
    if args.dataset != "synthetic":
        if args.data_root is None:
            parser.error(f"--dataset {args.dataset} needs --data-root (a local folder; nothing is downloaded)")
        if not os.path.isdir(args.data_root):
            parser.error(f"--data-root {args.data_root!r} is not a directory")
    if args.pretrained is not None and not os.path.isfile(args.pretrained):
        parser.error(f"--pretrained {args.pretrained!r} is not a file")
    if args.resume not in (None, "auto") and not os.path.isfile(args.resume):
        parser.error(f"--resume {args.resume!r} is not a file (--resume auto continues <out>/last.pt if any)")


def check_device(parser: argparse.ArgumentParser, device: Optional[str]) -> None:
    if device is None:
        return
    try:
        want = torch.device(device)
    except RuntimeError:
        parser.error(f"--device {device!r} is not a device (cpu, cuda, cuda:1 ...)")
    if want.type == "cuda" and want.index is not None and _launch_world() > 1:
        parser.error(f"--device {device} under torchrun would put every process on that GPU: pass --device "
                     "cuda (each process takes its LOCAL_RANK's)")
    if want.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {device}: no CUDA device is available to this torch ({torch.__version__})")
    if want.type == "cuda" and want.index is not None and want.index >= torch.cuda.device_count():
        parser.error(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if want.type not in ("cpu", "cuda"):
        parser.error(f"--device {device}: the trainer runs on cpu or cuda")


def _check_rmi_flags(parser: argparse.ArgumentParser, args) -> None:
    """The --rmi-* flags build RMIOptions (whose checks name the field; here the flag); with
    another --loss they would be ignored, so setting one is an error."""
    if args.loss != "rmi":
        changed = [_flag(dest) for dest in _RMI_FLAGS if getattr(args, dest) != parser.get_default(dest)]
        if changed:
            verb = "applies" if len(changed) == 1 else "apply"
            parser.error(f"{', '.join(changed)} {verb} to --loss rmi only (this run: --loss {args.loss})")
        return
    from .options import RMIOptions

    options = rmi_options(args)
    for dest, field in _RMI_FLAGS.items():  # one at a time, so that the error names the flag
        try:
            RMIOptions(**{field: options[field]})
        except (ValueError, TypeError) as e:
            parser.error(f"{_flag(dest)}: {e}")
    _check_crop_fits(parser, args, RMIOptions(**options))
    if args.rmi_backend == "triton":
        from .engines import triton_engine

        device = torch.device(_device_or_default(args.device))
        problem = triton_engine.triton_problem()
        if problem is not None:
            parser.error(f"--rmi-backend triton: {problem}; use --rmi-backend auto or torch")
        if not triton_engine.runs_on(device):
            parser.error(f"--rmi-backend triton needs triton and a CUDA device (this run: {device}); "
                         "use --rmi-backend auto or torch")


# ---------------------------------------------------------------------------------------------
# distributed set-up

class AgreedExit(SystemExit):
    """A refusal every rank raises alike (`Dist.settle`): rank 0 alone prints it."""


class Dist:
    """Rank / world size from the torchrun environment; a no-op when not distributed."""

    def __init__(self, device_arg: Optional[str]):
        self.world = _launch_world()
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        want = _device_or_default(device_arg)
        self.device = torch.device(want)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", self.local_rank if self.world > 1 else torch.cuda.current_device())
        self.enabled = self.world > 1
        self.owns_group = False
        if self.enabled:
            import torch.distributed as dist

            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
                self.owns_group = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return t
        import torch.distributed as dist

        t = t.to(self.device)
        dist.all_reduce(t)
        return t.cpu()

    def gather_objects(self, obj: Any) -> List[Any]:
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out: List[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Rank 0's buffers on every rank. DDP sends them at the start of each forward, but each
        rank's BatchNorm then updates its own running statistics: an evaluation after a step
        would score each shard with other statistics than the checkpoint's (rank 0's)."""
        if not self.enabled:
            return
        import torch.distributed as dist

        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)

    def settle(self, problem: Optional[str], value: Any = None, what: str = "") -> None:
        """Stop every rank together (`AgreedExit`) when any rank has a problem, or when the ranks'
        values (of `what`) differ; a rank stopping alone would leave the others waiting in
        their next collective. Single process: a problem ends the run (SystemExit)."""
        if not self.enabled:
            if problem is not None:
                raise SystemExit(problem)
            return
        gathered = self.gather_objects((problem, value))
        ranks_of: Dict[str, List[int]] = {}
        for r, (p, _) in enumerate(gathered):
            if p is not None:
                ranks_of.setdefault(p, []).append(r)
        if ranks_of:
            raise AgreedExit("; ".join(p if len(r) == self.world else
                                       f"rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}: {p}"
                                       for p, r in ranks_of.items()))
        values = [v for _, v in gathered]
        if any(v != values[0] for v in values):
            raise AgreedExit(f"the processes disagree on {what}: "
                             + ", ".join(f"rank {r}: {v}" for r, v in enumerate(values)))

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# data: order and augmentation as pure functions of (seed, epoch, index)

def epoch_order(num_samples: int, seed: int, epoch: int, rank: int = 0, world: int = 1,
                data_order: int = DATA_ORDER) -> List[int]:
    """This rank's samples of `epoch`, in order: a disjoint shard of one seeded permutation.

    The permutation is padded by wrapping (as DistributedSampler) so every rank gets
    ``ceil(n / world)`` samples; rank r takes positions r, r + world, ...
    `data_order`: `DATA_ORDER`, or 1 for a run resumed from a checkpoint written before it.
    """
    if data_order == 1:
        g = torch.Generator().manual_seed(seed + epoch)
    else:
        stream = np.random.SeedSequence([_ORDER_TAG, seed, epoch])
        g = torch.Generator().manual_seed(int(stream.generate_state(1)[0]))
    perm = torch.randperm(num_samples, generator=g).tolist()
    per_rank = math.ceil(num_samples / world)
    perm += perm[: per_rank * world - num_samples]
    return perm[rank::world]


class _EpochItems(Dataset):
    """Item ``(epoch, index)``: scene ``index`` augmented with a generator seeded by
    ``(seed, epoch, index)``, so the result does not depend on which worker loads it."""

    def __init__(self, base, seed: int):
        self.base, self.seed = base, int(seed)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        epoch, index = key
        rng = np.random.default_rng([_AUG_TAG, self.seed, int(epoch), int(index)])
        with _data_errors("training item", index):
            image, label = self.base.raw(index)
            return self.base.transform(image, label, rng)


class _Batches:
    """Batch sampler: the batches of iterations ``start .. total-1`` for one rank."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, start: int, total: int,
                 rank: int, world: int, data_order: int = DATA_ORDER):
        self.n, self.bs, self.seed, self.data_order = num_samples, batch_size, seed, data_order
        self.start, self.total, self.rank, self.world = start, total, rank, world
        self.per_epoch = iterations_per_epoch(num_samples, batch_size, world)

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def __iter__(self) -> Iterator[List[tuple]]:
        epoch, order = None, None
        for it in range(self.start, self.total):
            e, b = divmod(it, self.per_epoch)
            if e != epoch:
                epoch, order = e, epoch_order(self.n, self.seed, e, self.rank, self.world, self.data_order)
            yield [(e, i) for i in order[b * self.bs:(b + 1) * self.bs]]


class DataError(ValueError):
    """Data the run cannot take; `main` says it in one line."""


@contextlib.contextmanager
def _data_errors(what: str, index: int):
    """What reading or transforming an item raises (a file cut short, a label value out of range, a
    label of another size: the datasets name the file) as a DataError naming the item."""
    try:
        yield
    except (ValueError, OSError) as err:
        raise DataError(f"{what} {index}: {err}") from err


def _same_size_batch(items):
    """The default collation, after a check that names what stacks cannot take: training images of
    different sizes, which only the augmentation's crop brings to one size."""
    sizes = sorted({"x".join(map(str, image.shape[-2:])) for image, _ in items})
    if len(sizes) > 1:
        raise DataError(f"training images of different sizes in one batch ({' and '.join(sizes[:2])}): with "
                        "--no-augment they go in whole; the augmentation (the default for voc and camvid) crops "
                        "them to one size")
    return default_collate(items)


def iterations_per_epoch(num_samples: int, batch_size: int, world: int = 1) -> int:
    per_rank = math.ceil(num_samples / world)
    n = per_rank // batch_size
    if n < 1:
        raise ValueError(f"{num_samples} training samples over {world} process(es) do not fill one batch "
                         f"of {batch_size}")
    return n


def build_datasets(args, with_val: bool = True):
    """(training set, validation set or None without `with_val`) for parsed `args`: the training
    set augmented as `parse_args` resolved --augment, whatever its split is named."""
    from .data import build_dataset

    kw: Dict[str, Any] = {}
    if args.dataset == "synthetic":
        kw["num_classes"] = args.num_classes
    train_kw = dict(kw)
    if args.dataset == "synthetic" and args.train_length is not None:
        train_kw["length"] = args.train_length
    train = build_dataset(args.dataset, args.data_root, args.train_split, crop_size=args.crop,
                          augment=args.augment, **train_kw)  # (resolved by parse_args: one rule)
    if not with_val:
        return train, None
    val_kw = dict(kw)
    if args.dataset == "synthetic":
        if args.val_length is not None:
            val_kw["length"] = args.val_length
        if args.crop is not None:
            val_kw["size"] = args.crop
    val = build_dataset(args.dataset, args.data_root, args.val_split, augment=False, **val_kw)
    return train, val


# ---------------------------------------------------------------------------------------------
# losses and schedule

def bce_pixel_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """The BCE pixel term of docs/DESIGN.md section 1, alone (no RMI statistics are computed):
    ``sum(v * bce_with_logits(x, onehot(y))) / (sum(v) + 1)``, summed over classes."""
    x = logits.float()
    valid = labels != ignore_index
    classes = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
    target = ((labels.unsqueeze(1) == classes) & valid.unsqueeze(1)).to(x.dtype)
    per = F.binary_cross_entropy_with_logits(x, target, reduction="none") * valid.unsqueeze(1)
    return per.sum() / (valid.sum() + 1)


def make_criterion(args, num_classes: int, ignore_index: int):
    """``f(logits, labels) -> scalar loss`` for ``args.loss``."""
    if args.loss == "ce":  # the mean over labelled pixels; 0 (not 0 / 0) for a batch without any
        return lambda logits, labels: F.cross_entropy(logits.float(), labels, ignore_index=ignore_index,
                                                      reduction="sum") / (labels != ignore_index).sum().clamp(min=1)
    if args.loss == "bce":
        return lambda logits, labels: bce_pixel_loss(logits, labels, ignore_index)
    from .loss import RMILoss

    return RMILoss(num_classes, ignore_index=ignore_index, validate=False, **rmi_options(args))


def poly_lr(base_lr: float, iteration: int, total: int, power: float = 0.9) -> float:
    """The paper's schedule: ``base * (1 - iteration / total) ** power``."""
    return base_lr * (1.0 - iteration / total) ** power


# ---------------------------------------------------------------------------------------------
# RNG state as checkpoint-safe values

def capture_rng() -> Dict[str, Any]:
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": [int(version), [int(v) for v in internal],
                   "none" if gauss_next is None else float(gauss_next)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), None if gauss_next == "none" else gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# evaluation

def _same_size_runs(items):
    """Runs of consecutive items whose images share a size: a batch stacks one size (VOC's
    validation images differ)."""
    run: List[tuple] = []
    for item in items:
        if run and item[0].shape != run[0][0].shape:
            yield run
            run = []
        run.append(item)
    if run:
        yield run


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, device, batch_size: int = 8, boundary_tolerance: int = 2,
             amp: bool = False, dist: Optional[Dist] = None, limit: Optional[int] = None,
             interrupted=None) -> Optional[Dict[str, Any]]:
    """mIoU, per-class IoU, pixel accuracy and boundary F-score of `model` on `dataset`
    (images of any sizes; a batch's images of one size go through the network together). In
    distributed runs each rank scores a shard and the counts are summed. interrupted: a function
    asked before each batch (in distributed runs as often on every rank, and it must answer
    alike on every rank); when it says True the evaluation stops and returns None."""
    was_training = model.training
    model.eval()
    metrics = SegmentationMetrics(dataset.num_classes, dataset.ignore_index, boundary_tolerance,
                                  dataset.class_names)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    indices = list(range(n))
    shard = n
    if dist is not None and dist.enabled:
        indices = indices[dist.rank::dist.world]
        shard = -(-n // dist.world)  # rank 0's, the largest: every rank asks `interrupted` as often
    for start in range(0, shard, batch_size):
        if interrupted is not None and interrupted():
            model.train(was_training)
            return None
        batch = []
        for i in indices[start:start + batch_size]:
            with _data_errors("evaluation item", i):
                batch.append(dataset[i])
        for items in _same_size_runs(batch):
            images = torch.stack([x for x, _ in items]).to(device)
            labels = torch.stack([y for _, y in items])
            with _autocast(device, amp):
                logits = model(images)
            metrics.update(logits.argmax(1).cpu(), labels)
    if dist is not None and dist.enabled:
        metrics.load_state(dist.all_sum(metrics.state()))
    model.train(was_training)
    return metrics.compute()


def _autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def predict(model: torch.nn.Module, images: torch.Tensor, device) -> torch.Tensor:
    """Class maps [N, H, W] of a batch of normalised images (eval mode, no grad)."""
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(images.to(device)).argmax(1).cpu()
    model.train(was)
    return out


# ---------------------------------------------------------------------------------------------
# signals

WORKER_GRACE_S = 60.0  # a DataLoader worker's life after a SIGTERM, if the main process has not ended it


def _worker_ignores_stop_signals(_worker_id: int) -> None:
    """DataLoader workers leave SIGINT and SIGTERM to the main process, which saves and exits
    after the current iteration and stops its workers: a scheduler's SIGTERM reaches the whole
    process group, and a worker killed by it took the run down with "DataLoader worker ... is
    killed by signal". A worker the main process cannot stop (stuck in a dataset's code; it
    would be terminated by a SIGTERM at exit, and waited for) ends WORKER_GRACE_S later."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _end_later)


def _end_later(signum, frame) -> None:
    threading.Thread(target=lambda: (threading.Event().wait(WORKER_GRACE_S), os._exit(0)), daemon=True).start()


@contextlib.contextmanager
def _batches_of(loader: DataLoader) -> Iterator[Any]:
    """The loader's iterator, whose worker processes stop when the loop ends, however it ends.

    An error raised in a worker (an unreadable image) reaches the loop with a traceback through
    the iterator's frames, which kept it, and its workers, alive: freed later within a reference
    cycle, its shutdown waited 5 s a worker, in vain, and then stopped them with SIGTERM, which
    they answer by ending WORKER_GRACE_S later (as at the interpreter's exit: a run that failed
    on a bad image took a minute to return to the shell)."""
    batches = iter(loader)
    try:
        yield batches
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)  # workers: tells them to stop, joins them
        if shutdown is not None:
            shutdown()


class _StopFlag:
    """SIGINT / SIGTERM set a flag; the loop saves and exits after the current iteration."""

    def __init__(self):
        self.signal: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C aborts at once
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    @property
    def name(self) -> str:
        """The signal this process received, or (distributed) that another process did."""
        return signal.Signals(self.signal).name if self.signal else "a signal to another process"


# ---------------------------------------------------------------------------------------------
# the loop

def _all_finite(tensors) -> bool:
    sums = [t.detach().float().sum() for t in tensors if t.is_floating_point()]
    return bool(torch.isfinite(torch.stack(sums).sum())) if sums else True


def _schedule_config(args) -> Dict[str, Any]:
    """What a resumed run must share with its checkpoint's: the schedule, the optimizer's
    settings, the precision and the loss (its engine may change: both compute the same)."""
    config = {k: getattr(args, k) for k in _SCHEDULE_KEYS if getattr(args, k) is not None}
    if args.loss == "rmi":
        config.update({dest: getattr(args, dest) for dest in _RMI_COMPARED})
    return config


def model_config(args, num_classes: int) -> Dict[str, Any]:
    return {"name": args.model, "num_classes": int(num_classes), "backbone": args.backbone,
            "output_stride": int(args.output_stride)}


def run(args: argparse.Namespace, log=print) -> Dict[str, Any]:
    """Train as `args` say. Returns a dict: status ("done", "stopped", "signal",
    "nonfinite"), iteration (completed), losses (per iteration, the whole run incl.
    resumed history), metrics (final evaluation or None), model (the trained network,
    unwrapped), checkpoint (path or None), seconds_per_iteration, message."""
    from .models import build_model, convert_sync_batchnorm

    if args.threads:
        torch.set_num_threads(args.threads)
    dist = Dist(args.device)
    device = dist.device
    out_dir = args.out
    say = log if dist.main else (lambda *a, **k: None)
    try:
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        try:  # the validation split only where it is evaluated
            train_set, val_set = build_datasets(args, with_val=bool(args.eval_every) or not args.no_final_eval)
        except (FileNotFoundError, ValueError, OSError) as err:
            raise SystemExit(f"error: --dataset {args.dataset}"
                             + (f" --data-root {args.data_root}" if args.data_root else "")
                             + f" (splits {args.train_split!r}, {args.val_split!r}): {err}") from None
        num_classes, ignore_index = train_set.num_classes, train_set.ignore_index
        try:
            per_epoch = iterations_per_epoch(len(train_set), args.batch_size, dist.world)
        except ValueError as err:
            raise SystemExit(f"--batch-size {args.batch_size}: {err}") from None
        total = args.iterations if args.iterations is not None else args.epochs * per_epoch

        problem = None  # a rank's refusal, settled with the other ranks' before any collective
        try:
            model = build_model(args.model, num_classes, args.backbone, args.output_stride,
                                pretrained=args.pretrained)
        except (ValueError, FileNotFoundError) as err:
            if args.pretrained is None:
                raise
            problem = f"--pretrained {args.pretrained}: {err}"
            model = build_model(args.model, num_classes, args.backbone, args.output_stride)
        config = model_config(args, num_classes)
        if args.sync_bn:
            model = convert_sync_batchnorm(model)
        model.to(device).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                    weight_decay=args.weight_decay)
        use_scaler = bool(args.amp and device.type == "cuda")
        scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        criterion = make_criterion(args, num_classes, ignore_index)

        start, losses, data_order, run_id = 0, [], DATA_ORDER, uuid.uuid4().hex
        ckpt_path = os.path.join(out_dir, "last.pt")
        resume = args.resume
        if resume == "auto":
            resume = ckpt_path if os.path.isfile(ckpt_path) else None
        state = None
        if resume and problem is None:
            try:
                state = load_checkpoint(resume, map_location="cpu")
                _check_resume(state, args, config, resume, dist.world, total)
                _check_same_run(state, resume, ckpt_path, args.out)
            except (FileNotFoundError, CheckpointError) as err:
                problem = f"--resume {resume}: {err}"
            except SystemExit as refusal:
                problem = str(refusal.code)
        # every rank must start from the same checkpoint (each node may see its own --out)
        dist.settle(problem, None if state is None or problem else (int(state["iteration"]),
                                                                    len(state.get("losses", []))),
                    f"--resume {args.resume} (the checkpoint each process continues, as (iteration, "
                    "losses logged), None for none: give every node the same --out or --resume PATH)")
        if resume:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if use_scaler and state.get("scaler"):  # {}: written without a scaler
                scaler.load_state_dict(state["scaler"])
            start = int(state["iteration"])
            losses = [float(v) for v in state.get("losses", [])][:start]
            data_order = int(state.get("train_config", {}).get("data_order", 1))
            rng = state["rng"]
            ranks = rng.get("torch_ranks")
            if ranks is not None and len(ranks) == dist.world:
                rng = dict(rng, torch=ranks[dist.rank])
            restore_rng(rng)
            say(f"resumed from {resume} at iteration {start}/{total}")

        net = model
        if dist.enabled:
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)

        loader = DataLoader(_EpochItems(train_set, args.seed),
                            batch_sampler=_Batches(len(train_set), args.batch_size, args.seed, start, total,
                                                   dist.rank, dist.world, data_order),
                            num_workers=args.workers, pin_memory=device.type == "cuda",
                            collate_fn=_same_size_batch,
                            worker_init_fn=_worker_ignores_stop_signals if args.workers else None,
                            # its own generator: starting the loader must not draw from the global
                            # torch RNG (dropout's), or a resumed run would be one draw off
                            generator=torch.Generator().manual_seed(args.seed))
        stop_at = total if args.stop_at is None else min(total, args.stop_at)

        def save(iteration: int) -> Optional[str]:
            rng = capture_rng()
            rng["torch_ranks"] = dist.gather_objects(rng["torch"])
            if not dist.main:
                return None
            model_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            if not _all_finite(model_state.values()):  # the last line of defence
                raise FloatingPointError("refusing to write a checkpoint with non-finite weights")
            save_checkpoint(ckpt_path, model_state, config, iteration=iteration,
                            optimizer=optimizer.state_dict(),
                            scaler=scaler.state_dict() if use_scaler else {}, rng=rng,
                            losses=list(losses), train_config=dict(_schedule_config(args), world=dist.world,
                                                data_order=data_order, run=run_id),
                            total_iterations=total)
            return ckpt_path

        log_path = os.path.join(out_dir, "log.jsonl")
        # a checkpoint from elsewhere into an --out without last.pt starts a run of its own there (a
        # log or metrics there are no part of it); with last.pt `_check_same_run` found it the same run
        fresh = not resume or not (same_file(resume, ckpt_path) or os.path.isfile(ckpt_path))
        if not fresh:  # (a checkpoint from before runs were named: its run is named from now on)
            run_id = state.get("train_config", {}).get("run", run_id)
        if dist.main:
            try:  # (parse_args checked the path; what only trying tells, such as a read-only disk)
                os.makedirs(out_dir, exist_ok=True)
            except OSError as err:
                raise SystemExit(f"error: --out {out_dir!r}: {err.strerror or err}") from None
            _start_files(out_dir, log_path, start, fresh)
        result: Dict[str, Any] = {"status": "done", "iteration": start, "losses": losses, "metrics": None,
                                  "model": model, "checkpoint": None, "message": "",
                                  "seconds_per_iteration": float("nan"), "total_iterations": total,
                                  "num_classes": num_classes, "class_names": list(train_set.class_names)}
        say(f"training {args.model}/{args.backbone} os{args.output_stride} on {args.dataset} "
            f"({len(train_set)} samples, {per_epoch} it/epoch), loss {args.loss}, {total} iterations, "
            f"batch {args.batch_size} x {dist.world} process(es), device {device}")
        bar = None
        if dist.main and not args.no_progress:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=start, desc=args.loss, dynamic_ncols=True, file=sys.stderr)
        # seconds of training steps (data included), not of the evaluations and saves between them
        train_seconds, done_here, evaluations_logged = 0.0, 0, False
        it = start
        mark = time.perf_counter()

        def signalled(stop) -> bool:
            """Whether a process of the run was signalled (the same answer on every rank)."""
            if not dist.enabled:
                return stop.signal is not None
            return bool(dist.all_sum(torch.tensor(float(stop.signal is not None))) > 0)

        with _StopFlag() as stop, _batches_of(loader) as batches:
            for images, labels in batches:
                if it >= stop_at:
                    break
                lr = poly_lr(args.lr, it, total, args.lr_power)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                with _autocast(device, args.amp):
                    logits = net(images)
                    if isinstance(logits, tuple):
                        logits = logits[0]
                    try:
                        loss = criterion(logits, labels)
                    except ValueError as err:  # what the loss cannot take (images too small for its regions)
                        raise SystemExit(f"error: iteration {it + 1}, a batch of {images.shape[-2]} x "
                                         f"{images.shape[-1]} images: {err}") from None
                flags = dist.all_sum(torch.stack([loss.detach().float().cpu(),
                                                  torch.tensor(0.0 if torch.isfinite(loss) else 1.0),
                                                  torch.tensor(float(stop.signal is not None))]))
                if flags[1] > 0 or not math.isfinite(float(flags[0])):
                    result.update(status="nonfinite", message=_nonfinite_message(it + 1, "loss", ckpt_path))
                    break
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                bad = torch.tensor(0.0 if _all_finite(model.state_dict().values()) else 1.0)
                if dist.all_sum(bad) > 0:
                    result.update(status="nonfinite", message=_nonfinite_message(it + 1, "weights", ckpt_path))
                    break
                it += 1
                done_here += 1
                value = float(flags[0]) / dist.world
                losses.append(value)
                if dist.main:
                    if bar is not None:
                        bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
                        bar.update(1)
                    if it == start + 1 or it % max(1, args.log_every) == 0 or it == total:
                        say(f"iter {it}/{total} loss {value:.5f} lr {lr:.3e}")
                        with open(log_path, "a", encoding="utf-8") as f:
                            f.write(json.dumps({"iteration": it, "loss": value, "lr": lr}) + "\n")
                train_seconds += time.perf_counter() - mark
                if args.save_every and it % args.save_every == 0 and it < stop_at:
                    result["checkpoint"] = save(it)
                stopping = (flags[2] > 0) if dist.enabled else (stop.signal is not None)
                if args.eval_every and it % args.eval_every == 0 and it < total and not stopping:
                    dist.broadcast_buffers(model)  # the checkpoint's BatchNorm statistics on every shard
                    m = evaluate(model, val_set, device, args.eval_batch_size or args.batch_size,
                                 args.boundary_tolerance, args.amp, dist, args.val_length,
                                 interrupted=lambda: signalled(stop))  # a signal stops it
                    if m is not None:
                        say(f"eval @ {it}: mIoU {100 * m['miou']:.2f}  boundary F {100 * m['boundary_f']:.2f}")
                        if dist.main:  # kept beside the losses (a resume keeps it up to its checkpoint)
                            evaluations_logged = True
                            with open(log_path, "a", encoding="utf-8") as f:
                                f.write(json.dumps(json_safe({"iteration": it, "eval": m,
                                                              "split": args.val_split})) + "\n")
                    stopping = signalled(stop)  # a signal during the evaluation: no further step
                mark = time.perf_counter()
                if stopping:
                    result.update(status="signal",
                                  message=f"stopped by {stop.name} after iteration {it}; checkpoint {ckpt_path}; "
                                          f"continue with --resume {ckpt_path}")
                    break
            if result["status"] == "done" and it < total:
                result["status"] = "stopped"
                result["message"] = (f"stopped at iteration {it}/{total} (--stop-at); continue with --resume "
                                     f"{ckpt_path}")
            if result["status"] != "nonfinite":  # the final save under the handlers too: a signal waits
                # the same choice on every rank (save() is collective), whichever files each rank sees
                missing = dist.all_sum(torch.tensor(0.0 if os.path.isfile(ckpt_path) else 1.0)) > 0
                result["checkpoint"] = save(it) if (done_here or missing) else ckpt_path
                if result["status"] == "done" and signalled(stop):  # during that save: no evaluation
                    result.update(status="signal",
                                  message=f"stopped by {stop.name} at the end (checkpoint {ckpt_path} written; "
                                          "--resume auto evaluates it)")
        if bar is not None:
            bar.close()
        result["iteration"] = it
        result["seconds_per_iteration"] = train_seconds / done_here if done_here else float("nan")
        if result["status"] == "nonfinite":
            if dist.main:
                log(result["message"])
            return result
        if result["status"] == "done" and not args.no_final_eval:
            dist.broadcast_buffers(model)
            with _StopFlag() as stop:  # a signal ends the evaluation between batches, as in training
                m = evaluate(model, val_set, device, args.eval_batch_size or args.batch_size,
                             args.boundary_tolerance, args.amp, dist, args.val_length,
                             interrupted=lambda: signalled(stop))
            if m is None:
                result.update(status="signal", message=f"stopped by {stop.name} during the final evaluation "
                                                        f"(checkpoint {ckpt_path} written; --resume auto "
                                                        "evaluates it)")
            else:
                result["metrics"] = m
                say(format_table({args.loss: m}, train_set.class_names,
                                 [("s/iteration", [f"{result['seconds_per_iteration']:.3f}"])]))
                if dist.main:
                    summary = {"metrics": m, "iteration": it, "loss": args.loss, "split": args.val_split,
                               "val_length": args.val_length,
                               "seconds_per_iteration": result["seconds_per_iteration"]}
                    write_atomically(os.path.join(out_dir, "metrics.json"),
                                     json.dumps(json_safe(summary), indent=1).encode("utf-8"))
        if result["status"] == "done":
            evaluated = "" if args.no_final_eval else f", metrics.json (the {args.val_split!r} split's scores)"
            logged = "the losses and evaluations" if evaluations_logged else "the losses"
            result["message"] = f"wrote {out_dir}: last.pt (the checkpoint), log.jsonl ({logged}){evaluated}"
        if result["message"]:
            say(result["message"])
        return result
    finally:
        dist.close()


def _start_files(out_dir: str, log_path: str, start: int, fresh: bool) -> None:
    """The files of a run starting at iteration `start`: a fresh one (`--overwrite`) removes an
    earlier run's checkpoint, log and metrics (none of them may pass for its own); a resumed
    one keeps the log up to its checkpoint's iteration (iterations logged after it, before a
    kill, are run and logged again) and drops metrics of a later iteration (a run rolled back
    to a snapshot). Either way the temporaries of saves a kill cut short go."""
    remove_leftovers(out_dir)
    if fresh:
        for name in ("last.pt", "log.jsonl", "metrics.json"):
            if os.path.isfile(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))
        return
    metrics = os.path.join(out_dir, "metrics.json")
    with contextlib.suppress(FileNotFoundError, ValueError, KeyError, TypeError):
        with open(metrics, encoding="utf-8") as f:
            if int(json.load(f)["iteration"]) > start:  # a later iteration's (a run rolled back)
                os.remove(metrics)
    if not os.path.isfile(log_path):
        return
    with open(log_path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if int(json.loads(line)["iteration"]) <= start:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
    if len(kept) != len(lines):
        with atomic_writer(log_path) as f:
            f.write("".join(kept).encode("utf-8"))


def _nonfinite_message(iteration: int, what: str, ckpt_path: str) -> str:
    keep = (f"the last good checkpoint {ckpt_path} is kept" if os.path.isfile(ckpt_path)
            else "no checkpoint was written")
    return (f"error: non-finite {what} at iteration {iteration}; training stopped ({keep}; "
            f"non-finite weights are never saved). Lower --lr or check the data.")


def _check_same_run(state: Dict[str, Any], resume: str, ckpt_path: str, out: str) -> None:
    """--resume PATH into an --out whose last.pt is another run's would replace it and mix the
    two logs; a snapshot of the same run (a copy of an earlier last.pt) rolls it back."""
    if not os.path.isfile(ckpt_path) or same_file(resume, ckpt_path):
        return
    try:  # only train_config is read (mmap: the tensors stay on disk)
        other = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)["train_config"]["run"]
    except Exception:  # unreadable, or written before runs had an id
        other = None
    if other is None or other != state.get("train_config", {}).get("run"):
        raise SystemExit(f"--out {out} holds the last.pt of another run (or of one from before runs were "
                         f"named), which --resume {resume} would replace: continue that run with --resume auto, "
                         "or give this one another --out")


def _check_resume(state: Dict[str, Any], args, config: Dict[str, Any], path: str, world: int,
                  total: int) -> None:
    for key in CONFIG_KEYS:
        if state["config"].get(key) != config[key]:
            raise SystemExit(f"--resume {path}: checkpoint network {key}={state['config'].get(key)!r} "
                             f"but this run asks for {config[key]!r}")
    for key in ("iteration", "optimizer", "rng"):
        if key not in state:
            raise SystemExit(f"--resume {path}: checkpoint has no training state ({key!r} missing)")
    saved = state.get("train_config", {})
    now = dict(_schedule_config(args), world=world)
    if "world" not in saved:  # written before the count was: its per-process RNG states tell it
        saved = dict(saved, world=len(state["rng"].get("torch_ranks") or [None]))
    if "momentum" not in saved:  # likewise: the optimizer's state holds what the run used
        group = (state["optimizer"].get("param_groups") or [{}])[0]
        saved = dict(saved, **{k: group[k] for k in ("momentum", "weight_decay") if k in group})
    if "augment" not in saved:  # written before the choice was recorded: the rule of then, by the split's
        # name (a run of a list of one's own went in whole: --no-augment continues it as it was)
        saved = dict(saved, augment=saved.get("dataset", "synthetic") != "synthetic"
                     and args.train_split.startswith("train"))
    if saved.get("dataset", "synthetic") != "synthetic":  # what such a run recorded without effect, before
        # those flags were refused there: --num-classes (its default 5), --train-length, --crop without augmentation
        moot = {"num_classes", "train_length"} | ({"crop"} if saved["augment"] is False else set())
        saved = {k: v for k, v in saved.items() if k not in moot}
    if saved.get("data_order", 1) not in (1, DATA_ORDER):
        raise SystemExit(f"--resume {path}: the checkpoint orders its data by rule {saved['data_order']}, which "
                         "this version does not know (a later version wrote it)")
    diff = {k: (saved.get(k), now.get(k)) for k in set(saved) | set(now)
            if k not in ("data_order", "run") and not (k in _LATER_KEYS and k not in saved)
            and saved.get(k) != now.get(k)}
    if "world" in diff:  # the data order and the batch differ, and with --epochs the run's length
        raise SystemExit(f"--resume {path}: the checkpoint's run had {saved['world']} process(es), this one "
                         f"{world}: resume with {saved['world']} (each process trains its own shard of "
                         "every epoch)")
    if not diff and state.get("total_iterations", total) != total:
        diff["total iterations"] = (state["total_iterations"], total)
    if diff:
        raise SystemExit(f"--resume {path}: this run's settings differ from the checkpoint's run: "
                         + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items())))


def _speaks_for_the_run() -> bool:
    """False on the ranks after the first of a distributed launch (RANK > 0, WORLD_SIZE > 1)."""
    return _launch_world() < 2 or int(os.environ.get("RANK", "0") or 0) == 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except DataError as err:  # a DataLoader worker's comes wrapped in its traceback: the last line
        raise SystemExit(f"error: {str(err).strip().splitlines()[-1].split('DataError: ', 1)[-1]}") from None
    except AgreedExit as stop:
        if not _speaks_for_the_run():
            raise SystemExit(1) from None  # every rank raised it: rank 0 says it
        raise SystemExit(stop.code) from None
    if result["status"] == "nonfinite":
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

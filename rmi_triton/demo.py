"""The project's main job: CE vs BCE + RMI on the embedded dataset, side by side.

    python -m rmi_triton.demo            # or: make demo        (4-6 min on 2 CPU cores)
    python -m rmi_triton.demo --quick    # a few iterations on tiny images (smoke test)

Trains the same network (DeepLabv3+ ResNet-18, output stride 16) on 128 x 128
synthetic scenes twice, with the same seed, data order and poly schedule: once with
cross-entropy, once with the paper's BCE + RMI (R = 3, 4 x 4 average pooling,
lambda = 0.5). Both are evaluated on the validation split (mIoU, per-class IoU,
boundary F-score) and the tool writes into ``--out`` (default ``demo_out/``):

* ``ce.pt``, ``rmi.pt``   the two checkpoints (rmi_triton.checkpoint format)
* ``results.json``        metrics, timings, loss curves, the exact settings
* ``demo.png``            loss curves and qualitative predictions side by side, where
                          matplotlib is installed (``pip install 'rmi_triton[plot]'``)
* ``rmi.onnx`` etc.       where the export extra is (``pip install 'rmi_triton[export]'``;
                          see `_export_step`)
* ``ce_run/``, ``rmi_run/`` each run's trainer folder (last.pt, log.jsonl, metrics.json),
                          replaced on every demo run
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from .files import atomic_writer, folder_problem, json_safe, write_atomically
from .metrics import format_table
from .train import MIN_CROP, check_device
from .train import parse_args as train_args
from .train import predict, run

# The default setting, sized for ~7 minutes on 2 CPU cores. Measured on an idle 2-vCPU
# AMD EPYC with 2 threads: 0.80 s per iteration (batch 8, 128 x 128, either loss); the
# whole demo at 120 iterations per run took 224 s (two evaluations of 100 scenes, the
# figure and the ONNX export step included), so 2 x 200 iterations take ~6 min.
DEFAULTS = {"iterations": 200, "batch_size": 8, "size": 128, "train_length": 2000, "val_length": 100}
QUICK = {"iterations": 2, "batch_size": 2, "size": 32, "train_length": 4, "val_length": 2}
RUNS = (("ce", "cross-entropy"), ("rmi", "BCE + RMI"))
# what a demo leaves in --out beside the runs' folders (the module doc's list)
PUBLISHED = ("ce.pt", "rmi.pt", "results.json", "demo.png", "rmi.onnx")
PLOT_INSTALL = "pip install 'rmi_triton[plot]'"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rmi_triton.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_out", help="output folder")
    p.add_argument("--quick", action="store_true", help="tiny smoke-test setting (seconds)")
    p.add_argument("--iterations", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--size", type=int, default=None, help="scene size (px)")
    p.add_argument("--train-length", type=int, default=None)
    p.add_argument("--val-length", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="default: the CPU core count")
    p.add_argument("--device", default="cpu")
    p.add_argument("--examples", type=int, default=4,
                   help="validation images shown in the PNG (0: the loss curves alone)")
    p.add_argument("--no-export", action="store_true", help="skip the ONNX export step")
    p.add_argument("--no-progress", action="store_true")
    return p


def settings(ns: argparse.Namespace) -> Dict[str, Any]:
    base = dict(QUICK if ns.quick else DEFAULTS)
    for key in base:
        value = getattr(ns, key)
        if value is not None:
            base[key] = value
    return base


def train_argv(loss: str, cfg: Dict[str, Any], ns: argparse.Namespace, out: str, threads: int) -> List[str]:
    return ["--model", "deeplabv3plus", "--backbone", "resnet18", "--output-stride", "16",
            "--dataset", "synthetic", "--crop", str(cfg["size"]), "--train-length", str(cfg["train_length"]),
            "--val-length", str(cfg["val_length"]), "--batch-size", str(cfg["batch_size"]),
            "--iterations", str(cfg["iterations"]), "--loss", loss, "--seed", str(ns.seed),
            "--device", ns.device, "--threads", str(threads), "--out", out,
            "--log-every", str(max(1, cfg["iterations"] // 10)),
            "--overwrite"] + (["--no-progress"] if ns.no_progress else [])  # (each demo trains afresh)


def _palette(num_classes: int) -> np.ndarray:
    base = np.array([[40, 40, 40], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                     [245, 130, 48], [145, 30, 180], [70, 240, 240]], dtype=np.uint8)
    return base[np.arange(num_classes) % len(base)]


def colorize(label: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    out = np.full(label.shape + (3,), 255, dtype=np.uint8)  # ignored pixels white
    pal = _palette(num_classes)
    valid = label != ignore_index
    out[valid] = pal[label[valid].astype(np.int64)]
    return out


def write_figure(path: str, results: Dict[str, Dict[str, Any]], models: Dict[str, torch.nn.Module],
                 val_set, examples: int, device) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    k = min(examples, len(val_set))
    fig = plt.figure(figsize=(12, 3.0 + 2.25 * k))
    grid = fig.add_gridspec(1 + k, 4, height_ratios=[1.3] + [1.0] * k, hspace=0.35, wspace=0.05)
    for col, (key, title) in enumerate(RUNS):
        ax = fig.add_subplot(grid[0, 2 * col:2 * col + 2])
        losses = np.asarray(results[key]["losses"], dtype=float)
        ax.plot(np.arange(1, len(losses) + 1), losses, lw=0.8, alpha=0.5, color=f"C{col}")
        if len(losses) >= 5:
            w = max(2, len(losses) // 10)
            smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
            ax.plot(np.arange(w, len(losses) + 1), smooth, lw=2, color=f"C{col}", label=f"{w}-it mean")
            ax.legend(fontsize=8)
        m = results[key]["metrics"]
        ax.set_title(f"{title}: training loss (mIoU {100 * m['miou']:.1f}%, "
                     f"boundary F {100 * m['boundary_f']:.1f}%)", fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    items = [val_set[i] for i in range(k)]
    preds = {key: predict(models[key], torch.stack([x for x, _ in items]), device).numpy()
             for key, _ in RUNS} if items else {}
    nc = val_set.num_classes
    headers = ["image", "ground truth", "CE prediction", "RMI prediction"]
    for r in range(k):
        panels = [val_set.rgb(r), colorize(items[r][1].numpy(), nc, val_set.ignore_index),
                  colorize(preds["ce"][r], nc), colorize(preds["rmi"][r], nc)]
        for c, panel in enumerate(panels):
            ax = fig.add_subplot(grid[1 + r, c])
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(headers[c], fontsize=10)
    pal = _palette(nc) / 255.0
    handles = [Patch(color=pal[c], label=name) for c, name in enumerate(val_set.class_names)]
    handles.append(Patch(facecolor="white", edgecolor="black", label="ignore"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def _exporter_problem() -> Optional[str]:
    """Why the export step cannot run here (a package of the export extra missing, or the
    exporter failing to import), or None."""
    try:
        from rmi_triton.export.base import INSTALL, missing, require

        absent = missing()
        if absent:
            return f"{', '.join(absent)} not installed ({INSTALL})"
        import rmi_triton.export  # noqa: F401  (imports onnx: an install that is there but broken)

        require()  # (says why, where it was broken)
    except Exception as err:
        return f"rmi_triton.export unavailable: {type(err).__name__}: {err}"
    return None


def _export_step(out_dir: str, rmi_model: Optional[torch.nn.Module] = None, size: int = 128,
                 quick: bool = False) -> Dict[str, Any]:
    """Export the RMI network to ONNX, verify it against PyTorch, and compare its graph and
    latency with the CE network's (from ``ce.pt`` / ``rmi.pt``). Uses ``rmi_triton.export``;
    any failure is reported in the result instead of stopping the demo."""
    report: Dict[str, Any] = {}
    problem = _exporter_problem()
    if problem:  # the demo's results stand on their own
        return {"skipped": problem}
    from rmi_triton.export import compare_exports, export_onnx, verify_onnx

    if rmi_model is None:
        from .checkpoint import build_from_checkpoint

        rmi_model = build_from_checkpoint(os.path.join(out_dir, "rmi.pt"))
    rmi_model = rmi_model.eval()
    onnx_path = os.path.join(out_dir, "rmi.onnx")
    shape = [1, 3, size, size]
    runs = 3 if quick else 10
    steps = (
        ("export", lambda: export_onnx(rmi_model, onnx_path, example_shape=shape)),
        ("verify", lambda: verify_onnx(onnx_path, rmi_model, latency_size=shape, latency_runs=runs,
                                       latency_warmup=1)),
        ("compare", lambda: compare_exports(os.path.join(out_dir, "ce.pt"), os.path.join(out_dir, "rmi.pt"),
                                            latency_size=shape, rounds=runs, warmup=1)),
    )
    for name, step in steps:
        try:
            value = step()
            report[name] = value.to_dict() if hasattr(value, "to_dict") else str(value)
        except Exception as err:
            report[name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
            partial = getattr(err, "report", None)  # e.g. VerificationError carries what was measured
            if hasattr(partial, "to_dict"):
                report[name]["report"] = partial.to_dict()
            if name == "export":
                break
    return report


def _export_summary(report: Dict[str, Any]) -> str:
    if "skipped" in report:
        return f"export: {report['skipped']}"
    lines = []
    for name in ("export", "verify", "compare"):
        value = report.get(name)
        if value is None:
            continue
        if isinstance(value, dict) and "error" in value:
            lines.append(f"{name}: FAILED ({value['error']})")
        elif name == "compare" and isinstance(value, dict):
            lines.append(f"compare CE vs RMI export: identical structure={value.get('identical')}, "
                         f"latency ratio RMI/CE={value.get('latency_ratio_b_over_a')}")
        elif name == "verify" and isinstance(value, dict):
            keys = [k for k in ("passed", "ok", "max_abs_diff", "latency_median_ms") if k in value]
            lines.append("verify: " + (", ".join(f"{k}={value[k]}" for k in keys) or "done"))
        else:
            lines.append(f"{name}: done")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    cfg = settings(ns)
    for key, least in (("size", MIN_CROP), ("val_length", 1), ("iterations", 1), ("batch_size", 2),
                       ("train_length", cfg["batch_size"])):
        if not cfg[key] >= least:
            parser.error(f"--{key.replace('_', '-')} must be >= {least}, got {cfg[key]}")
    if ns.examples < 0:
        parser.error(f"--examples must be >= 0, got {ns.examples}")
    if ns.threads is not None and ns.threads < 1:
        parser.error(f"--threads must be >= 1, got {ns.threads}")
    if not 0 <= ns.seed < 2 ** 32:
        parser.error(f"--seed must be in [0, 2**32), got {ns.seed}")
    problem = folder_problem(ns.out, PUBLISHED)
    if problem:
        parser.error(f"--out {ns.out!r} {problem}")
    check_device(parser, ns.device)
    threads = ns.threads or os.cpu_count() or 1
    out_dir = ns.out
    # both runs' flags checked by the trainer before anything in --out is touched
    runs = {key: train_args(train_argv(key, cfg, ns, os.path.join(out_dir, f"{key}_run"), threads))
            for key, _ in RUNS}
    torch.set_num_threads(threads)
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    # said before the training, not found missing after it
    figure = None if importlib.util.find_spec("matplotlib") is None else os.path.join(out_dir, "demo.png")
    if figure is None:
        print(f"demo: matplotlib is not installed, so no demo.png this time ({PLOT_INSTALL})")
    problem = None if ns.no_export else _exporter_problem()
    if problem:
        print(f"demo: no ONNX export this time: {problem}")
    print(f"demo: DeepLabv3+ ResNet-18 os16, {cfg['size']}x{cfg['size']} synthetic scenes, batch "
          f"{cfg['batch_size']}, {cfg['iterations']} iterations per run, seed {ns.seed}, {threads} threads")
    results: Dict[str, Dict[str, Any]] = {}
    models: Dict[str, torch.nn.Module] = {}
    val_set = None
    # an earlier demo's outputs go first: a run stopped half-way must not leave one run's
    # checkpoint beside the other's from another demo (they would compare as one pair)
    for name in PUBLISHED:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out_dir, name))
    for key, title in RUNS:
        print(f"\n== {title} ==")
        run_dir = os.path.join(out_dir, f"{key}_run")
        if os.path.isdir(run_dir):
            shutil.rmtree(run_dir)  # a fresh run each time (no stale log or checkpoint)
        args = runs[key]
        started = time.perf_counter()
        res = run(args)
        if res["status"] != "done":
            # (the trainer's "continue with --resume" does not apply: a demo starts both runs afresh)
            print(f"demo: the {title} run did not finish ({res['message'].split(';')[0]}); run the demo "
                  "again: it trains both networks afresh", file=sys.stderr)
            return 1
        with open(res["checkpoint"], "rb") as src, atomic_writer(os.path.join(out_dir, f"{key}.pt")) as dst:
            shutil.copyfileobj(src, dst)
        results[key] = {"metrics": res["metrics"], "losses": res["losses"],
                        "seconds_per_iteration": res["seconds_per_iteration"],
                        "wall_seconds": time.perf_counter() - started, "argv": train_argv(key, cfg, ns, run_dir,
                                                                                           threads)}
        models[key] = res["model"].eval()
        if val_set is None:
            from .train import build_datasets

            val_set = build_datasets(args)[1]
    ce, rmi = results["ce"], results["rmi"]
    table = format_table({"CE": ce["metrics"], "BCE+RMI": rmi["metrics"]}, val_set.class_names, [
        ("s/iteration (train)", [f"{ce['seconds_per_iteration']:.3f}", f"{rmi['seconds_per_iteration']:.3f}"]),
        ("final train loss", [f"{ce['losses'][-1]:.4f}", f"{rmi['losses'][-1]:.4f}"]),
    ])
    print(f"\n{cfg['iterations']} iterations x batch {cfg['batch_size']}, validation: {len(val_set)} scenes\n")
    print(table)
    figure_note = figure or f"skipped: matplotlib is not installed ({PLOT_INSTALL})"
    if figure is not None:
        try:
            write_figure(figure, results, models, val_set, ns.examples, torch.device(ns.device))
        except Exception as err:  # the runs' results are written all the same; the exit status says it
            figure_note = f"failed: {type(err).__name__}: {err}"
            print(f"demo: the figure {figure_note}; the results are written all the same", file=sys.stderr)
    export = {"skipped": "--no-export"} if ns.no_export else _export_step(out_dir, models["rmi"], cfg["size"],
                                                                            ns.quick)
    summary = {
        "settings": dict(cfg, seed=ns.seed, threads=threads, device=ns.device, model="deeplabv3plus",
                         backbone="resnet18", output_stride=16),
        "runs": results,
        "table": table,
        "export": export,
        "figure": figure_note,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__},
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "total_seconds": time.perf_counter() - t0,
    }
    write_atomically(os.path.join(out_dir, "results.json"),
                     json.dumps(json_safe(summary), indent=1).encode("utf-8"))
    if not ns.no_export:
        print("\n" + _export_summary(export))
    written = [name for name in PUBLISHED if os.path.exists(os.path.join(out_dir, name))]
    print(f"\nwrote {', '.join(written)} into {out_dir} ({summary['total_seconds']:.0f} s in all)")
    return 1 if figure_note.startswith("failed") else 0


if __name__ == "__main__":
    sys.exit(main())

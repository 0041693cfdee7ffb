"""``python -m rmi_triton.export CHECKPOINT OUT.onnx [--opset N] [--static] [--verify [--atol A]
[--rtol R]] [--compare OTHER_CHECKPOINT] [--size HxW]`` (also installed as ``rmi-export``).

Rebuilds the network from the checkpoint's stored config (read with
``weights_only=True``: a file can never run code), exports it, optionally
verifies it and compares it with another checkpoint's export, prints the
report as a table and writes it as JSON next to the model (OUT.json).
Every failure prints one line to stderr and exits with code 2; the model and
its report are written only once everything has succeeded. With ``--compare``,
graphs that differ in structure exit with code 1 (model and report written).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import sys
import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple

from rmi_triton.checkpoint import CheckpointError, build_from_checkpoint, load_checkpoint
from rmi_triton.files import remove_leftovers, same_file

from .base import DEFAULT_ATOL, DEFAULT_RTOL, EXPORTING, PACKAGES, require, usable
from .errors import ExportError
from .files import STALE_S, check_writable, staged

if usable():  # (the package imported them); without, --help still answers and run() names the problem
    from .compare import comparable, compare_exports
    from .graph import summarize
    from .onnx_export import export_onnx
    from .verify import load_model, verify_onnx

PROG = "rmi-export"
EXIT_ERROR = 2
EXIT_DIFFERENT = 1  # --compare: the graphs differ in structure


class _UsageError(Exception):
    """A bad command line; reported like every other error (one line, exit 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the usage block and exit by itself
        raise _UsageError(message)


def _size(text: str) -> Tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text.strip().lower())
    if not match:
        raise argparse.ArgumentTypeError(f"--size must be HxW (e.g. 512x512), got {text!r}")
    height, width = int(match.group(1)), int(match.group(2))
    if height < 1 or width < 1:
        raise argparse.ArgumentTypeError(
            f"input size {text} cannot be taken by any network: height and width must be >= 1")
    return height, width


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"a tolerance must be a finite number >= 0, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Export a trained segmentation network to ONNX (inference "
                                            "graph only: no loss), verify it, compare two exports.")
    parser.add_argument("checkpoint", help="rmi_triton checkpoint (rmi_triton.checkpoint.save_checkpoint)")
    parser.add_argument("output", help="ONNX file to write; the report goes next to it as .json")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--static", action="store_true", help="fix the input to 1x3xHxW (--size)")
    parser.add_argument("--verify", action="store_true",
                        help="check_model, no-loss check, onnxruntime vs PyTorch, latency")
    parser.add_argument("--atol", type=_tolerance, default=None, metavar="A",
                        help=f"with --verify: allowed |onnxruntime - PyTorch| is A + R * max|logit| "
                             f"(default A = {DEFAULT_ATOL:g})")
    parser.add_argument("--rtol", type=_tolerance, default=None, metavar="R",
                        help=f"with --verify: R of that bound; float32 rounding grows with the logits "
                             f"(default R = {DEFAULT_RTOL:g}; 0 for a plain absolute tolerance)")
    parser.add_argument("--compare", metavar="OTHER_CHECKPOINT",
                        help="export this checkpoint too and compare graphs and latency "
                             "(exit status 1 when their structures differ)")
    parser.add_argument("--size", type=_size, default=(256, 256), metavar="HxW",
                        help="example/static input size and latency size (default 256x256)")
    return parser


def report_path(output: str) -> str:
    """OUT.onnx -> OUT.json (any other name: name + .json)."""
    root, ext = os.path.splitext(output)
    return (root if ext.lower() == ".onnx" else output) + ".json"


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _rows(report: Dict[str, Any]) -> List[Tuple[str, str]]:
    """The report as (label, value) rows for the table."""
    graph, export = report["graph"], report["export"]
    rows = [
        ("checkpoint", report["checkpoint"]),
        ("model", json.dumps(export["config"])),
        ("onnx file", f"{report['onnx']} ({graph['file_bytes'] / 2**20:.1f} MiB)"),
        ("export time", f"{export['seconds']:.1f} s"),
        ("opset", str(graph["opset"])),
        ("input", export["input_shape"]),
        *([("torch-only checks", "; ".join(export["runtime_checks"]) + " (not in the graph; verify runs a "
           "tiny input that breaks them)")] if export["runtime_checks"] else []),
        ("output", ", ".join(graph["outputs"])),
        ("nodes", f"{graph['node_count']} ({len(graph['op_histogram'])} op types)"),
        ("op histogram", ", ".join(f"{op} {n}" for op, n in graph["op_histogram"].items())),
        ("parameters", f"{graph['parameter_count']:,} ({graph['parameter_bytes'] / 2**20:.1f} MiB)"),
    ]
    verify = report.get("verify")
    if verify:
        rows += [
            ("check_model", verify["check_model"]),
            ("training leftovers", "none (no loss, dropout or training-mode BN nodes)"),
            ("max |ORT - torch|", ", ".join(f"{k}: {v:.2e} <= {verify['tolerance'][k]:.2e}"
                                            for k, v in verify["max_abs_diff"].items())
             + f" (tolerance atol {verify['atol']:g} + rtol {verify['rtol']:g} x max|logit|)"),
            ("ORT latency", f"{verify['latency_median_ms']:.2f} ms median at {verify['latency_size']} "
                            f"({verify['latency_runs']} runs after {verify['latency_warmup']} warm-up)"),
            ("verify time", f"{verify['seconds']:.1f} s"),
        ]
    compare = report.get("compare")
    if compare:
        rows += [
            ("compared with", compare["path_b"]),
            ("same structure", "yes" if compare["identical"] else "NO: " + "; ".join(compare["mismatches"])),
        ]
        if compare["latency_ratio_b_over_a"] is not None:
            rows.append(("latency A / B", f"{compare['latency_median_ms_a']:.2f} / {compare['latency_median_ms_b']:.2f} ms "
                                          f"median, ratio B/A {compare['latency_ratio_b_over_a']:.3f} "
                                          f"({compare['rounds']} interleaved rounds at {compare['latency_size']})"))
    rows.append(("report", report["report"]))
    return rows


def format_table(report: Dict[str, Any]) -> str:
    rows = _rows(report)
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def _refuse_overwriting_inputs(outputs: Dict[str, str], inputs: Dict[str, Optional[str]]) -> None:
    """The files written replace their paths: one that is also an input would be lost (a
    checkpoint's weights overwritten by the ONNX graph)."""
    for out_name, out_path in outputs.items():
        for in_name, in_path in inputs.items():
            if in_path is not None and same_file(out_path, in_path):
                raise _UsageError(f"{out_name} {out_path!r} is {in_name}: writing it would destroy an input; "
                                  "choose another output path")


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Do the work of one command line; raises on any failure, writes only on success."""
    require(PACKAGES if args.verify or args.compare else EXPORTING)  # what is missing, before any work
    if not args.verify and (args.atol is not None or args.rtol is not None):
        raise _UsageError("--atol and --rtol set the tolerance of --verify, which was not asked for")
    output = check_writable(args.output)  # before any work: fail fast, name the path
    json_path = check_writable(report_path(output))
    _refuse_overwriting_inputs({"OUT": output, "its report": json_path},
                               {"the checkpoint": args.checkpoint, "--compare": args.compare})
    # what an export killed outright (SIGKILL) left behind: a model each
    for folder in {os.path.dirname(os.path.abspath(p)) for p in (output, json_path)}:
        remove_leftovers(folder, suffixes=(".onnx", ".json"), age_s=STALE_S, prefix=".staged-")
        remove_leftovers(folder, suffixes=(".onnx", ".json"))  # atomic writes cut short
    payload = load_checkpoint(args.checkpoint)
    if args.compare:
        comparable(args.compare)  # before the export: a file that cannot be compared fails fast
    network = build_from_checkpoint(payload)
    config = dict(payload["config"])
    shape = (1, 3, *args.size)
    report: Dict[str, Any] = {"checkpoint": os.fspath(args.checkpoint), "onnx": output, "report": json_path}
    with staged(output) as onnx_tmp, staged(json_path) as json_tmp:
        info = export_onnx(network, onnx_tmp, opset=args.opset, dynamic=not args.static,
                           example_shape=shape, config=config)
        info.input_spec.check(shape)  # a size rule found at export time names the size it refuses
        report["export"] = dict(info.to_dict(), path=output)
        report["graph"] = summarize(load_model(onnx_tmp), onnx_tmp).to_dict()
        if args.verify:
            tolerance = {k: v for k, v in (("atol", args.atol), ("rtol", args.rtol)) if v is not None}
            verified = verify_onnx(onnx_tmp, network, latency_size=shape, display_path=output, **tolerance)
            report["verify"] = verified.to_dict()
        if args.compare:
            compared = compare_exports(onnx_tmp, args.compare, latency_size=shape, opset=args.opset,
                                       dynamic=not args.static, example_shape=shape)
            report["compare"] = dict(compared.to_dict(), path_a=output)
        with open(json_tmp, "w") as f:
            json.dump(report, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
    return report


def _stop_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through `staged`, which removes what it staged


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit code (0 success, 1 --compare found other structures, 2 any error).
    SIGTERM (a scheduler's, `timeout`'s) ends it as an exception would: nothing staged is left."""
    if threading.current_thread() is not threading.main_thread():
        return _main(argv)
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: Optional[Sequence[str]]) -> int:
    try:
        args = _parser().parse_args(argv)
        report = run(args)
    except _UsageError as err:
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_ERROR
    except (ExportError, CheckpointError, FileNotFoundError, OSError, ImportError) as err:
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as err:  # from torch, onnx, onnxruntime: an uncaught one would exit with 1, --compare's answer
        print(f"{PROG}: error: {type(err).__name__}: {_one_line(err)}", file=sys.stderr)
        return EXIT_ERROR
    print(format_table(report))
    if "compare" in report and not report["compare"]["identical"]:
        print(f"{PROG}: the two checkpoints' graphs differ in structure (the report lists how)", file=sys.stderr)
        return EXIT_DIFFERENT
    return 0


if __name__ == "__main__":
    sys.exit(main())

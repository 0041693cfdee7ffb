"""ONNX export of the segmentation networks, with proof that the loss costs nothing at inference.

    from rmi_triton.export import export_onnx, verify_onnx, compare_exports
    export_onnx(model_or_training_wrapper, "net.onnx")      # image [N,3,H,W] -> logits [N,C,H,W]
    report = verify_onnx("net.onnx", model)                  # checker, no loss nodes, ORT == PyTorch
    compare_exports("ce.pt", "rmi.pt")                       # same graph whatever the loss; latency ratio

Command line: ``python -m rmi_triton.export CHECKPOINT OUT.onnx [--verify] [--compare OTHER]``.
"""

from .base import import_failed, missing, require, usable
from .errors import ExportError

if not missing(["onnx"]):
    try:
        from .compare import CompareReport, compare_exports
        from .graph import GraphSummary, summarize, training_leftovers
        from .network import find_network, model_config
        from .onnx_export import ExportInfo, export_onnx
        from .shapes import DimRule, InputSpec
        from .verify import DEFAULT_SIZES, VerificationError, VerifyReport, verify_onnx
    except Exception as err:  # onnx (or what it imports) is installed but does not import
        import_failed(err)
if not usable():
    # the modules import onnx: without it the package still imports (the command line answers
    # --help and names the extra), and each of its names raises an ImportError saying what to install
    def __getattr__(name: str):
        if name in __all__:
            require()
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "CompareReport",
    "DEFAULT_SIZES",
    "DimRule",
    "ExportError",
    "ExportInfo",
    "GraphSummary",
    "InputSpec",
    "VerificationError",
    "VerifyReport",
    "compare_exports",
    "export_onnx",
    "find_network",
    "model_config",
    "summarize",
    "training_leftovers",
    "verify_onnx",
]

"""The parts of `rmi_triton.export` that import without its extra packages (onnx, onnxruntime,
onnxscript: ``pip install 'rmi_triton[export]'``): the check that names what is missing, and
the verification's default tolerances, which the command line's ``--help`` shows.

Each use asks for what it needs: an export onnx and onnxscript, a verification or comparison
onnxruntime too. Without onnx the package still imports, and each of its public names raises
an ImportError naming the extra; ``rmi-export`` answers ``--help`` and otherwise says the same
in one line (exit 2). Before, both failed deep inside with a bare ``No module named 'onnx'``.
"""

from __future__ import annotations

import importlib.util
from typing import List, Sequence

PACKAGES = ("onnx", "onnxruntime", "onnxscript")
EXPORTING = ("onnx", "onnxscript")  # onnxscript: torch.onnx's exporter writes the graph with it
INSTALL = "pip install 'rmi_triton[export]'"

# onnxruntime differs from PyTorch by float32 rounding, which grows with the logits'
# magnitude and the network's depth, so the allowed difference is ATOL + RTOL * max|logit|.
# Measured on correct exports (BN statistics from data, logits ~10): ResNet-18 within
# 7e-6 * max|logit|, ResNet-50/101 within 2e-4 from 96x96 to 513x513, where PyTorch float32
# itself is as far from float64. Faults moved the logits by 5e-3 * max|logit| (one class's
# bias off by 0.05) to 2e-2 (one conv's weights 1% off) and beyond (a missing ReLU, another
# interpolation). RTOL sits between, 5x from each side.
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3


def missing(packages: Sequence[str] = PACKAGES) -> List[str]:
    """Those of `packages` (of the extra) that are not installed here."""
    return [name for name in packages if importlib.util.find_spec(name) is None]


# Why the package's modules that import onnx failed to (`__init__` records it): an install of the
# extra that is there but broken (a partial upgrade, a wheel for another Python)
_BROKEN: List[str] = []


def import_failed(err: BaseException) -> None:
    """Record why the modules that import onnx failed to import (the package's `__init__`)."""
    text = str(err).strip().splitlines()
    _BROKEN.append(f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": "))


def usable() -> bool:
    """Whether the exporter's modules are imported (onnx installed, and importing)."""
    return not missing(["onnx"]) and not _BROKEN


def require(packages: Sequence[str] = PACKAGES) -> None:
    """Raise an ImportError naming those of `packages` that are absent and the extra that installs them,
    or, with all of them there, saying why the exporter's modules did not import."""
    absent = missing(packages)
    if absent:
        raise ImportError(f"rmi_triton.export needs {', '.join(absent)}, not installed here: {INSTALL}")
    if _BROKEN:
        raise ImportError(f"rmi_triton.export cannot import the ONNX packages installed here ({_BROKEN[0]}); "
                          f"reinstall them: {INSTALL}")

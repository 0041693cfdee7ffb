"""The Triton engine with its kernels stubbed out, for host-side measurements without a GPU.

Every Triton launch does nothing, every engine buffer is zero-filled and the block sizes
are a GPU's, so a step runs the engine's Python, its ATen ops (on zero data) and its
allocations as on a GPU, without the kernels' work: bench/host_time.py times that host
work, bench/memory_ledger.py adds up the allocations. Import this module before triton (it sets TRITON_INTERPRET=1, so
that the engine counts as available on a CPU).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from rmi_triton import algebra  # noqa: E402
from rmi_triton.engines import triton_engine  # noqa: E402


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


class _MergeStub:
    """Kernel B3 stubbed: the matrix it writes for the algebra gets its ridge, aI (zero
    statistics then factorise like real ones, with no repair); one fill_ where a launch was."""

    def __init__(self, kernel):
        self.joint_at = kernel.arg_names.index("joint_ptr")

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            joint = args[self.joint_at]
            joint.diagonal(dim1=-2, dim2=-1).fill_(kwargs["RIDGE_A"])
        return launch


def _zeros(shape, dtype, device, *args, **kwargs):
    return torch.zeros(shape, dtype=dtype, device=device)


def stub_kernels(setattr=setattr) -> None:
    """Replace the engine's kernels and buffer allocation (for good, or through
    `setattr`, e.g. pytest's monkeypatch.setattr, until it undoes them), with a GPU's
    block sizes."""
    triton_engine.use_gpu_blocks(setattr)
    merge = _MergeStub(triton_engine._merge_moments_kernel)
    for name in triton_engine.KERNEL_NAMES:
        setattr(triton_engine, name, _NoLaunch())
    setattr(triton_engine, "_merge_moments_kernel", merge)
    # zero statistics factorise (Sp + aI, V + aI = aI) like real ones
    setattr(triton_engine, "_new", _zeros)


def count_repairs(setattr=setattr) -> list:
    """-> a list that grows by one each time the algebra takes its repair path: a stubbed
    step that does is not a real step (zero statistics factorise without one)."""
    repairs = []
    retried = algebra.repaired_cholesky

    def counted(*args, **kwargs):
        repairs.append(1)
        return retried(*args, **kwargs)

    setattr(algebra, "repaired_cholesky", counted)
    return repairs

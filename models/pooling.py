"""Adaptive average pooling that exports to ONNX for dynamic input sizes.

``F.adaptive_avg_pool2d(x, k)`` with ``k > 1`` has no ONNX counterpart when the
input size is not known at export time (ONNX only has a *global* average pool),
so PSPNet's pyramid pooling would not export.  This module computes the same
result from ops that do export: ``arange``, integer arithmetic, comparisons and
two matrix products.

PyTorch's adaptive pooling splits an axis of length ``L`` into ``k`` bins, bin
``i`` covering ``[floor(i * L / k), ceil((i + 1) * L / k))``; bins may overlap
and, when ``L < k``, repeat.  A bin of the 2-D output is the product of a row
bin and a column bin, so its mean is the mean over the row bin of the means
over the column bin.  Writing the per-axis averaging as a ``[k, L]`` matrix
``A`` (``A[i, j] = 1 / |bin i|`` when ``j`` lies in bin ``i``, else 0) gives
``pool(x) = A_h @ x @ A_w^T``, exact up to float rounding.
"""

from __future__ import annotations

from typing import Tuple, Union

import torch
from torch import Tensor


def bin_average_matrix(length: int, bins: int, like: Tensor) -> Tensor:
    """Averaging matrix ``[bins, length]`` of adaptive pooling along one axis.

    ``length`` may be a symbolic size (``x.shape[-1]`` under export); the bin
    bounds are computed as tensors so they follow the dynamic size.  The result
    has ``like``'s dtype and device.
    """
    index = torch.arange(bins, device=like.device)
    # Integer arithmetic on non-negative values: floor and ceil of i * L / k exactly.
    start = torch.div(index * length, bins, rounding_mode="floor")
    end = torch.div((index + 1) * length + (bins - 1), bins, rounding_mode="floor")
    position = torch.arange(length, device=like.device)
    inside = (position.unsqueeze(0) >= start.unsqueeze(1)) & (
        position.unsqueeze(0) < end.unsqueeze(1)
    )
    counts = (end - start).to(like.dtype).unsqueeze(1)
    return inside.to(like.dtype) / counts


def adaptive_avg_pool2d_exportable(x: Tensor, output_size: Union[int, Tuple[int, int]]) -> Tensor:
    """Drop-in for ``F.adaptive_avg_pool2d`` built from ONNX-exportable ops.

    ``x``: ``[N, C, H, W]`` (any H, W >= 1, also symbolic) -> ``[N, C, kh, kw]``
    where ``(kh, kw) = output_size`` (an int means square).
    """
    kh, kw = (output_size, output_size) if isinstance(output_size, int) else output_size
    rows = bin_average_matrix(x.shape[-2], kh, x)  # [kh, H]
    cols = bin_average_matrix(x.shape[-1], kw, x)  # [kw, W]
    # [kh, H] @ [N, C, H, W] -> [N, C, kh, W]; then @ [W, kw] -> [N, C, kh, kw].
    return torch.matmul(torch.matmul(rows, x), cols.transpose(0, 1))

"""Whether the loss may read device values on the host now.

Eager calls check the Cholesky factorisation's success on the host (the step's one sync)
and count repairs in Python ints. Two settings forbid such reads: torch.compile (a read
would break the graph) and the capture of a CUDA graph (a read is an error there, and a
replay would not repeat it). There the d x d algebra repairs with a fixed number of
retries and no check; a captured step counts no repairs.
"""

from __future__ import annotations

import torch


def capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on the current stream of `device`'s kind (never
    while torch.compile traces: the query is no op it can put in a graph; a compiled graph
    run in a capture took the branch-free path when it was traced)."""
    return device.type == "cuda" and not torch.compiler.is_compiling() and torch.cuda.is_current_stream_capturing()


def host_reads_forbidden(device: torch.device) -> bool:
    """Whether values on `device` must not be read on the host: under torch.compile, or
    while a CUDA graph is captured."""
    return torch.compiler.is_compiling() or capturing(device)

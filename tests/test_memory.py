"""Memory: 300 training iterations with RMILoss leave resident memory flat; the peak of a
Triton-engine step, its allocations counted."""

import os
import subprocess
import sys

import pytest

from helpers import bench_module

SOAK = os.path.join(os.path.dirname(__file__), "memory_soak.py")


def _readings(backend, iterations, block):
    out = subprocess.run([sys.executable, SOAK, backend, str(iterations), str(block)], check=True,
                         capture_output=True, text=True, timeout=600).stdout
    return [int(v) for v in out.split()]


def test_resident_memory_stays_flat():
    """The torch engine, where it runs here (the Triton engine's soak is in bench/gpu_check.py:
    under the interpreter its memory is numpy's, not the kernels')."""
    iterations, block = 300, 25
    readings = _readings("torch", iterations, block)
    assert len(readings) == iterations // block
    # after the first block (warm-up: allocator pools, lazily loaded kernels), growth stays
    # within noise: a leak of one small tensor per step would add far more over the run
    growth_kb = max(readings[1:]) - readings[1]
    assert growth_kb < 8 * 1024, f"resident memory grew by {growth_kb / 1024:.1f} MB: {readings}"


def test_triton_step_peak_allocation_at_the_paper_setting(monkeypatch):
    """Issue 3's memory bar, by bench/memory_ledger.py's count of a Triton-engine step's
    allocations (kernels stubbed, a GPU's block sizes) at 16x21x513x513, avg 4: the step's
    peak is the gradient and one pooled float32 map, dL/dp' (y' and p' are dropped once kernel
    C has read them), and the d x d statistics -- 6.5% of the logits beyond the gradient, where
    the bar is 10%. The forward keeps y' and p' for the backward and frees B0's float64 maps.
    (The ledger reproduced the H200's torch.cuda.max_memory_allocated at b50df00 to 1 MiB.)"""
    import torch

    ledger = bench_module("memory_ledger")
    stubbed = bench_module("stubbed")
    stubbed.stub_kernels(monkeypatch.setattr)
    repairs = stubbed.count_repairs(monkeypatch.setattr)
    from rmi_triton import rmi_loss

    n, c, h, w, pool = 16, 21, 513, 513, 4
    logits = torch.zeros(n, c, h, w)  # the stubs read nothing
    labels = torch.zeros(n, h, w, dtype=torch.long)
    step = ledger.step_ledger(lambda x, y: rmi_loss(x, y, pool_size=pool, validate=False, backend="triton"),
                              logits, labels)
    assert not repairs
    pooled_map = n * c * (h // pool + 1) * (w // pool + 1) * 4  # ceil-mode pooling: 129 x 129 cells
    small = 1 << 20  # the d x d statistics, factors and gradients: about 0.3 MiB
    assert step["gradient"] == step["logits"] == logits.numel() * 4
    assert 0 <= step["forward net"] - 3 * pooled_map < small, step  # y' and p' (float64) saved, nothing else
    assert step["forward peak"] < step["gradient"]  # the backward sets the step's peak
    assert 0 <= step["peak"] - step["gradient"] - pooled_map < small, step
    assert ledger.beyond_gradient(step) <= 0.10


@pytest.mark.parametrize("pool", [1, 2])
def test_triton_forward_peak_with_large_pooled_maps(pool, monkeypatch):
    """Without pooling or with 2 x 2, kernel B0's float64 maps outweigh y' and p': made a run
    of images at a time, they take at most MAP_BYTES_PER_LOGIT bytes a logit (or one image's),
    so the forward's peak is y', p' and one run's maps (at pool 1, 523% of the logits beyond the gradient
    when all the maps were made at once; 200%, cross-entropy's, with a float32 p'; 301% with p' in
    float64)."""
    import torch

    ledger = bench_module("memory_ledger")
    stubbed = bench_module("stubbed")
    stubbed.stub_kernels(monkeypatch.setattr)
    from rmi_triton import rmi_loss
    from rmi_triton.engines import triton_engine

    n, c, h, w = 8, 21, 256, 256  # the maps: 183 MB at pool 1, 48 MB at pool 2
    logits, labels = torch.zeros(n, c, h, w), torch.zeros(n, h, w, dtype=torch.long)
    step = ledger.step_ledger(lambda x, y: rmi_loss(x, y, pool_size=pool, validate=False, backend="triton"),
                              logits, labels)
    low = h // pool + (1 if pool > 1 else 0)  # ceil-mode pooling with padding s // 2
    pooled_maps = n * c * low * low * (4 + 8)  # y' float32, p' float64
    one_image = c * 2 * triton_engine._map_stride(low, low, 3) * 8  # a run holds one image at least
    budget = max(triton_engine.MAP_BYTES_PER_LOGIT * logits.numel(), triton_engine.MAP_BYTES_FLOOR, one_image)
    sums = 8 << 20  # B1, B1b and B2's sums, every plane's kept across the runs, and the rest
    assert step["forward peak"] <= pooled_maps + budget + sums, step
    # float64 p' (exact where p is near 1) costs these settings: at pool 1 kernel C's phase holds
    # y', p' and dL/dp', 4 times the logits; at pool 2 the forward's y', p' and one run's maps
    assert ledger.beyond_gradient(step) <= {1: 3.05, 2: 0.50}[pool]

"""Memory stability: 300 training iterations with RMILoss leave resident memory flat."""

import os
import subprocess
import sys

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

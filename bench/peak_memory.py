"""Peak resident memory of one forward+backward, in a fresh process per provider.

    python bench/peak_memory.py PROVIDER N C H W POOL_SIZE [LABELS]

Prints `baseline_kb peak_kb`: VmHWM (the process's resident high-water mark)
after the inputs exist and after one forward+backward. A fresh process is
needed because the high-water mark only grows (ru_maxrss even carries over exec).
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from providers import loss_fn, make_inputs  # noqa: E402


def vm_hwm_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_hwm():
    # writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def main():
    provider, *dims = sys.argv[1:]
    kind = dims.pop() if len(dims) == 6 else "uniform"
    n, c, h, w, pool = map(int, dims)
    torch.set_num_threads(2)
    fn = loss_fn(provider, pool)
    logits, labels = make_inputs((n, c, h, w), labels=kind)
    # warm-up on a tiny input: libraries and allocator caches load outside the measurement
    small_x, small_y = make_inputs((1, c, 64, 64))
    fn(small_x.requires_grad_(), small_y).backward()
    logits.requires_grad_(True)
    reset_hwm()
    baseline = vm_hwm_kb()
    fn(logits, labels).backward()
    print(baseline, vm_hwm_kb())


if __name__ == "__main__":
    main()

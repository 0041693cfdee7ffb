"""CPU benchmarks: forward, backward and forward+backward of every provider, and peak memory.

    pytest bench --benchmark-only                       # all of them
    python bench/report.py .benchmarks/cpu.json          # the table of medians and ratios

Timing lives here, never in the pass/fail tests.
"""

import os
import subprocess
import sys

import pytest
import torch

from providers import CPU_SHAPES, loss_fn, make_inputs

PROVIDERS = ["cross_entropy", "bce_with_logits", "published", "torch"]
MODES = ["forward", "backward", "full"]


def _runner(provider, shape_name, mode):
    shape, pool, kind = CPU_SHAPES[shape_name]
    fn = loss_fn(provider, pool)
    logits, labels = make_inputs(shape, labels=kind)
    logits.requires_grad_(True)

    if mode == "forward":
        def run():
            with torch.no_grad():
                return fn(logits, labels)
        return run, None
    if mode == "full":
        def run():
            logits.grad = None
            fn(logits, labels).backward()
        return run, None

    def setup():  # backward alone: a fresh graph each round, outside the timing
        logits.grad = None
        return (fn(logits, labels),), {}
    return (lambda loss: loss.backward()), setup


@pytest.mark.parametrize("shape_name", list(CPU_SHAPES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_speed(benchmark, provider, mode, shape_name):
    benchmark.group = f"{shape_name} {mode}"
    benchmark.extra_info.update(provider=provider, mode=mode, shape=shape_name, threads=torch.get_num_threads())
    run, setup = _runner(provider, shape_name, mode)
    rounds = 3 if provider == "published" else 10
    if setup is None:
        benchmark.pedantic(run, rounds=rounds, warmup_rounds=1)
    else:
        benchmark.pedantic(run, setup=setup, rounds=rounds, warmup_rounds=1)


@pytest.mark.parametrize("shape_name", list(CPU_SHAPES))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_peak_memory(benchmark, provider, shape_name):
    """Extra resident memory of forward+backward over the inputs, in a fresh process."""
    (n, c, h, w), pool, kind = CPU_SHAPES[shape_name]
    script = os.path.join(os.path.dirname(__file__), "peak_memory.py")

    def measure():
        out = subprocess.run([sys.executable, script, provider, str(n), str(c), str(h), str(w), str(pool), kind],
                             check=True, capture_output=True, text=True).stdout.split()
        return int(out[0]), int(out[1])

    baseline, peak = benchmark.pedantic(measure, rounds=1, iterations=1)
    benchmark.group = f"{shape_name} peak memory"
    benchmark.extra_info.update(provider=provider, mode="memory", shape=shape_name,
                                extra_peak_mb=(peak - baseline) / 1024,
                                logits_mb=n * c * h * w * 4 / 2 ** 20)

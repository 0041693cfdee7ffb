"""bench/gpu_check.py's reading of the performance targets, from the figures a GPU run reports
(the run itself needs a GPU; `--dry-run` runs its code on the CPU in about 4-5 minutes: 263 s at 1eaac6d)."""

import pytest

from helpers import bench_module


@pytest.fixture(scope="module")
def gpu_check():
    module = bench_module("gpu_check")  # parses no command line when imported
    assert module.BENCH_SHAPES[0] == ((16, 21, 513, 513), 4)
    return module


def _figures(ce_ms, published_ms, triton_ms, extra_mb, a_ms, d_ms):
    shape, pool = "16x21x513x513", "avg 4"
    timings = [dict(shape=shape, pool=pool, provider="cross_entropy", full_ms=ce_ms),
               dict(shape=shape, pool=pool, provider="published_f64", full_ms=published_ms),
               dict(shape=shape, pool=pool, provider="triton_engine", full_ms=triton_ms, extra_mb=extra_mb,
                    logits_mb=16 * 21 * 513 * 513 * 4 / 2**20),
               dict(shape=shape, pool="avg 2", provider="triton_engine", full_ms=0.1)]  # another shape: not read
    breakdown = dict(shape=shape, pool=pool, kernels={"_pool_forward_kernel": (1, a_ms),
                                                      "_pool_backward_kernel": (1, d_ms), "other": (30, 0.1)})
    return timings, breakdown


def test_bars_of_the_fifth_h200_run(gpu_check):
    """b50df00's H200 figures (bench/RESULTS.md): the bars as the hand-made table read them
    (its 764 MB for D rounded 763.4 up), but for kernel A's bytes, which count today's p' in
    float64 (454 MB where b50df00's A moved 432: 45% then)."""
    rows = gpu_check.bars(*_figures(1.17, 23.93, 2.71, 402.0, 0.229, 0.421), 4236e9)
    assert [met for _, _, met in rows] == [False] * 5
    measured = [m for _, m, _ in rows]
    assert measured[0].startswith("2.32x") and measured[1] == "8.8x" and measured[2] == "19.2%"
    assert measured[3] == "47% (454 MB in 0.229 ms)" and measured[4] == "43% (763 MB in 0.421 ms)"


def test_bars_met_and_missing(gpu_check):
    rows = gpu_check.bars(*_figures(1.17, 23.93, 1.0, 359.1, 0.15, 0.28), 4236e9)
    assert [met for _, _, met in rows] == [True] * 5
    timings, breakdown = _figures(1.17, None, 1.0, 359.1, 0.15, 0.28)
    rows = gpu_check.bars(timings, {}, None)  # the published formula skipped, no profile, no bandwidth
    assert [met for _, _, met in rows] == [True, None, True, None, None]
    assert rows[3][1] == "-% (454 MB in - ms)"


def test_kernel_bytes(gpu_check):
    """A: logits + labels read, y' (float32) and p' (float64) written; D: logits, labels and
    dL/dp' (float32) read, gradient written; at pool size 3, y' is float64 too."""
    logits, labels, cells = 16 * 21 * 513 * 513 * 4, 16 * 513 * 513 * 8, 16 * 21 * 129 * 129
    moved = gpu_check.kernel_bytes((16, 21, 513, 513), 4)
    assert moved == {"_pool_forward_kernel": logits + labels + 12 * cells,
                     "_pool_backward_kernel": 2 * logits + labels + 4 * cells}
    cells_3 = 16 * 21 * 171 * 171  # (513 + 2 - 3) // 3 + 1
    assert gpu_check.kernel_bytes((16, 21, 513, 513), 3)["_pool_forward_kernel"] == logits + labels + 16 * cells_3


def test_bar_of_the_captured_step(gpu_check):
    """With the step's variants a last row reads the time bar on the CUDA-graph replay: b50df00's
    H200 run replayed the step (its sync patched out then) in 1.58 ms, 1.35x cross-entropy."""
    figures = _figures(1.17, 23.93, 2.71, 402.0, 0.229, 0.421)
    rows = gpu_check.bars(*figures, 4236e9, dict(graph_replay_ms=1.58))
    assert len(rows) == 6 and rows[-1][2] is False and rows[-1][1] == "1.35x (1.580 ms replayed)"
    assert gpu_check.bars(*figures, 4236e9, dict(graph_replay_ms=1.2))[-1][2] is True
    failed = gpu_check.bars(*figures, 4236e9, dict(graph_replay_ms="RuntimeError: capture failed"))
    assert failed[-1][2] is None

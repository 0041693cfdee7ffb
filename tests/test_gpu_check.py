"""bench/gpu_check.py's reading of the performance targets, from the figures a GPU run reports
(the run itself needs a GPU; `--dry-run` runs its code on the CPU in about 4-5 minutes: 263 s at 1eaac6d)."""

import pytest

from helpers import bench_module

# module-wide fixtures: under pytest-xdist this file runs whole in one worker (conftest.WHOLE_FILES)


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


def test_a_failing_section_costs_none_of_the_others(gpu_check, monkeypatch, tmp_path, capsys):
    """The run on a lent GPU is the one chance: a section that raises (a kernel fault, an API
    missing from the device's torch) is reported in its place, the later sections still run,
    the report and its bars are printed, and gpu_check.json is written after every section."""
    import json

    import torch

    ran, saved_before = [], {}

    def section(name, value=None, error=None):
        def measure(*args, **kwargs):
            ran.append(name)
            json_now = tmp_path / "gpu_check.json"
            saved_before[name] = sorted(json.loads(json_now.read_text())) if json_now.exists() else []
            if error:
                raise error
            return value
        return measure

    rows = [dict(backend="triton", dtype="float32", options="defaults", loss_rel=1e-8, grad_rel=1e-7, ok=True)]
    monkeypatch.setattr(gpu_check, "check_correctness", section("correctness", rows))
    monkeypatch.setattr(gpu_check, "measure_copy_bandwidth", section("bandwidth", 4e12))
    monkeypatch.setattr(gpu_check, "profile_triton_step", section("breakdown", error=RuntimeError("illegal address")))
    monkeypatch.setattr(gpu_check, "run_timings", section("timings", [dict(
        shape="16x21x513x513", pool="avg 4", provider="cross_entropy", full_ms=1.17)]))
    monkeypatch.setattr(gpu_check, "time_step_variants", section("variants", dict(graph_replay_ms=1.0)))
    monkeypatch.setattr(gpu_check, "time_max_pooling", section("max_pooling", dict(rows=[])))
    monkeypatch.setattr(gpu_check, "check_compile", section("compile", dict(ok=True, graph_breaks=0)))
    monkeypatch.setattr(gpu_check, "check_autocast_and_soak", section("mixed", error=KeyError("autocast")))
    monkeypatch.setattr(gpu_check, "DEVICE", torch.device("cpu"))
    monkeypatch.setattr(gpu_check.ARGS, "out", str(tmp_path))
    monkeypatch.setattr(gpu_check.ARGS, "commit", "abc1234")
    monkeypatch.setattr(gpu_check.ARGS, "budget_s", 1e9)
    assert gpu_check.main() == 1  # two sections failed
    assert ran == ["correctness", "bandwidth", "breakdown", "timings", "variants", "compile", "mixed", "max_pooling"]
    assert saved_before["compile"] == ["bandwidth", "bars", "breakdown", "correctness", "machine", "not_run",
                                       "timings", "variants"]
    out = capsys.readouterr().out
    assert "commit abc1234" in out and " UTC" in out
    assert "== section breakdown: failed: RuntimeError: illegal address" in out
    assert "== section mixed: failed: KeyError" in out
    assert "== the performance targets" in out and "== correctness vs float64 reference: 1/1 ok" in out
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["breakdown"]["error"] == "failed: RuntimeError: illegal address"
    assert saved["bandwidth"] == 4e12 and saved["machine"].endswith("commit abc1234")
    assert saved["not_run"] == {"breakdown": "failed: RuntimeError: illegal address",
                                "mixed": "failed: KeyError: 'autocast'"}
    assert len(saved["bars"]) == 6


def test_sections_after_the_budget_are_skipped_and_reported(gpu_check, monkeypatch, capsys):
    import torch

    rows = [dict(backend="torch", dtype="float32", options="defaults", loss_rel=1e-8, grad_rel=1e-7, ok=True)]
    monkeypatch.setattr(gpu_check, "check_correctness", lambda: rows)
    for name in ("measure_copy_bandwidth", "profile_triton_step", "run_timings", "time_step_variants",
                 "time_max_pooling", "check_compile", "check_autocast_and_soak"):
        monkeypatch.setattr(gpu_check, name, lambda *a, **k: pytest.fail("started after the budget"))
    monkeypatch.setattr(gpu_check, "DEVICE", torch.device("cpu"))
    monkeypatch.setattr(gpu_check.ARGS, "out", None)
    monkeypatch.setattr(gpu_check.ARGS, "budget_s", -1.0)
    assert gpu_check.main() == 0  # skipped sections are not failures
    out = capsys.readouterr().out
    for name in ("bandwidth", "breakdown", "timings", "variants", "compile", "mixed", "max_pooling"):
        assert f"== section {name}: skipped: the run's time budget is spent" in out
    assert "== the performance targets" in out


def test_the_replay_bar_needs_the_replay_to_match_eager(gpu_check):
    figures = _figures(1.17, 23.93, 2.71, 402.0, 0.229, 0.421)
    row = gpu_check.bars(*figures, 4236e9, dict(graph_replay_ms=1.2, graph_replay_rel=3e-3))[-1]
    assert row[2] is None and "differs from eager" in row[1]
    assert gpu_check.bars(*figures, 4236e9, dict(graph_replay_ms=1.2, graph_replay_rel=0.0))[-1][2] is True

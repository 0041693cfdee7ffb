"""A training step inside a CUDA graph capture: no value read on the host, repairs without
a check, clear errors for what cannot be captured.

There is no CUDA here: `rmi_triton.capture.capturing` is made to answer True, so the loss
takes the path it takes while a CUDA graph captures the current stream (bench/gpu_check.py
captures and replays a real step on a GPU). Counted with bench/op_count.py's OpCounter:
a read of a device value on the host is an `_local_scalar_dense` op, or an op whose output
size depends on the data (the host waits for it the same way).
"""

import pytest
import torch

from rmi_triton import RMILoss, capture, rmi_loss
from rmi_triton.algebra import CholeskyReport, _identity, _zero, half_logdet_posterior
from rmi_triton.engines import triton_engine
from rmi_triton.options import _device_constant

from helpers import assert_close_rel, bench_module, random_inputs

pytestmark = pytest.mark.skipif(not triton_engine.available(),
                                reason="triton is not installed or TRITON_INTERPRET is not set")

DATA_SIZED = {"nonzero", "masked_select", "unique", "_unique2", "unique_consecutive", "repeat_interleave"}


def _counted(fn):
    """-> (fn(), the op counter that watched it)."""
    counter = bench_module("op_count").OpCounter()
    with counter:
        out = fn()
    return out, counter


def _eager_then_captured(monkeypatch, crit, logits, labels, before=None):
    """A step of `crit` in eager mode (the warm-up a capture needs first), then one with the capture
    simulated (`before()` called as it starts): asserts both give the same loss and gradient,
    -> the op counter that watched the captured step."""
    x_eager = logits.clone().requires_grad_()
    eager = crit(x_eager, labels)
    eager.backward()
    monkeypatch.setattr(capture, "capturing", lambda device: True)
    if before is not None:
        before()
    x = logits.clone().requires_grad_()

    def step():
        loss = crit(x, labels)
        loss.backward()
        return loss

    loss, counter = _counted(step)
    assert_close_rel(loss, eager, 1e-12, "loss")
    assert_close_rel(x.grad, x_eager.grad, 1e-12, "gradient")
    return counter


def _assert_no_host_reads(counter, what):
    assert counter.syncs == 0, f"{what}: {counter.syncs} host reads of device values"
    assert not DATA_SIZED & set(counter.ops), f"{what}: data-sized ops {DATA_SIZED & set(counter.ops)}"


@pytest.mark.parametrize("options", [{}, {"exclude_ignored": True}, {"class_weights": (0.5, 1.0, 2.0)},
                                     {"pool": "max"}, {"pool": "interp", "probs": "softmax", "pixel_loss": "ce"}])
def test_captured_step_reads_nothing_on_the_host(monkeypatch, options):
    """Forward and backward of a Triton-engine step (validate=False) while a capture runs: not
    one host read, and the eager step's loss and gradient."""
    crit = RMILoss(backend="triton", validate=False, **options)
    counter = _eager_then_captured(monkeypatch, crit, *random_inputs(2, 3, 37, 53, seed=21))
    _assert_no_host_reads(counter, f"captured step {options}")
    assert crit.cholesky_retries == 0


def test_captured_repair_matches_eager(monkeypatch):
    """A joint matrix that fails is repaired inside a capture as in eager mode (the fixed retries,
    no check), with the same value and gradient; a captured graph counts no repairs."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 8, 40, dtype=torch.float64, generator=g)
    joint = x @ x.transpose(1, 2)
    blocks = [joint[:, :4, :4].clone(), joint[:, 4:, 4:].clone(), joint[:, :4, 4:].clone()]
    blocks[0][1] -= 1e2 * torch.eye(4, dtype=torch.float64)  # V + aI indefinite: retried
    results = []
    for captured in (False, True):
        if captured:
            monkeypatch.setattr(capture, "capturing", lambda device: True)
        report = CholeskyReport()
        inputs = [t.clone().requires_grad_() for t in blocks]
        h, counter = _counted(lambda: half_logdet_posterior(*inputs, report))
        h.sum().backward()
        results.append((h.detach(), [t.grad for t in inputs], report.retried, counter))
    (eager, eager_grads, eager_retried, _), (h, grads, retried, counter) = results
    _assert_no_host_reads(counter, "captured repair")
    assert eager_retried == 1 and retried == 0
    assert_close_rel(h, eager, 1e-12, "h")
    for got, want, name in zip(grads, eager_grads, ("Sy", "Sp", "Syp")):
        assert_close_rel(got, want, 1e-12, name)


def test_captured_constants_are_not_cached(monkeypatch):
    """The cached constants (the algebra's identity and zero, the class weights) are made inside
    the graph during a capture, the weights with fill kernels (a capture allows no copy from host
    memory): a tensor first made there holds its values only once the graph is replayed, so it
    must not be kept."""
    caches = (_identity, _zero, _device_constant)
    crit = RMILoss(backend="triton", validate=False, class_weights=(0.5, 1.0, 2.0))
    counter = _eager_then_captured(monkeypatch, crit, *random_inputs(1, 3, 21, 23, seed=23),
                                   before=lambda: [cache.cache_clear() for cache in caches])
    assert [cache.cache_info().currsize for cache in caches] == [0, 0, 0]
    assert counter.ops["fill_"] >= 3  # the weights, one fill kernel a class


def test_capture_query_compiles():
    """torch.compile never puts the capture query in a graph (it cannot: a break): a compiled
    graph that a capture replays took the branch-free path when it was traced."""
    fn = torch.compile(lambda x: x + float(capture.capturing(torch.device("cuda"))), backend="eager",
                       fullgraph=True)
    assert fn(torch.ones(2)).tolist() == [1.0, 1.0]


def test_captured_repair_cannot_fail_on_finite_statistics(monkeypatch):
    """Without host checks the retries are a fixed number: the last one takes the ridge up the ladder
    to where the matrix is diagonally dominant, so a matrix far from positive definite (eager code
    needs 7 retries here, one more than run) still gives a finite value and gradient -- eager's."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 8, 40, dtype=torch.float64, generator=g)
    joint = x @ x.transpose(1, 2)
    blocks = [joint[:, :4, :4].clone(), joint[:, 4:, 4:].clone(), joint[:, :4, 4:].clone()]
    blocks[0][1] -= 2e3 * torch.eye(4, dtype=torch.float64)
    eager = half_logdet_posterior(*blocks)
    monkeypatch.setattr(capture, "capturing", lambda device: True)
    inputs = [t.clone().requires_grad_() for t in blocks]
    captured = half_logdet_posterior(*inputs)
    captured.sum().backward()
    assert_close_rel(captured, eager, 1e-12, "h")
    assert all(torch.isfinite(t.grad).all() for t in inputs[1:])


@pytest.mark.parametrize("backend, validate, message", [("triton", True, "pass validate=False"),
                                                        ("torch", False, "backend='triton'")])
def test_capture_asks_for_what_it_needs(monkeypatch, backend, validate, message):
    """validate=True and the torch engine read values on the host: under a capture they raise an
    error that says what to pass, before any read."""
    logits, labels = random_inputs(1, 2, 21, 23, seed=22)
    monkeypatch.setattr(capture, "capturing", lambda device: True)
    with pytest.raises(ValueError, match=message):
        _counted(lambda: rmi_loss(logits, labels, backend=backend, validate=validate))

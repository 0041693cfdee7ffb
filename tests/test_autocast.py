"""Mixed precision: half-precision logits from an autocast region give a float32 loss
that matches the float32 computation, and gradients in the logits' own dtype."""

import pytest
import torch

from rmi_triton import RMILoss

from helpers import assert_close_rel, random_inputs


class _TinyNet(torch.nn.Module):
    def __init__(self, classes):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, classes, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("options", [{}, {"probs": "softmax", "pixel_loss": "ce"}, {"pool": "max"}])
def test_cpu_bfloat16_autocast_matches_float32(options):
    torch.manual_seed(0)
    net = _TinyNet(4)
    images = torch.randn(2, 3, 48, 56)
    _, labels = random_inputs(2, 4, 48, 56, seed=1)
    crit = RMILoss(backend="torch", **options)

    loss32 = crit(net(images), labels)
    (grads32,) = torch.autograd.grad(loss32, [net.conv.weight])

    logits_box = {}
    net.register_forward_hook(lambda m, i, o: logits_box.update(logits=o) or o.retain_grad())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = net(images)
        assert logits.dtype == torch.bfloat16  # the loss sees what a network produces under autocast
        loss16 = crit(logits, labels)
    assert loss16.dtype == torch.float32
    loss16.backward()
    assert logits_box["logits"].grad.dtype == torch.bfloat16
    assert torch.isfinite(net.conv.weight.grad).all()
    assert_close_rel(loss16, loss32, 1e-2, "loss under autocast")
    assert_close_rel(net.conv.weight.grad, grads32, 5e-2, "weight gradient under autocast")


def test_statistics_run_in_full_precision_inside_autocast():
    """Autocast would turn the engine's matmuls into bfloat16; the front switches it off."""
    logits, labels = random_inputs(2, 3, 40, 40, seed=2)
    crit = RMILoss(backend="torch")
    plain = crit(logits, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = crit(logits, labels)
    assert_close_rel(inside, plain, 1e-6, "float32 logits inside an autocast region")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("options", [{}, {"pool": "interp"}, {"exclude_ignored": True, "pool": "max"}])
def test_backward_inside_the_autocast_region(backend, options):
    """A training loop that calls backward() before leaving its autocast block: the engines'
    backward runs in full precision too (autocast would make the torch engine's float32
    matmuls bfloat16 and fail to write them into its float32 gradient), with the gradient of
    backward() called outside the block."""
    logits, labels = random_inputs(2, 3, 37, 45, seed=4)
    crit = RMILoss(backend=backend, **options)
    outside = logits.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = crit(outside, labels)
    loss.backward()
    inside = logits.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        crit(inside, labels).backward()
    assert inside.grad.dtype == torch.bfloat16
    assert torch.equal(inside.grad, outside.grad)

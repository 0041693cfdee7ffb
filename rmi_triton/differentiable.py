"""The loss is differentiable once: its backward formulas are closed forms, not graphs."""

from __future__ import annotations

import functools

import torch
from torch._C import _functions

_MESSAGE = (b"rmi_triton's loss is differentiable once (its gradient is formed in closed form): a second "
            b"derivative through it (a gradient penalty, a Hessian-vector product) is not available")


def once(backward):
    """A backward staticmethod whose gradients raise when differentiated again.

    Under create_graph=True (grad mode on inside the backward) each gradient returned gets a
    node that raises on a second backward. PyTorch's `once_differentiable` adds that node only
    where the incoming gradients carry a graph; the loss's never do, so there a gradient penalty
    through a network or beside another loss term came out partial, with no word.
    """

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        single = not isinstance(outputs, (tuple, list))
        outputs = (outputs,) if single else tuple(outputs)  # autograd takes a list for one gradient
        if not torch.is_grad_enabled():
            return outputs[0] if single else outputs
        present = [i for i, g in enumerate(outputs) if g is not None]
        if not present:
            return outputs[0] if single else outputs
        raising = _functions.DelayedError(_MESSAGE, len(present))(
            *(outputs[i].detach().requires_grad_() for i in present))
        raising = raising if isinstance(raising, tuple) else (raising,)
        outputs = list(outputs)
        for i, g in zip(present, raising):
            outputs[i] = g
        return outputs[0] if single else tuple(outputs)

    return wrapper

"""Shared test helpers: fresh random inputs and a relative-error check that says where it fails."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_inputs(n=2, c=3, h=37, w=53, *, scale=2.0, ignore_frac=0.1, ignore_index=255, seed=0,
                  dtype=torch.float32, label_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, c, h, w, generator=g) * scale).to(dtype)
    labels = torch.randint(0, c, (n, h, w), generator=g)
    labels[torch.rand(n, h, w, generator=g) < ignore_frac] = ignore_index
    return logits, labels.to(label_dtype)


def upsampled_inputs(n=2, c=3, h=29, w=35, seed=3):
    """A network's output: logits on a coarse grid, upsampled as `rmi_triton.models` upsample
    (bilinear, align_corners=False), so that each image's first rows and columns repeat
    exactly (rows 0-3 and columns 0-2 here). At some size ratios the interpolation's rounding
    leaves the far edge's pixels an ulp apart (on this project's CPUs rows 25-27 against row
    28 here, not on every kernel): they are set an ulp apart here, and column 3 an ulp below
    column 2. Labels with ignored pixels in image 0's first row and column (equal logits, not
    equal validity), and class 2 absent from image 1 (a plane skipped)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, c, 4, 5, generator=g) * 3
    logits = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    logits[:, :, h - 4:h - 1] = torch.nextafter(logits[:, :, h - 1:], torch.tensor(float("inf")))
    logits[..., 3] = torch.nextafter(logits[..., 2], torch.tensor(float("-inf")))
    labels = torch.randint(0, c, (n, h, w), generator=g)
    labels[0, 0, :] = 255
    labels[0, 5:, 0] = 255
    labels[1][labels[1] == 2] = 0
    return logits.contiguous(), labels


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "value"):
    """|actual - expected| / |expected| (norms) <= tol, with a message naming the worst element."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values in the result"
    err = (actual - expected).norm().item()
    ref = expected.norm().item()
    rel = err / max(ref, 1e-30)
    if rel > tol:
        diff = (actual - expected).abs().flatten()
        worst = int(diff.argmax())
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), actual.shape)) if actual.dim() else ()
        raise AssertionError(f"{what}: relative error {rel:.3e} > {tol:.1e}; worst at {index}: "
                             f"{actual.flatten()[worst].item():.9g} vs {expected.flatten()[worst].item():.9g}")


def loss_and_grad(fn, logits, labels, scale=3.7, **options):
    """Loss and d(scale * loss)/dlogits, so grad_output != 1 is exercised."""
    x = logits.detach().clone().requires_grad_(True)
    loss = fn(x, labels, **options)
    (loss * scale).backward()
    return loss.detach(), x.grad


# Every option of RMILoss, each varied from the paper's defaults (and a few together).
OPTION_CASES = [
    {},
    {"pool": "max"},
    {"pool": "interp"},
    {"pool": "none", "radius": 2},
    {"pool_size": 1},
    {"pool_size": 2, "radius": 5},
    {"pool_size": 3},
    {"pool_size": 8, "radius": 2},
    {"radius": 1},
    {"radius": 10, "pool_size": 2},
    {"pixel_loss": "ce"},
    {"pixel_loss": None},
    {"probs": "softmax"},
    {"pixel_loss": "ce", "probs": "softmax", "class_weights": [1.0, 2.0, 0.5]},
    {"class_weights": [0.3, 1.0, 2.0]},
    {"class_reduction": "mean"},
    {"combine": "additive", "rmi_weight": 2.0},
    {"rmi_weight": 0.0},
    {"rmi_weight": 1.0},
    {"exclude_ignored": True},
    {"exclude_ignored": True, "pool": "max"},
    {"exclude_ignored": True, "pool": "interp"},
    {"exclude_ignored": True, "pool": "none", "radius": 2},
    {"ignore_index": -1},
    # the trainer's setting and a CUDA graph's: the Triton engine's kernel A compiles without its check
    {"validate": False},
    {"validate": False, "probs": "softmax", "pixel_loss": "ce", "pool": "max"},
]


def case_id(options: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in options.items()) or "defaults"


def bench_module(name: str):
    """A script of bench/ (e.g. "op_count") imported as a module, for its functions; importing
    runs no benchmark."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

"""The front of the library: `RMILoss`, `rmi_loss` and `rmi_terms`.

Options are checked once (`RMIOptions`), inputs are checked here, an engine
reduces the logits to region statistics, and the shared float64 algebra
turns those into the loss. No math of the loss lives in this module beyond
combining the terms.

How ignored pixels enter (docs/DESIGN.md section 1): they get p = 1e-6 and
y = 0, and take no part in the pixel term. With `exclude_ignored=True` the
region vectors that touch them leave the statistics as well: a downsampled
cell counts as ignored when any full-resolution pixel feeding it is ignored
(any pixel of its s x s window for avg/max pooling; the nearest pixel or any
bilinearly weighted pixel for "interp"; the pixel itself for "none"), and a
region vector is left out when any of its R x R cells is ignored.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import NamedTuple, Optional

import torch

from . import capture
from .algebra import CholeskyReport, half_logdet_posterior
from .options import RMIOptions, check_int
from .precision import autocast_off
from .validation import check_inputs


class RMINumericsWarning(RuntimeWarning):
    """Some covariance matrices needed a larger ridge to factorise."""


class RMITerms(NamedTuple):
    """Everything one evaluation computes, for the optimiser and for logging."""

    loss: torch.Tensor  # scalar, what to call backward() on
    pixel: torch.Tensor  # scalar pixel term (BCE or CE; 0 when pixel_loss=None)
    rmi: torch.Tensor  # scalar RMI term after the class reduction
    rmi_per_class: torch.Tensor  # [C] per-class RMI terms (class weights applied)


@functools.lru_cache(maxsize=None)  # once a process for each reason
def _warn_fallback(reason: str) -> None:
    warnings.warn(f"rmi_triton: backend='auto' computes the loss of CUDA tensors with the PyTorch engine, "
                  f"many times slower on a GPU than the Triton engine, which cannot run here: {reason}",
                  stacklevel=2)


def _engine(logits: torch.Tensor, backend: str):
    if backend == "triton" or (backend == "auto" and logits.is_cuda):
        from .engines import triton_engine

        if backend == "auto" and not triton_engine.available():
            from .engines import torch_engine

            _warn_fallback(triton_engine.missing())
            return torch_engine
        return triton_engine
    from .engines import torch_engine

    return torch_engine


def rmi_terms(logits: torch.Tensor, labels: torch.Tensor, *, num_classes: Optional[int] = None,
              options: Optional[RMIOptions] = None, report: Optional[CholeskyReport] = None,
              **kwargs) -> RMITerms:
    """The RMI loss and its parts.

    logits: [N, C, H, W] float32 / float16 / bfloat16 (any memory layout)
    labels: [N, H, W] int64 / int32 / uint8, values in [0, C) or ignore_index
    options: an `RMIOptions`, or its fields as keyword arguments
    returns `RMITerms` with float32 scalars (loss, pixel, rmi) and rmi_per_class [C]
    """
    return _evaluate(logits, labels, _num_classes(num_classes), _resolved(options, kwargs), report, _terms)


def _resolved(options: Optional[RMIOptions], kwargs: dict) -> RMIOptions:
    if options is not None and kwargs:
        raise TypeError("pass either options= or keyword options, not both")
    if options is not None and not isinstance(options, RMIOptions):
        raise TypeError(f"options must be an RMIOptions (or pass its fields as keyword arguments), "
                        f"got {type(options).__name__}")
    if options is not None:
        return options
    unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(RMIOptions)})
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(map(repr, unknown))}; the options are "
                        + ", ".join(f.name for f in dataclasses.fields(RMIOptions)))
    return RMIOptions(**kwargs)


def _num_classes(num_classes) -> Optional[int]:
    """num_classes as an int >= 1 (numpy integers too), or None."""
    return None if num_classes is None else check_int("num_classes", num_classes, 1, 2 ** 31 - 1)


def _evaluate(logits, labels, num_classes, opts: RMIOptions, report: Optional[CholeskyReport], combine):
    """combine(pixel term, h [N, C], opts) of the inputs (num_classes checked by the front):
    `_terms` or `_loss`. Warns of repaired factorisations (at the line that called rmi_terms
    or rmi_loss) unless a `report` (RMILoss's) is given to count them."""
    if isinstance(logits, torch.Tensor) and capture.capturing(logits.device):
        _check_capturable(_engine(logits, opts.backend), opts)  # before the checks that read values
    check_inputs(logits, labels, opts, num_classes)
    engine = _engine(logits, opts.backend)
    local = report if report is not None else CholeskyReport()
    # Under autocast the network's logits arrive in half precision; the statistics and the
    # d x d algebra must still run in float32 / float64, so autocast is off in here. The terms
    # are combined before the algebra checks its factorisation (a host sync): their ops are
    # queued while the device still works, not after it.
    with autocast_off(logits.device.type):
        stats = engine.statistics(logits, labels, opts)
        out = half_logdet_posterior(stats.sy, stats.sp, stats.syp, local,
                                    then=lambda half_logdet: combine(stats.pixel, half_logdet, opts),
                                    joint=stats.joint)
    if report is None and not capture.host_reads_forbidden(logits.device) and local.retried:
        warnings.warn(_retry_message(local.retried), RMINumericsWarning, stacklevel=3)
    return out


def _check_capturable(engine, opts: RMIOptions) -> None:
    """A CUDA graph capture allows no host read of a device value: a clear error for what
    would make one, where the capture would fail deep inside."""
    if opts.validate:
        raise ValueError("validate=True checks the labels' range and the logits' finiteness on the host, "
                         "which a CUDA graph capture does not allow: pass validate=False to capture the loss")
    if not engine.CAPTURABLE:
        raise ValueError("the torch engine reads values on the host, which a CUDA graph capture does not "
                         "allow: capture the loss with the Triton engine (backend='triton', or 'auto' where "
                         "triton is installed)")


def _image_scale(half_logdet: torch.Tensor, opts: RMIOptions) -> float:
    """1 / (N d): a class's RMI term is the mean of h over the images, divided by d."""
    return 1.0 / (half_logdet.shape[0] * opts.d)


def _rmi_sum(half_logdet: torch.Tensor, opts: RMIOptions):
    """-> (total, scale): the RMI term is total * scale, total a weighted sum of h [N, C]
    (float64, one op; two with class weights), scale the mean over images, / d, and over
    classes for class_reduction="mean"."""
    c = half_logdet.shape[1]
    weights = opts.weights_tensor(c, half_logdet.device)
    total = half_logdet.sum() if weights is None else half_logdet.sum(0) @ weights
    return total, _image_scale(half_logdet, opts) / (c if opts.class_reduction == "mean" else 1)


def _per_class(half_logdet: torch.Tensor, opts: RMIOptions) -> torch.Tensor:
    """The per-class RMI terms [C], float64, class weights applied: they sum (or average) to
    the RMI term."""
    per_class = half_logdet.sum(0) * _image_scale(half_logdet, opts)
    weights = opts.weights_tensor(per_class.shape[0], per_class.device)
    return per_class if weights is None else per_class * weights


def _mixed(pixel: torch.Tensor, total: torch.Tensor, scale: float, opts: RMIOptions) -> torch.Tensor:
    """The loss, float32, from the pixel term and the RMI term total * scale: lam * pixel +
    (1 - lam) * rmi ("weighted") or pixel + lam * rmi, as total * c + pixel * c' in one product
    and one add (alpha = c'), whose backward forms dL/dpixel in one op (none for "additive")
    and dL/dtotal in one."""
    lam = opts.rmi_weight
    rmi_factor, pixel_factor = ((1 - lam) * scale, lam) if opts.combine == "weighted" else (lam * scale, 1.0)
    return torch.add(total * rmi_factor, pixel, alpha=pixel_factor).float()


def _terms(pixel: torch.Tensor, half_logdet: torch.Tensor, opts: RMIOptions) -> RMITerms:
    """All the terms, float32, from the pixel term and h [N, C] (float64)."""
    total, scale = _rmi_sum(half_logdet, opts)
    return RMITerms(_mixed(pixel, total, scale, opts), pixel.float(), (total * scale).float(),
                    _per_class(half_logdet, opts).float())


def _loss(pixel: torch.Tensor, half_logdet: torch.Tensor, opts: RMIOptions) -> torch.Tensor:
    """The loss alone, float32 (the same value as `_terms`'s): what a training step uses."""
    return _mixed(pixel, *_rmi_sum(half_logdet, opts), opts)


def rmi_loss(logits: torch.Tensor, labels: torch.Tensor, *, num_classes: Optional[int] = None,
             options: Optional[RMIOptions] = None, report: Optional[CholeskyReport] = None,
             **kwargs) -> torch.Tensor:
    """Functional form of `RMILoss`: the scalar loss. Arguments as `rmi_terms`'s."""
    return _evaluate(logits, labels, _num_classes(num_classes), _resolved(options, kwargs), report, _loss)


def _retry_message(count: int) -> str:
    return (f"RMI: {count} covariance matrices were not positive definite in float64 and were "
            f"factorised with a larger ridge (the loss stays finite; this is reported once)")


class RMILoss(torch.nn.Module):
    """Region Mutual Information loss (Zhao et al., NeurIPS 2019) with its pixel term.

    Call as ``loss = crit(logits, labels)``: logits [N, C, H, W] (float32,
    float16 or bfloat16), labels [N, H, W] (int64, int32 or uint8) with
    values in [0, C) or `ignore_index`; returns a float32 scalar.

    The defaults are the paper's Table-1 setting: sigmoid BCE + RMI with
    R = 3, 4 x 4 average pooling (stride 4, padding 2), lambda = 0.5,
    ``loss = 0.5 * bce + 0.5 * rmi``. `terms(logits, labels)` returns the loss
    together with the pixel term, the RMI term and the per-class RMI terms.

    Args:
        num_classes: optional; when given, logits must have that many classes.
        radius: R, region side, 1..10 (d = R*R dimensional region vectors).
        pool: "avg", "max", "interp" or "none"; pool_size: s, 1..8.
        pixel_loss: "bce", "ce" or None (RMI term alone).
        probs: "sigmoid" (paper) or "softmax", the probabilities RMI sees.
        ignore_index: label of pixels that take no part (default 255).
        exclude_ignored: also drop the region vectors that touch an ignored
            pixel from the statistics (see the module docstring for the rule).
        class_weights: optional [C] factors of each class's pixel and RMI terms
            (BCE: per class; CE: per pixel by its label, as F.cross_entropy).
        class_reduction: "sum" (paper) or "mean" over classes of the RMI term.
        rmi_weight: lambda (default 0.5).
        combine: "weighted" -> lambda * pixel + (1 - lambda) * rmi (paper);
            "additive" -> pixel + lambda * rmi.
        backend: "auto" (Triton on CUDA tensors where Triton >= 3.5 runs, else PyTorch, with one
            warning on CUDA), "torch", "triton".
        validate: check label values and finite logits (each check costs a device sync).

    Attributes:
        cholesky_retries: how many covariance matrices so far needed a larger
            ridge; a warning is given the first time it happens (inside a
            torch.compile graph: when this count is read; steps replayed from a
            captured CUDA graph are not counted).
    """

    def __init__(self, num_classes: Optional[int] = None, *, radius: int = 3, pool: str = "avg",
                 pool_size: int = 4, pixel_loss: Optional[str] = "bce", probs: str = "sigmoid",
                 ignore_index: int = 255, exclude_ignored: bool = False, class_weights=None,
                 class_reduction: str = "sum", rmi_weight: float = 0.5, combine: str = "weighted",
                 backend: str = "auto", validate: bool = True):
        super().__init__()
        self.num_classes = num_classes = _num_classes(num_classes)
        self.options = RMIOptions(radius=radius, pool=pool, pool_size=pool_size, pixel_loss=pixel_loss,
                                  probs=probs, ignore_index=ignore_index, exclude_ignored=exclude_ignored,
                                  class_weights=class_weights, class_reduction=class_reduction,
                                  rmi_weight=rmi_weight, combine=combine, backend=backend,
                                  validate=validate)
        if num_classes is not None and self.options.class_weights is not None \
                and len(self.options.class_weights) != num_classes:
            raise ValueError(f"class_weights has {len(self.options.class_weights)} entries "
                             f"but num_classes={num_classes}")
        self._report = CholeskyReport()
        self._warned = False

    @classmethod
    def from_options(cls, options: RMIOptions, num_classes: Optional[int] = None) -> "RMILoss":
        """The module of an `RMIOptions` (as `rmi_loss(..., options=)` takes one): the same
        loss, e.g. from a config that records the options as one value."""
        if not isinstance(options, RMIOptions):
            raise TypeError(f"options must be an RMIOptions, got {type(options).__name__}")
        return cls(num_classes, **{f.name: getattr(options, f.name) for f in dataclasses.fields(options)})

    @property
    def cholesky_retries(self) -> int:
        self._warn_once(stacklevel=3)
        return self._report.retried

    def _warn_once(self, stacklevel: int) -> None:
        if not self._warned and self._report.retried:
            self._warned = True
            warnings.warn(_retry_message(self._report.retried), RMINumericsWarning, stacklevel=stacklevel)

    def terms(self, logits: torch.Tensor, labels: torch.Tensor) -> RMITerms:
        """The loss with the pixel term, the RMI term and the per-class RMI terms."""
        return self._evaluate(logits, labels, _terms)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self._evaluate(logits, labels, _loss)

    def _evaluate(self, logits, labels, combine):
        out = _evaluate(logits, labels, self.num_classes, self.options, self._report, combine)
        if not capture.host_reads_forbidden(logits.device):  # compiled: warned when the count is read
            self._warn_once(stacklevel=4)
        return out

    def extra_repr(self) -> str:
        """The paper's knobs always, and every other option that differs from its default (a
        model printed to a log shows all that changes the loss)."""
        o, shown = self.options, ("radius", "pool", "pool_size", "pixel_loss", "probs", "rmi_weight", "combine",
                                  "backend")
        defaults = RMIOptions()
        others = [f.name for f in dataclasses.fields(o)
                  if f.name not in shown and getattr(o, f.name) != getattr(defaults, f.name)]
        return ", ".join([f"num_classes={self.num_classes}"] + [f"{name}={getattr(o, name)!r}"
                                                                for name in shown + tuple(others)])

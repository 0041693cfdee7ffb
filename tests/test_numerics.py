"""Degenerate but valid inputs stay finite; failed factorisations are retried, counted, reported once."""

import warnings

import pytest
import torch

from rmi_triton import RMILoss, RMINumericsWarning, RMIOptions, reference_rmi, rmi_loss
from rmi_triton.algebra import CholeskyReport, half_logdet_posterior, repaired_cholesky
from rmi_triton.engines import torch_engine, triton_engine

from helpers import assert_close_rel, case_id, loss_and_grad, random_inputs, upsampled_inputs


def _degenerate_cases():
    g = torch.Generator().manual_seed(0)
    n, c, h, w = 2, 3, 40, 44
    labels = torch.randint(0, c, (n, h, w), generator=g)
    logits = torch.randn(n, c, h, w, generator=g)
    one_hot = torch.nn.functional.one_hot(labels, c).permute(0, 3, 1, 2).float()
    sparse = torch.zeros(n, h * 10, w * 10, dtype=torch.long)  # binary task, 0.1% foreground
    sparse.view(-1)[torch.randperm(sparse.numel(), generator=g)[: sparse.numel() // 1000]] = 1
    return {
        "all_ignored": (logits, torch.full_like(labels, 255)),
        "one_class": (logits, torch.zeros_like(labels)),
        "constant_logits": (torch.full_like(logits, 0.3), labels),
        "saturated_logits": (60.0 * torch.sign(logits), labels),
        "huge_logits": (1e4 * logits, labels),
        "perfect_prediction": (60.0 * (2 * one_hot - 1), labels),
        "sparse_foreground": (torch.randn(n, 2, h * 10, w * 10, generator=g), sparse),
        "single_pixel_islands": (logits, torch.where(torch.rand(n, h, w, generator=g) < 0.002, 1, 0)),
    }


CASES = _degenerate_cases()


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("options", [{}, {"probs": "softmax", "pixel_loss": "ce"}, {"exclude_ignored": True},
                                     {"pool": "max"}])
def test_degenerate_inputs_stay_finite(name, options):
    logits, labels = CASES[name]
    loss, grad = loss_and_grad(lambda x, y, **o: rmi_loss(x, y, backend="torch", **o), logits, labels, **options)
    assert torch.isfinite(loss), f"{name}: loss {loss}"
    assert torch.isfinite(grad).all(), f"{name}: non-finite gradient"


@pytest.mark.parametrize("name", ["all_ignored", "one_class", "constant_logits", "sparse_foreground"])
def test_degenerate_inputs_match_reference(name):
    logits, labels = CASES[name]
    value = rmi_loss(logits, labels, backend="torch")
    assert_close_rel(value, reference_rmi(logits.double(), labels).loss, 1e-5, name)


def test_repaired_cholesky_retries_only_failed_matrices():
    good = torch.eye(3, dtype=torch.float64) * 2
    bad = torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64))
    factor, retried = repaired_cholesky(torch.stack([good, bad]))
    assert retried == 1
    assert torch.equal(factor[0], torch.linalg.cholesky(good))  # untouched
    assert torch.isfinite(factor).all() and (torch.diagonal(factor[1]) > 0).all()


def test_repaired_cholesky_gives_nan_for_nonfinite_matrices():
    """No ridge repairs a NaN matrix: its factor is NaN (not an exception, not a repair counted),
    the others are factorised as ever."""
    good = torch.eye(3, dtype=torch.float64) * 2
    nan = torch.full((3, 3), float("nan"), dtype=torch.float64)
    factor, retried = repaired_cholesky(torch.stack([good, nan]))
    assert retried == 0
    assert torch.equal(factor[0], torch.linalg.cholesky(good)) and torch.isnan(factor[1]).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nonfinite_logits_without_validation_give_nan(backend):
    """validate=False skips the input checks: NaN logits then give a NaN loss and gradient, as
    any loss does, and no exception (a training loop's own check stops the run)."""
    if backend == "triton" and not triton_engine.available():
        pytest.skip("triton is not installed or TRITON_INTERPRET is not set")
    logits, labels = random_inputs(2, 3, 32, 32)
    logits[1, 2, 5, 7] = float("nan")
    crit = RMILoss(backend=backend, validate=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RMINumericsWarning)
        loss, grad = loss_and_grad(crit, logits, labels)
    assert torch.isnan(loss) and torch.isnan(grad).any() and crit.cholesky_retries == 0


def test_half_logdet_gradient_through_retry_is_finite():
    sy = torch.diag(torch.tensor([-5.0, 1.0], dtype=torch.float64)).expand(2, 2, 2).clone()
    sp = torch.eye(2, dtype=torch.float64).repeat(2, 1, 1).requires_grad_()
    syp = torch.zeros(2, 2, 2, dtype=torch.float64, requires_grad=True)
    report = CholeskyReport()
    h = half_logdet_posterior(sy, sp, syp, report)
    h.sum().backward()
    assert report.retried == 2
    assert torch.isfinite(h).all() and torch.isfinite(sp.grad).all() and torch.isfinite(syp.grad).all()


def _broken_statistics(real):
    def statistics(logits, labels, opts):
        stats = real(logits, labels, opts)
        # an indefinite Sy, as rounding could leave it: V + aI is not positive definite
        return stats._replace(sy=stats.sy - 10 * torch.eye(opts.d, dtype=torch.float64))
    return statistics


def test_module_counts_retries_and_warns_once(monkeypatch):
    monkeypatch.setattr(torch_engine, "statistics", _broken_statistics(torch_engine.statistics))
    logits, labels = random_inputs(2, 3, 32, 32)
    crit = RMILoss(backend="torch")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            loss, grad = loss_and_grad(crit, logits, labels)
            assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert crit.cholesky_retries == 3 * 2 * 3
    assert sum(issubclass(w.category, RMINumericsWarning) for w in caught) == 1


def test_functional_warns(monkeypatch):
    monkeypatch.setattr(torch_engine, "statistics", _broken_statistics(torch_engine.statistics))
    logits, labels = random_inputs(1, 2, 32, 32)
    with pytest.warns(RMINumericsWarning, match="larger ridge"):
        rmi_loss(logits, labels, backend="torch")


def test_branch_free_repair_matches_eager():
    """Under torch.compile the retries run without data-dependent branches: same factors."""
    from rmi_triton.algebra import _cholesky_fixed_retries

    good = torch.eye(3, dtype=torch.float64) * 2
    bad = torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64))
    eager, eager_retried = repaired_cholesky(torch.stack([good, bad]))
    fixed, retried = _cholesky_fixed_retries(torch.stack([good, bad]))
    assert torch.equal(eager, fixed)
    assert eager_retried == int(retried) == 1


@pytest.mark.parametrize("retry", [False, True])
def test_compiled_half_logdet_matches_eager(retry):
    """h and its closed-form gradient under torch.compile (fixed retries, no host check) equal
    the eager ones, also where the joint matrix needed a larger ridge; the retries are counted."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 8, 40, dtype=torch.float64, generator=g)
    joint = x @ x.transpose(1, 2)
    blocks = [joint[:, :4, :4].clone(), joint[:, 4:, 4:].clone(), joint[:, :4, 4:].clone()]
    if retry:
        blocks[0][2] -= 1e2 * torch.eye(4, dtype=torch.float64)  # V + aI indefinite: retried
    weight = torch.randn(3, dtype=torch.float64, generator=g)
    results = []
    for compiled in (False, True):
        report = CholeskyReport()

        def fn(*inputs):
            return (half_logdet_posterior(*inputs, report) * weight).sum()

        inputs = [t.clone().requires_grad_() for t in blocks]
        value = (torch.compile(fn, backend="aot_eager", fullgraph=True) if compiled else fn)(*inputs)
        value.backward()
        results.append((value.detach(), [t.grad for t in inputs], report.retried))
    (eager, eager_grads, eager_retried), (comp, comp_grads, comp_retried) = results
    assert_close_rel(comp, eager, 1e-12, "h")
    for got, want, name in zip(comp_grads, eager_grads, ("Sy", "Sp", "Syp")):
        assert_close_rel(got, want, 1e-12, name)
    assert eager_retried == comp_retried == (1 if retry else 0)


def _half_logdet_by_autograd(sy, sp, syp):
    """h as autograd differentiates it: the joint matrix built from the blocks and factorised
    with `repaired_cholesky`'s repairs (their ridge a constant)."""
    from rmi_triton.algebra import joint_matrix

    d = sy.shape[-1]
    factor = repaired_cholesky(joint_matrix(sy, sp, syp))[0]
    return torch.log(torch.diagonal(factor[..., d:, d:], dim1=-2, dim2=-1) + 1e-8).sum(-1)


@pytest.mark.parametrize("retry", [False, True])
def test_half_logdet_closed_form_gradient_matches_autograd(retry):
    """The closed-form backward against autograd through the factorisation of the joint matrix,
    also where it needed a larger ridge."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 8, 40, dtype=torch.float64, generator=g)
    joint = x @ x.transpose(1, 2)
    sy, sp, syp = joint[:, :4, :4].clone(), joint[:, 4:, 4:].clone(), joint[:, :4, 4:].clone()
    if retry:
        sy[1] -= 1e3 * torch.eye(4, dtype=torch.float64)  # V + aI indefinite: retried
    weight = torch.randn(5, dtype=torch.float64, generator=g)  # grad_output != 1
    grads = []
    for fn in (half_logdet_posterior, _half_logdet_by_autograd):
        inputs = [t.clone().requires_grad_() for t in (sy, sp, syp)]
        (fn(*inputs) * weight).sum().backward()
        grads.append([t.grad for t in inputs])
    for closed, auto, name in zip(*grads, ("Sy", "Sp", "Syp")):
        assert_close_rel(closed, auto, 1e-10, name)


def test_joint_factorisation_matches_the_formula():
    """h from one Cholesky of [[Sp + aI, Syp^T], [Syp, Sy + aI]] against docs/DESIGN.md's formula
    written out (V = Sy - Syp (Sp + aI)^-1 Syp^T, then chol(V + aI)), nearly singular
    statistics included: the same log-determinants to rounding."""
    g = torch.Generator().manual_seed(5)
    d = 9
    x = torch.randn(6, 2 * d, 300, dtype=torch.float64, generator=g)
    x[1, d:] = x[1, :d] * 0.999 + 1e-4 * x[1, d:]  # a near-perfect prediction: V tiny
    x[2, d:] = 1e-3 * x[2, d:]  # probabilities nearly constant: Sp tiny against the ridge
    joint = x @ x.transpose(1, 2)
    sy, sp, syp = joint[:, :d, :d], joint[:, d:, d:], joint[:, :d, d:]
    eye = torch.eye(d, dtype=torch.float64)
    posterior = sy - syp @ torch.linalg.solve(sp + 5e-4 * eye, syp.transpose(-1, -2))
    posterior = (posterior + posterior.transpose(-1, -2)) / 2
    want = torch.log(torch.diagonal(torch.linalg.cholesky(posterior + 5e-4 * eye), dim1=-2, dim2=-1) + 1e-8).sum(-1)
    report = CholeskyReport()
    assert_close_rel(half_logdet_posterior(sy, sp, syp, report), want, 1e-10, "h")
    assert report.retried == 0


def test_no_gradients_formed_without_grad_mode(monkeypatch):
    """Under torch.no_grad (evaluation) the forward skips the gradients it forms ahead for the backward."""
    import rmi_triton.algebra as algebra

    calls = []
    real = algebra._unit_gradients
    monkeypatch.setattr(algebra, "_unit_gradients", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 8, 30, dtype=torch.float64, generator=g)
    joint = x @ x.transpose(1, 2)
    blocks = [t.clone().requires_grad_() for t in (joint[:, :4, :4], joint[:, 4:, 4:], joint[:, :4, 4:])]
    with torch.no_grad():
        evaluated = half_logdet_posterior(*blocks)
    assert not calls
    trained = half_logdet_posterior(*blocks)
    assert calls and torch.equal(evaluated, trained.detach())


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("combine", ["weighted", "additive"])
@pytest.mark.parametrize("weights", [None, (0.5, 2.0, 0.0)])
@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_loss_combines_the_terms_as_the_paper(reduction, combine, weights, lam):
    """The training loss (one weighted sum of h) and the reported terms against the formula
    written out -- per class: the mean over images of h / d times the class weight; RMI: their
    sum or mean; loss: lam * pixel + (1 - lam) * RMI, or pixel + lam * RMI -- values and
    gradients with respect to h and the pixel term."""
    from rmi_triton.loss import _loss, _terms
    from rmi_triton.options import RMIOptions

    opts = RMIOptions(radius=3, class_reduction=reduction, combine=combine, class_weights=weights, rmi_weight=lam)
    g = torch.Generator().manual_seed(9)
    h0, pixel0 = torch.randn(4, 3, dtype=torch.float64, generator=g), torch.rand((), dtype=torch.float64, generator=g)
    per_class = h0.mean(0) / 9 * (torch.tensor(weights, dtype=torch.float64) if weights else 1.0)
    rmi = per_class.sum() if reduction == "sum" else per_class.mean()
    want = lam * pixel0 + (1 - lam) * rmi if combine == "weighted" else pixel0 + lam * rmi
    terms = _terms(pixel0, h0, opts)
    assert_close_rel(terms.rmi, rmi, 1e-6, "rmi")  # float32 terms
    assert_close_rel(terms.rmi_per_class, per_class, 1e-6, "per class")
    assert terms.loss.dtype == torch.float32
    grads = []
    for fn in (lambda p, h: _loss(p, h, opts), lambda p, h: _terms(p, h, opts).loss,
               lambda p, h: (lam * p + (1 - lam) * _formula_rmi(h, weights, reduction) if combine == "weighted"
                             else p + lam * _formula_rmi(h, weights, reduction)).float()):
        pixel, h = pixel0.clone().requires_grad_(), h0.clone().requires_grad_()
        value = fn(pixel, h)
        assert value.item() == pytest.approx(want.item(), rel=1e-6, abs=1e-7)
        value.backward()
        grads.append((pixel.grad, h.grad))
    for got in grads[:2]:
        assert_close_rel(got[0], grads[2][0], 1e-12, "dL/dpixel")
        assert_close_rel(got[1], grads[2][1], 1e-12, "dL/dh")
    assert _loss(pixel0, h0, opts).item() == terms.loss.item()


def _formula_rmi(h, weights, reduction):
    per_class = h.mean(0) / 9 * (torch.tensor(weights, dtype=torch.float64) if weights else 1.0)
    return per_class.sum() if reduction == "sum" else per_class.mean()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("options", [{}, {"probs": "softmax"}, {"pixel_loss": "ce"}], ids=case_id)
def test_differentiable_once(backend, options):
    """A second derivative through the loss raises, where it would come out partial without a
    word: through the recomputed probabilities alone (the torch engine's backward did, with the
    softmax and BCE or the sigmoid and CE, until it detached the logits), and, with anything
    else in the graph (the network below, another loss term), through their parts alone -- a
    gradient penalty over a network's weights was off by its whole size."""
    logits, labels = random_inputs(1, 2, 21, 23, seed=1)
    x = logits.requires_grad_()
    (grad,) = torch.autograd.grad(rmi_loss(x, labels, backend=backend, **options), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        (grad * grad).sum().backward()
    image = torch.randn(1, 1, 21, 23, requires_grad=True)
    conv = torch.nn.Conv2d(1, 2, 3, padding=1)
    total = rmi_loss(conv(image), labels, backend=backend, **options) + conv(image).square().mean()
    (grad,) = torch.autograd.grad(total, image, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        (grad * grad).sum().backward()


def test_compiled_graph_differentiates_in_closed_form():
    """Under torch.compile the algebra's graph holds one factorisation and its fixed retries,
    and its backward only scales the gradients formed ahead: no factorisation, triangular
    solve or matrix product there (autograd through each retry would add dozens)."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    from rmi_triton.algebra import COMPILED_RETRIES

    graphs = {}

    def counting(name):
        def compile_graph(gm, _inputs):
            graphs[name] = [getattr(node.target, "__name__", str(node.target)) for node in gm.graph.nodes
                            if node.op == "call_function"]
            return make_boxed_func(gm.forward)
        return compile_graph

    def backend(gm, inputs):
        return aot_module_simplified(gm, inputs, fw_compiler=counting("forward"), bw_compiler=counting("backward"))

    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 6, 30, dtype=torch.float64, generator=g)
    joint = x @ x.transpose(1, 2)
    inputs = [t.clone().requires_grad_() for t in (joint[:, :3, :3], joint[:, 3:, 3:], joint[:, :3, 3:])]
    torch.compile(lambda *b: half_logdet_posterior(*b).sum(), backend=backend, fullgraph=True)(*inputs).backward()
    linalg = [name for name in graphs["backward"] if "linalg" in name or "bmm" in name or "mm" in name]
    assert linalg == [], f"the backward graph differentiates the factorisation: {linalg}"
    assert sum("cholesky" in name for name in graphs["forward"]) == 1 + COMPILED_RETRIES


def _confident_prediction(seed=2, n=2, c=3, h=48, w=56, amplitude=6.0):
    """Logits that already give each pixel its label with p ~ 0.998: V = Sy - Syp (Sp + aI)^-1
    Syp^T is then a small difference of large terms, which rounded products spoil."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n, h, w), generator=g)
    labels[torch.rand(n, h, w, generator=g) < 0.05] = 255
    one_hot = torch.nn.functional.one_hot(torch.where(labels == 255, 0, labels), c).permute(0, 3, 1, 2).float()
    return amplitude * (2 * one_hot - 1) + 0.3 * torch.randn(n, c, h, w, generator=g), labels


def _assert_meets_contract(backend, logits, labels, options):
    """Loss within 1e-5 and gradient within 1e-4 (relative) of the float64 reference."""
    loss, grad = loss_and_grad(lambda x, y, **o: rmi_loss(x, y, backend=backend, **o), logits, labels, **options)
    ref_loss, ref_grad = loss_and_grad(lambda x, y, **o: reference_rmi(x, y, RMIOptions(**o)).loss,
                                       logits.double(), labels, **options)
    assert_close_rel(loss, ref_loss, 1e-5, "loss")
    assert_close_rel(grad, ref_grad, 1e-4, "gradient")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("options", [{"pool_size": 2}, {"pool_size": 2, "pool": "max"},
                                     {"pool_size": 2, "radius": 2}, {"pool_size": 2, "exclude_ignored": True}],
                         ids=case_id)
def test_confident_prediction_meets_the_contract(backend, options):
    """The contract (loss 1e-5, gradient 1e-4) where float32 statistics miss it by 20-30x (the
    reference's float32_products emulation at pool_size 2: loss 2.2e-4, gradient 2.9e-3; its
    float32 maps alone, which both engines hold: 5.6e-9 and 2.2e-5)."""
    logits, labels = _confident_prediction()
    _assert_meets_contract(backend, logits, labels, options)


SATURATED_CASES = [{}, {"rmi_weight": 0.0}, {"rmi_weight": 1.0}, {"rmi_weight": 1.0, "class_weights": [0.5, 2.0, 1.0]},
                   {"probs": "softmax", "rmi_weight": 0.0}, {"probs": "softmax", "pixel_loss": "ce"},
                   {"pixel_loss": "ce", "rmi_weight": 1.0}, {"pool": "max", "rmi_weight": 0.0},
                   {"probs": "softmax", "pool": "max", "rmi_weight": 0.0},
                   {"pool_size": 3, "rmi_weight": 0.0}, {"pool": "none", "radius": 2, "rmi_weight": 0.0},
                   {"pool": "interp", "rmi_weight": 0.0}, {"exclude_ignored": True, "pool_size": 2, "rmi_weight": 0.0}]


@pytest.mark.parametrize("backend", ["torch", "triton", "torch in class blocks"])
@pytest.mark.parametrize("options", SATURATED_CASES, ids=case_id)
def test_saturated_prediction_meets_the_contract(backend, options, monkeypatch):
    """Logits of +-12 (p within 6e-6 of 0 or 1), each term alone (rmi_weight 0: the RMI term;
    1: the pixel term) and together. The statistics feel p' to 1e-12, which a float32 p' near
    1 does not keep (its rounding, 6e-8, is 1e-2 of 1 - p'): both engines hold p > 1/2 as
    1 - (1 - p), 1 - p from exp(-|x|) (softmax: the other classes' share), pool the two sides
    apart into float64 maps (y' too where a count / 9 rounds) and take the region gradient in
    float64; the softmax's derivative and the cross-entropy are taken about the top class, the
    BCE's log terms as log1p. Before (Triton / torch): gradient errors 5e-4 / 3e-3 (defaults),
    7e-3 / 1e-2 (max), 0.77 / 0.77 (softmax: a float32 p rounds to 1 beyond a margin of 17,
    where p (g - sum p g) is then 0); the BCE alone's loss 2e-5 / 1e-4. Softmax with max
    pooling: kernel A's arg-max, taken by x - lse, tied and swapped pixels whose 1 - p differ
    by less than lse's rounding (0.12); it now compares each side to float32's precision."""
    if backend == "torch in class blocks":  # labels outside a block of classes are clamped into it
        monkeypatch.setattr(torch_engine, "FULL_RES_CHUNK", 2 * 48 * 56)
        backend = "torch"
    logits, labels = _confident_prediction(amplitude=12.0)
    _assert_meets_contract(backend, logits, labels, options)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("options", [{"probs": "softmax", "rmi_weight": 0.0},
                                     {"probs": "softmax", "pool": "max", "rmi_weight": 0.0},
                                     {"probs": "softmax", "pixel_loss": "ce"},
                                     {"pixel_loss": "ce", "rmi_weight": 1.0}], ids=case_id)
def test_softmax_of_logits_far_from_zero_meets_the_contract(backend, options):
    """Softmax and cross-entropy are shift-invariant: logits around 1e4 (a shared offset) must
    give what the same spread around 0 gives. Taken as x - lse, with lse = m + log(1 + rest)
    rounded at the scale of m, they lost 1e-3 of 1 per pixel (an ulp of 1e4): Triton's softmax
    gradient 4e-4 off, both engines' CE 5e-5 (found by a fuzz run); now (x - m) - log(1 + rest)."""
    g = torch.Generator().manual_seed(23)
    labels = torch.randint(0, 3, (2, 24, 28), generator=g)
    logits = torch.randn(2, 3, 24, 28, generator=g) * 2 + 1e4
    options = dict(options, pool_size=options.get("pool_size", 2))
    _assert_meets_contract(backend, logits, labels, options)


NARROW_CASES = [{"pool": "max"}, {"probs": "softmax", "pool": "max"},
                {"probs": "softmax", "pool": "none", "exclude_ignored": True},
                {"pool": "interp", "exclude_ignored": True}, {"pool": "none", "exclude_ignored": True},
                {"probs": "softmax", "pixel_loss": "ce", "exclude_ignored": True, "rmi_weight": 0.0}]


@pytest.mark.parametrize("backend", ["torch", "triton", "torch in class blocks"])
@pytest.mark.parametrize("options", NARROW_CASES, ids=case_id)
def test_logits_that_barely_vary_meet_the_contract(backend, options, monkeypatch):
    """Logits all within about 1e-4 of 0: every p within 3e-5 of 1/2 (sigmoid) or 1/C (softmax),
    where float32 holds p to about 1e-3 of its spread. From float32 probabilities alone the
    gradient was 1.6e-4 to 1.2e-2 off in these cases (exclude_ignored, whose statistics see
    only that spread; max pooling, whose float32 ties route a cell's gradient to another
    pixel); both engines now pool such planes again from float64 probabilities
    (`rmi_triton.narrow`)."""
    if backend == "torch in class blocks":  # one plane a block: a narrow plane's block holds no other
        monkeypatch.setattr(torch_engine, "FULL_RES_CHUNK", 23 * 29)
        backend = "torch"
    logits, labels = random_inputs(h=23, w=29, scale=1e-4, seed=6)
    _assert_meets_contract(backend, logits, labels, dict(options, radius=3, pool_size=2))


@pytest.mark.parametrize("backend", ["torch", "triton", "torch, two windows a chunk"])
@pytest.mark.parametrize("options", [{"rmi_weight": 0.0}, {"probs": "softmax", "rmi_weight": 0.0},
                                     {"probs": "softmax", "pixel_loss": "ce"}], ids=case_id)
def test_max_pooling_of_a_plane_flat_in_one_region_meets_the_contract(backend, options, monkeypatch):
    """Logits of about 1e-4 in the top half of each image and N(0, 4) below: no plane is narrow,
    and max pooling's float32 ties in the flat half sent cells' gradients to other pixels than
    the float64 reference's: 4.9e-4 / 1.2e-1 (sigmoid, torch / Triton), 6.8e-3 (softmax, both
    engines; 6.4e-3 with cross-entropy). The sigmoid's pixels are now ranked by their logits
    (exact), the softmax's planes with near-ties pooled again from float64
    (`rmi_triton.narrow.tie_bound`), those cells alone."""
    if backend == "torch, two windows a chunk":  # `_pool_tied_cells` in many chunks
        monkeypatch.setattr(torch_engine, "TIED_CELL_CHUNK", 2 * 4 * 4 * 3)
        backend = "torch"
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 40, 44, generator=g) * 2
    logits[:, :, :20] = torch.randn(2, 3, 20, 44, generator=g) * 1e-4
    labels = torch.randint(0, 3, (2, 40, 44), generator=g)
    _assert_meets_contract(backend, logits, labels, dict(options, pool="max"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("options", [{"pool_size": 4, "rmi_weight": 0.0}, {"pool_size": 3, "pixel_loss": "ce"},
                                     {"pool_size": 4, "exclude_ignored": True}], ids=case_id)
def test_max_pooling_of_upsampled_logits_meets_the_contract(backend, options):
    """Softmax with max pooling on a network's upsampled output: the repeated edge rows and
    columns tie every window there exactly, and pixels an ulp apart (as the interpolation's
    rounding leaves them at some size ratios) are near-ties, whose cells are pooled again from
    float64; without that pass the gradient was 5.2e-3 to 0.28 off. Ignored pixels among equal
    logits, a window's first row equal to the row before it, a plane skipped."""
    logits, labels = upsampled_inputs()
    assert torch.equal(logits[:, :, 0], logits[:, :, 3]) and torch.equal(logits[..., 0], logits[..., 2])
    assert not torch.equal(logits[:, :, 27], logits[:, :, 28]) and not torch.equal(logits[..., 2], logits[..., 3])
    _assert_meets_contract(backend, logits, labels, dict(options, pool="max", probs="softmax", radius=2))


def _p_eight_ulps_apart():
    """A confident upsampled output where two pixels of a cell have p at a class of about 3e-4
    8 of its float64 ulps apart (1.3e-15 relative, from logits 1e-11 apart at other classes)."""
    g = torch.Generator().manual_seed(167441861)
    coarse = torch.randn(1, 6, 8, 7, generator=g) * 1e-3
    coarse += 8.0 * torch.nn.functional.one_hot(torch.randint(0, 6, (1, 8, 7), generator=g), 6).permute(0, 3, 1, 2)
    logits = torch.nn.functional.interpolate(coarse, size=(38, 32), mode="bilinear", align_corners=False)
    labels = torch.randint(0, 6, (1, 38, 32), generator=g)
    labels[torch.rand(1, 38, 32, generator=g) < 0.1] = 255
    return logits.contiguous(), labels, dict(pool_size=4, radius=2)


def _p_equal_in_float64():
    """Two pixels of a cell a float32 ulp apart at a class of p ~ 1e-10: their top class's p
    (0.9939) is the same float64 number, their 1 - p are not (4.6e-17 apart)."""
    a = [-13.317755699157715, -8.361920356750488, 9.531495094299316, 16.3012752532959, -6.773244857788086,
         10.99938678741455]
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 6, 12, 12, generator=g) * 3
    labels = torch.randint(0, 6, (1, 12, 12), generator=g)
    logits[0, :, 5, 5] = torch.tensor(a)  # pool size 2 (padding 1): cell (3, 3) is rows and columns 5-6
    logits[0, :, 5, 6] = torch.tensor(a)
    logits[0, 4, 5, 6] = -6.773245334625244
    logits[0, :, 6, 5:7] = torch.tensor(a)[:, None] - 3.0
    return logits, labels, dict(pool_size=2, radius=3)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", [_p_eight_ulps_apart, _p_equal_in_float64], ids=lambda f: f.__name__.strip("_"))
def test_tied_cells_are_ranked_by_float64_p_as_the_reference_ranks_them(backend, case):
    """Softmax with max pooling, cells that the float32 pass finds tied. The engines' float64
    passes formed p as exp((x - m) - log(1 + rest)), which rounds at that exponent's scale (an
    ulp of 8 is 1.8e-15): p 8 ulps apart tied, the first pixel won, and the gradient was 4.3e-4
    off (found by a randomised run on upsampled logits). They form exp(x - m) / (1 + rest)
    now, and rank it as the reference does: ordering the high side by 1 - p, to its own
    precision, had sent the cell whose top p are one float64 number to the second pixel
    (1.1e-2 off), where the reference takes the first."""
    logits, labels, options = case()
    _assert_meets_contract(backend, logits, labels, dict(options, pool="max", probs="softmax", rmi_weight=0.0))


# two pixels' logits whose softmax p at class 0 lie within 2e-8 of each other and of 1/2, the
# larger put on the low side by each engine's float32 split at 1/2 (rest < 1): torch's, Triton's
HALF_PAIRS = {"torch": ([1.49009395045141e-07, -0.6931470632553101, -0.6931471228599548],
                        [-2.9794200884225575e-08, -0.6931471228599548, -0.6931473016738892]),
              "triton": ([8.9397531e-08, -0.69314706, -0.6931473], [-5.111443e-09, -0.6931469, -0.6931475])}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("pair", sorted(HALF_PAIRS))
@pytest.mark.parametrize("options", [{"rmi_weight": 0.0}, {"pixel_loss": "ce"}], ids=case_id)
def test_near_ties_across_one_half_meet_the_contract(backend, pair, options):
    """Softmax with max pooling: the larger p of a cell on the low side of 1/2 and the smaller on
    the high side, 1.5e-8 apart. Each side's ties alone were looked for, and the high pixel won:
    the gradient 4.8e-2 off on the engine whose split it is (found by a review). The low pixels
    are now compared on the high side's scale too."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 3, 12, 12, generator=g) * 2
    labels = torch.randint(0, 3, (1, 12, 12), generator=g)
    larger, smaller = HALF_PAIRS[pair]
    logits[0, :, 5, 5] = torch.tensor(smaller)  # pool size 2 (padding 1): cell (3, 3), rows and columns 5-6
    logits[0, :, 5, 6] = torch.tensor(larger)
    logits[0, :, 6, 5] = torch.tensor([-5.0, 3.0, 0.0])
    logits[0, :, 6, 6] = torch.tensor([-6.0, 0.0, 3.0])
    _assert_meets_contract(backend, logits, labels,
                           dict(options, pool="max", pool_size=2, probs="softmax", radius=3))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("classes, options", [(3, {"rmi_weight": 0.0}), (3, {}), (3, {"probs": "softmax", "pixel_loss": "ce"}),
                                              (1, {})], ids=["rmi", "defaults", "softmax", "one class"])
def test_barely_varying_logits_where_only_ignored_pixels_vary_the_labels(backend, classes, options):
    """Every valid pixel of one class (or C = 1): y' varies only through the ignored pixels'
    dilution of avg pooling's cells, and p' through the same dilution. The rule counted that
    dilution as variation, left the planes to the float32 pass, and the gradient was 5.3e-4 to
    1.4e-3 off (found by a review); p' over the valid pixels' share is narrow."""
    logits, labels = random_inputs(c=classes, h=40, w=44, scale=1e-4, seed=9)
    labels = torch.where(labels == 255, 255, 0)
    _assert_meets_contract(backend, logits, labels, dict(options, radius=3, pool_size=2))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_only_narrow_planes_are_pooled_again(backend, monkeypatch):
    """The float64 pass rewrites the narrow planes' p' and nothing else: the other planes, and
    every plane of an image without a narrow one, keep their float32 pass's p' to the bit."""
    import rmi_triton.narrow as narrow_module

    logits, labels = random_inputs(h=23, w=29, seed=6)
    logits[1, 0] *= 1e-4  # image 1's first plane is narrow; image 0 has none
    options = dict(radius=3, pool_size=2, pool="max")
    seen = []
    if backend == "torch":
        real = torch_engine.region_moments
        monkeypatch.setattr(torch_engine, "region_moments", lambda y, p, *a: seen.append(p.clone()) or real(y, p, *a))
    else:
        real = triton_engine._launch_region_moments
        monkeypatch.setattr(triton_engine, "_launch_region_moments",
                            lambda y, p, *a: seen.append(p.clone()) or real(y, p, *a))
    # the rule: rmi_triton.narrow's on the torch engine, kernel _narrow_kernel's on the Triton engine
    module, name = (narrow_module, "narrow_planes") if backend == "torch" else (triton_engine, "_launch_narrow")
    rule = getattr(module, name)
    found = []
    monkeypatch.setattr(module, name, lambda *a: found.append(rule(*a)) or found[-1])
    rmi_loss(logits, labels, backend=backend, **options)
    monkeypatch.setattr(module, name, lambda *a: torch.zeros_like(rule(*a)))
    rmi_loss(logits, labels, backend=backend, **options)
    assert found[0].bool().tolist() == [[False, False, False], [True, False, False]]
    exact, float32 = seen
    changed = (exact != float32).flatten(2).any(2)
    assert changed.tolist() == [[False, False, False], [True, False, False]]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cross_entropy_of_a_few_pixels_far_from_zero(backend):
    """The same on two pixels, where no average hides a pixel's error: lse - x_label with lse
    rounded at 1e4 put the loss 5e-5 off."""
    logits = torch.tensor([[[[0.3, -1.2]], [[1.1, 0.4]]]]) + 1e4
    labels = torch.tensor([[[0, 1]]])
    options = dict(pool="none", radius=1, probs="softmax", pixel_loss="ce", rmi_weight=1.0)
    loss = rmi_loss(logits, labels, backend=backend, **options)
    assert_close_rel(loss, reference_rmi(logits.double(), labels, RMIOptions(**options)).loss, 1e-6, "loss")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("size, probs", [((7, 5), "softmax"), ((8, 7), "sigmoid")])
def test_few_region_vectors_meet_the_contract(backend, size, probs):
    """Maps of a few cells at R = 4 (8 and 20 region vectors of 16 entries): V is nearly
    singular in many directions and G large, and the torch engine's float32 stencil missed
    the gradient by 1.3e-3 and 5e-4 (found by a 300-example fuzz run); it now takes such
    maps (fewer than 4d vectors) in float64, as kernel C takes every map."""
    g = torch.Generator().manual_seed(19)
    logits = torch.randn(2, 2, *size, generator=g) * 2
    labels = torch.randint(0, 2, (2, *size), generator=g)
    options = dict(radius=4, pool="none", rmi_weight=0.0, probs=probs)
    _assert_meets_contract(backend, logits, labels, options)


@pytest.mark.parametrize("backend", ["torch", "triton", "torch in class blocks"])
@pytest.mark.parametrize("options", [{}, {"class_weights": [0.5, 2.0, 1.0]}, {"probs": "softmax"}], ids=case_id)
def test_pixel_term_gradient_at_saturating_logits(backend, options, monkeypatch):
    """sigmoid(x) - y at the label is -(1 - p): taken from p near 1 it keeps p's rounding,
    6e-8, against 1 - p = 6e-6 at logits of 12 (at logits of 8 the Triton engine was 1.4e-4
    off; the torch engine, which formed s - 1 as PyTorch's own BCE does, 7e-5, and 4.8e-4 at
    logits of 10; PyTorch's BCE 4.0e-4 there)."""
    if backend == "torch in class blocks":  # labels outside a block of classes are clamped into it
        monkeypatch.setattr(torch_engine, "FULL_RES_CHUNK", 2 * 48 * 56)
        backend = "torch"
    logits, labels = _confident_prediction(amplitude=12.0)
    options = {"rmi_weight": 1.0, **options}  # the pixel term alone
    _, grad = loss_and_grad(lambda x, y, **o: rmi_loss(x, y, backend=backend, **o), logits, labels, **options)
    _, ref_grad = loss_and_grad(lambda x, y, **o: reference_rmi(x, y, RMIOptions(**o)).loss,
                                logits.double(), labels, **options)
    assert_close_rel(grad, ref_grad, 1e-4, "gradient")


@pytest.mark.parametrize("size, size_low", [((37, 53), (10, 14)), ((33, 47), (17, 24)), ((8, 9), (2, 3)),
                                            ((513, 511), (129, 128)), ((5, 7), (1, 2))])
def test_bilinear_backward_is_the_interpolations_adjoint(size, size_low):
    """<interp(x), g> = <x, backward(g)>: the "interp" pooling's backward, PyTorch's own backward of
    the interpolation without its atomic adds (bitwise the same run after run on CUDA too)."""
    from rmi_triton.pooling import bilinear_backward

    g = torch.randn(2, 3, *size_low, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ours = bilinear_backward(g, size)
    theirs = torch.ops.aten.upsample_bilinear2d_backward(g, list(size_low), [2, 3, *size], True, None, None)
    assert ours.shape == theirs.shape and (ours - theirs).abs().max() < 1e-12
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    forward = torch.nn.functional.interpolate(x, size=size_low, mode="bilinear", align_corners=True)
    assert abs((forward * g).sum() - (x * ours).sum()) < 1e-10


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("options", [{}, {"pool": "max"}, {"pool": "interp"}, {"pool": "none", "radius": 2},
                                     {"probs": "softmax", "pixel_loss": "ce"},
                                     {"exclude_ignored": True, "pool": "max", "pool_size": 3}], ids=case_id)
def test_runs_under_deterministic_algorithms(backend, options):
    """torch.use_deterministic_algorithms(True), which users switch on for reproducible runs:
    the loss uses no op that raises there (max pooling's backward did, max_unpool2d, on the CPU
    too; on CUDA a product scatter_reduce, a float cumsum and the interpolation's backward would
    have), and gives what it gives without it."""
    if backend == "triton" and not triton_engine.available():
        pytest.skip("the Triton engine runs under the interpreter here")
    logits, labels = random_inputs(1, 3, 17, 19, seed=5)
    want = loss_and_grad(lambda x, y: rmi_loss(x, y, backend=backend, **options), logits, labels)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        got = loss_and_grad(lambda x, y: rmi_loss(x, y, backend=backend, **options), logits, labels)
    finally:
        torch.use_deterministic_algorithms(before)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("options", [{}, {"pool": "max"}, {"pool": "interp"}, {"class_weights": [1.0, 2.0, 0.5]},
                                     {"exclude_ignored": True}, {"pool": "none", "radius": 2}], ids=case_id)
def test_the_default_dtype_changes_nothing(backend, options):
    """torch.set_default_dtype(torch.float64) (common in scientific code) with float32 logits:
    the same loss and gradient (the torch engine's backward stopped with "Found dtype Float but
    expected Double" where it made its buffers without a dtype)."""
    if backend == "triton" and not triton_engine.available():
        pytest.skip("the Triton engine runs under the interpreter here")
    logits, labels = random_inputs(1, 3, 17, 19, seed=6)
    want = loss_and_grad(lambda x, y: rmi_loss(x, y, backend=backend, **options), logits, labels)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = loss_and_grad(lambda x, y: rmi_loss(x, y, backend=backend, **options), logits, labels)
    finally:
        torch.set_default_dtype(before)
    assert got[0].dtype == want[0].dtype and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_the_algebra_is_differentiable_once():
    """The d x d algebra's closed-form gradient has no graph of its own: differentiating it
    again raises (it came out as the derivative of the incoming gradient alone)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 8, 40, dtype=torch.float64, generator=g)
    joint = x @ x.transpose(1, 2)
    blocks = [joint[:, :4, :4].clone(), joint[:, 4:, 4:].clone(), joint[:, :4, 4:].clone()]
    inputs = [t.requires_grad_() for t in blocks]
    h = half_logdet_posterior(*inputs, CholeskyReport())
    grads = torch.autograd.grad((h * h).sum(), inputs, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        sum(g.square().sum() for g in grads).backward()


def test_once_takes_every_form_a_backward_returns():
    from rmi_triton.differentiable import once

    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, as_list):
            ctx.save_for_backward(x)
            ctx.as_list = as_list
            return x * x

        @staticmethod
        @once
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return [2 * x * grad, None] if ctx.as_list else (2 * x * grad, None)

    for as_list in (False, True):
        x = torch.tensor([1.5, -2.0], dtype=torch.float64, requires_grad=True)
        (first,) = torch.autograd.grad(Square.apply(x, as_list).sum(), x, create_graph=True)
        assert torch.equal(first.detach(), 2 * x.detach())
        with pytest.raises(RuntimeError, match="differentiable once"):
            first.sum().backward()
        (plain,) = torch.autograd.grad(Square.apply(x, as_list).sum(), x)
        assert not plain.requires_grad and torch.equal(plain, 2 * x.detach())

"""The Triton engine: fused kernels for the RMI statistics and their gradient.

Forward then backward, the full-resolution kernels reading their inputs once:

  A `_pool_forward_kernel`   full resolution, one image and a block of
      downsampled cells per program, looping over the classes: probabilities
      (sigmoid, or softmax from a first log-sum-exp loop), valid mask, the
      s x s pooling of p and of the one-hot labels (by counting), the arg-max
      of max pooling (the sigmoid's by the logits; the softmax's by p, with
      near-ties marked for the float64 pass, `rmi_triton.narrow`), the
      pixel-term partial sums and a non-finite count; then `_narrow_kernel`
      and A's float64 pass over the planes (or tied cells) it flags.
  B downsampled, the sums of the region vectors and of their products
      (`_launch_region_moments`):
      B0 `_centred_maps_kernel` y' and p' minus their first cells, float64,
         framed with zeros;
      B1 `_shifted_products_kernel` one plane, a tile of cells and a group of
         offsets of the (2R-1) x (2R-1) stencil per program: sums of
         x(u) x'(u + e) over the map, which are the products' sums over every
         origin whose window reaches the map (zeros outside it);
      B1b `_border_sums_kernel` the same sums along the map's R - 1 outermost
         rows and columns on each side: the origins above, below and beside
         the grid, taken out again;
      B2 `_window_products_kernel` the origins beside the grid's corners (taken
         out twice by B1b, put back), or with exclude_ignored the grid's kept
         vectors: gathered, products on the float64 tensor cores;
      B3 `_merge_moments_kernel` the float64 sums merged into Sy, Sp, Syp and
         the mean (one launch where ~25 PyTorch ops were).
  C0 `_grad_constants_kernel` per plane, from dL/dSp and dL/dSyp: G, the
      stencil's taps and the centring terms kernel C reads (float64 sums).
  C `_region_grad_kernel`    downsampled, the backward's
      dL/dp'_q = sum over the windows m that hold q at offset k of
      [G (v_m - vbar)]_k, G = [Gyp^T, Gp + Gp^T] acting on the joint vector:
      a fixed (2R-1) x (2R-1) stencil over the interior, window by window
      over the frame R - 1 wide around it.
  D `_pool_backward_kernel`  full resolution, same blocking as A: the pooling's
      backward (avg spreads / s^2, max routes to the stored arg-max), the
      sigmoid/softmax derivative, the valid mask and the BCE/CE gradient,
      writing dL/dlogits once in the logits' dtype and layout.

Every reduction is a fixed-order sum inside one program or a float64 sum of
per-program partials (B3, or PyTorch): no atomics, so results are bitwise
reproducible. "interp" pooling runs A and D at full resolution (no pooling)
and lets PyTorch do the bilinear interpolation in between (its backward: the
interpolation's adjoint in `rmi_triton.pooling`, without atomic adds).

The two halves are registered as `torch.library` custom ops with fake
(meta) implementations and an autograd formula, so `torch.compile` keeps the
loss in its graph; eager calls reach the same functions through a plain
autograd.Function (`_EagerStatistics`), without the dispatch's host time.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
from typing import NamedTuple, Optional, Tuple

import torch

from ..differentiable import once
from ..narrow import NARROW_SPREAD, TIE_TOLERANCE
from ..options import PROB_CLIP, RIDGE, RMIOptions
from ..pooling import bilinear_backward, kept_regions, pool_map
from ..validation import raise_if_nonfinite
from .torch_engine import Statistics, label_map_dtype, label_maps, pooled_labels

try:
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised on machines without triton
    _HAVE_TRITON = False

# ----------------------------------------------------------------------------
# constants and block-size heuristics
# ----------------------------------------------------------------------------

POOL_NONE, POOL_AVG, POOL_MAX = 0, 1, 2
PIXEL_NONE, PIXEL_BCE, PIXEL_CE = 0, 1, 2
CAPTURABLE = True  # with validate=False no step reads a value on the host: a CUDA graph can capture it

# Block sizes for a GPU (the AOT test compiles these). The interpreter pays per
# operation rather than per element, so under TRITON_INTERPRET=1 the blocks are
# larger; tests that need the GPU blocking set these module constants back.
GPU_BLOCKS = dict(
    FULL_RES_ELEMENTS=256,  # pixels per program of kernels A and D (cells x padded window): one warp's
    MOMENT_BLOCK_M=16,  # region positions per float32 sub-block of kernel B
    MOMENT_BD=32,  # side of the joint-covariance block one program of kernel B owns
    PRODUCT_ELEMENTS=2048,  # positions x stencil offsets per step of the shifted products (kernel B1)
    PRODUCT_TILE=4096,  # positions per program of kernel B1 (one reduction each)
    MERGE_ELEMENTS=128,  # joint-matrix entries per program of kernel B3 (256 spilled with Triton 3.6)
    BORDER_ELEMENTS=1024,  # line positions x stencil offsets per step of kernel B1b
    CENTRE_ELEMENTS=1024,  # padded-map positions per program of kernel B0
    NARROW_ELEMENTS=1024,  # cells per step of the narrow-plane kernel (one plane a program)
    STENCIL_FRAME_ELEMENTS=1024,  # frame cells x window offsets per program of kernel C (sets its registers)
    STENCIL_TILE=1024,  # interior cells per program of kernel C
    STENCIL_TILE_W=64,  # their columns
)
INTERPRETER_BLOCKS = dict(FULL_RES_ELEMENTS=16384, MOMENT_BLOCK_M=256, MOMENT_BD=256, PRODUCT_ELEMENTS=1 << 17,
                          PRODUCT_TILE=1 << 14, MERGE_ELEMENTS=1 << 16, BORDER_ELEMENTS=1 << 15,
                          CENTRE_ELEMENTS=1 << 16, NARROW_ELEMENTS=1 << 16,
                          STENCIL_FRAME_ELEMENTS=1 << 16, STENCIL_TILE=1 << 14, STENCIL_TILE_W=128)
_BLOCKS = INTERPRETER_BLOCKS if os.environ.get("TRITON_INTERPRET") == "1" else GPU_BLOCKS
FULL_RES_ELEMENTS = _BLOCKS["FULL_RES_ELEMENTS"]
MOMENT_BLOCK_M = _BLOCKS["MOMENT_BLOCK_M"]
MOMENT_BD = _BLOCKS["MOMENT_BD"]
PRODUCT_ELEMENTS = _BLOCKS["PRODUCT_ELEMENTS"]
PRODUCT_TILE = _BLOCKS["PRODUCT_TILE"]
MERGE_ELEMENTS = _BLOCKS["MERGE_ELEMENTS"]
BORDER_ELEMENTS = _BLOCKS["BORDER_ELEMENTS"]
CENTRE_ELEMENTS = _BLOCKS["CENTRE_ELEMENTS"]
NARROW_ELEMENTS = _BLOCKS["NARROW_ELEMENTS"]
STENCIL_FRAME_ELEMENTS = _BLOCKS["STENCIL_FRAME_ELEMENTS"]
STENCIL_TILE = _BLOCKS["STENCIL_TILE"]
STENCIL_TILE_W = _BLOCKS["STENCIL_TILE_W"]


def use_gpu_blocks(set_attribute=setattr) -> None:
    """Give this module a GPU's block sizes, for tests and tools that run the interpreter and
    need a GPU's blocking (which also shapes some buffers, and the runs of images B0's maps
    are made in); `set_attribute`: e.g. pytest's monkeypatch.setattr, to have them put back."""
    module = sys.modules[__name__]
    for name, value in GPU_BLOCKS.items():
        set_attribute(module, name, value)


# warps per program of each kernel (the AOT test compiles with these). Kernels A and D run
# one warp a program: A's cell sums of each class reach their store through shared memory,
# and with 8 warps that took 4 barriers of the whole block a class (Triton 3.6 and 3.9
# alike); a one-warp program needs none, in the same registers and instructions. D (no
# barriers either way) keeps A's geometry. B3 runs 2 warps over 256 entries: with more a
# program, ptxas (sm_80) spilled a few bytes at R = 3 or 10, Triton 3.6 or 3.9.
NUM_WARPS = dict(pool_forward=1, narrow=4, centred_maps=4, shifted_products=8, border_sums=4, window_products=8,
                 merge_moments=2, grad_constants=4, region_grad=8, pool_backward=1)
# the kernels' names, in launch order (tools that count or profile them: bench/op_count.py,
# bench/gpu_check.py)
KERNEL_NAMES = ("_pool_forward_kernel", "_narrow_kernel", "_centred_maps_kernel", "_shifted_products_kernel",
                "_border_sums_kernel", "_window_products_kernel", "_merge_moments_kernel",
                "_grad_constants_kernel", "_region_grad_kernel", "_pool_backward_kernel")
PRODUCT_LANES = 8  # stencil offsets per program of kernel B1, at most
MOMENT_TILE_POSITIONS = 256  # positions per program of kernel B2 (its tiles are merged by B3)
MOMENT_BUFFER_PER_PLANE = 16384  # at most about this many float64 tile sums per plane
# B0's float64 maps are made a run of images at a time, at most this many bytes a logit
# (half a float32 logits' size) or MAP_BYTES_FLOOR if more (their launches would cost more
# than the memory saves): one run at the paper's setting (1.1 bytes a logit with 4 x 4
# pooling), 3 at 2 x 2 (4.1), one image at a time without pooling (16.6 at R = 3)
MAP_BYTES_PER_LOGIT = 2
MAP_BYTES_FLOOR = 32 << 20
PROB_CLIP_C = tl.constexpr(PROB_CLIP) if _HAVE_TRITON else PROB_CLIP
LOG2E = tl.constexpr(1.4426950408889634) if _HAVE_TRITON else None  # 1 / ln 2
LN2 = tl.constexpr(0.6931471805599453) if _HAVE_TRITON else None
TIE_TOLERANCE_C = tl.constexpr(TIE_TOLERANCE) if _HAVE_TRITON else TIE_TOLERANCE
FLOAT32_MAX = tl.constexpr(3.4028234663852886e38) if _HAVE_TRITON else None
FLOAT32_TINY = tl.constexpr(1.1754943508222875e-38) if _HAVE_TRITON else None  # the smallest normal float32
# kernel A's arg-max byte: the window index (< 64), plus TIE_BIT where the cell holds a near-tie
TIE_BIT = tl.constexpr(128) if _HAVE_TRITON else 128

# Tests set this to pre-fill every internal output buffer with NaN (255 for the
# uint8 arg-max), so that an element a kernel forgot to write cannot pass.
FILL_OUTPUTS_WITH_NAN = False


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# Kernel B2 takes tl.dot of float64 blocks, which Triton compiles from 3.5 on (3.3 and 3.4
# stop with "Unsupported lhs dtype fp64"); PyTorch 2.9 and later ship such a Triton.
MIN_TRITON = (3, 5)


def _release(version: str) -> Optional[tuple]:
    """(major, minor) of a version string such as "3.4.0" or "3.5.0+git1234"; None where it
    names none (a build from source may say anything: it is given the benefit of the doubt)."""
    found = re.match(r"v?(\d+)\.(\d+)", version)
    return (int(found[1]), int(found[2])) if found else None


def triton_problem() -> Optional[str]:
    """What keeps the installed Triton (if any) from compiling the kernels, or None."""
    if not _HAVE_TRITON:
        return "triton is not installed"
    release = _release(str(getattr(triton, "__version__", "")))
    if release is not None and release < MIN_TRITON:
        return (f"triton {triton.__version__} is installed and the kernels need "
                f"{'.'.join(map(str, MIN_TRITON))} or newer (PyTorch 2.9 and later ship it)")
    return None


def missing() -> Optional[str]:
    """Why the engine cannot run on this machine, or None when it can."""
    problem = triton_problem()
    if problem is not None:
        return problem
    if not (torch.cuda.is_available() or _interpreted()):
        return "no CUDA device (nor TRITON_INTERPRET=1 set before triton is imported)"
    return None


def available() -> bool:
    """A recent enough Triton, and a CUDA device or the Triton interpreter to run on."""
    return missing() is None


def runs_on(device: torch.device) -> bool:
    """Whether the engine runs on tensors of `device`: CUDA ones, or any under the interpreter."""
    return available() and (device.type == "cuda" or _interpreted())


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the launchers (triton.cdiv is a constexpr function: ~10 us a call)."""
    return -(-a // b)


GRID_LIMITS = (2 ** 31 - 1, 65535, 65535)  # CUDA's: the programs a launch may have on each grid axis


def _grid(kernel: str, *dims: int) -> tuple:
    """A launch grid, checked against CUDA's limits (which the interpreter does not have): a
    ValueError that says what to change, not the driver's "invalid argument"."""
    if any(size > most for size, most in zip(dims, GRID_LIMITS)):
        raise ValueError(f"the Triton engine's {kernel} would launch {' x '.join(map(str, dims))} programs, past "
                         f"CUDA's limits ({GRID_LIMITS[0]} on the first grid axis, {GRID_LIMITS[1]} on the "
                         "others): the pooled map is too large for it; use a larger pool_size, or backend='torch'")
    return dims


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _joint_pad(d: int) -> int:
    """Padded length of each half of the joint [y; p] vector: a power of two,
    and at least 8 so that a 2 * pad block is a legal tl.dot operand (>= 16)."""
    return max(8, _next_pow2(d))


# ----------------------------------------------------------------------------
# forward kernels
# ----------------------------------------------------------------------------

if _HAVE_TRITON:

    @triton.jit
    def _cells(cell, n_cells, W_cells, H_low, W_low):
        """Row, column, "in the cell grid" and "in the pooled map" of cells."""
        cell_r = cell // W_cells
        cell_c = cell % W_cells
        cell_ok = cell < n_cells
        return cell_r, cell_c, cell_ok, cell_ok & (cell_r < H_low) & (cell_c < W_low)

    @triton.jit
    def _window(pid_block, n_cells, W_cells, H, W, H_low, W_low,
                S: tl.constexpr, PAD: tl.constexpr, SP: tl.constexpr, BLOCK: tl.constexpr):
        """Geometry of a block of downsampled cells and their s x s windows.

        Cells tile the image without overlap (kernel = stride = s, shifted by
        the padding); the cell grid runs one row/column past the pooled map
        where needed so that every pixel lies in exactly one cell. A block's
        pixels are [SP, BLOCK * SP]: the window's row, then the BLOCK cells'
        window columns side by side (cell k // SP, column k % SP), SP = s
        rounded up to a power of two. Along the last axis the addresses run
        along an image row, and Triton sees that (contiguous runs of SP): it
        puts a warp's threads along it, so a warp's load or store is 32
        neighbouring pixels of one row, and each thread holds its windows'
        rows, so the pooling's sums and maxima stay inside a thread but for a
        few lanes. (On [SP, BLOCK, SP] blocks with the coordinates clamped
        into the image, Triton 3.6 saw no contiguity and ran the threads down
        the window's rows: each load and store touched the sectors of 4 rows,
        4 times what its pixels fill.) Pixels outside the image keep their
        coordinates; loads and stores are masked with "pixel exists".
        Returns the [BLOCK * SP] row, column and "in the pooled map" of each
        window column's cell, and the [SP, BLOCK * SP] pixel row, column and
        "pixel exists".
        """
        k = tl.arange(0, BLOCK * SP)
        cell_r, cell_c, cell_ok, pooled = _cells(pid_block * BLOCK + k // SP, n_cells, W_cells, H_low, W_low)
        i = tl.arange(0, SP)[:, None]
        j = (k % SP)[None, :]
        row = i + (cell_r * S - PAD)[None, :]
        col = j + (cell_c * S - PAD)[None, :]
        pix_ok = cell_ok[None, :] & (i < S) & (j < S) & (row >= 0) & (row < H) & (col >= 0) & (col < W)
        return cell_r, cell_c, pooled, row, col, pix_ok

    @triton.jit
    def _window_index(S: tl.constexpr, SP: tl.constexpr, BLOCK: tl.constexpr):
        """[SP, BLOCK * SP] row-major index of each pixel in its s x s window (the max-pool arg-max)."""
        return tl.arange(0, SP)[:, None] * S + (tl.arange(0, BLOCK * SP) % SP)[None, :]

    @triton.jit
    def _offsets(row, col, s_h, s_w, WIDE: tl.constexpr):
        """row * s_h + col * s_w: int32 (an address is then one multiply-add
        on a GPU), int64 when an image spans 2**31 elements or more (WIDE)."""
        if WIDE:
            offsets = row.to(tl.int64) * s_h + col.to(tl.int64) * s_w
        else:
            offsets = row * s_h + col * s_w
        return offsets

    @triton.jit
    def _load_pixels(ptr, pix_ok):
        """[SP, BLOCK * SP] logits in their dtype where the pixel exists, 0 elsewhere."""
        return tl.load(ptr, mask=pix_ok, other=0.0)

    @triton.jit
    def _cell_sum(v, SP: tl.constexpr, BLOCK: tl.constexpr):
        """[SP, BLOCK * SP] -> [BLOCK]: the sum over each cell's window."""
        return tl.sum(tl.reshape(tl.sum(v, axis=0), (BLOCK, SP)), axis=1)

    @triton.jit
    def _cell_max(v, SP: tl.constexpr, BLOCK: tl.constexpr):
        """[SP, BLOCK * SP] -> [BLOCK]: the maximum over each cell's window."""
        return tl.max(tl.reshape(tl.max(v, axis=0), (BLOCK, SP)), axis=1)

    @triton.jit
    def _cell_argmax(v, S: tl.constexpr, SP: tl.constexpr, BLOCK: tl.constexpr):
        """[SP, BLOCK * SP] -> [BLOCK] maximum over each cell's window and its first index
        in row-major order (as torch's max pooling): each window column's maximum and first
        row holding it, then the first of the columns whose maximum is the window's."""
        col_max = tl.max(v, axis=0)
        index = tl.min(tl.where(v == col_max[None, :], _window_index(S, SP, BLOCK), S * SP), axis=0)
        index = tl.reshape(index, (BLOCK, SP))
        col_max = tl.reshape(col_max, (BLOCK, SP))
        cell_max = tl.max(col_max, axis=1)
        return cell_max, tl.min(tl.where(col_max == cell_max[:, None], index, S * S), axis=1)

    @triton.jit
    def _block_sum(v):
        """[SP, BLOCK * SP] -> scalar."""
        return tl.sum(tl.sum(v, axis=0), axis=0)

    @triton.jit
    def _sigmoid_small(x):
        """(sigmoid(-|x|), exp(-|x|)) from one exponential: the smaller of sigmoid(x) and
        1 - sigmoid(x), to float32's relative precision however large |x| is (a float32
        sigmoid(x) near 1 keeps little of 1 - sigmoid(x): at x = 8 its rounding is 2e-4 of
        it). exp(-|x|) is in (0, 1], so 1 / (1 + exp(-|x|)) cannot overflow and is taken
        as rsqrt(.)^2 (one instruction on a GPU, without a division's range checks).
        Within 3e-7 (1 + |x|) relative: the float32 |x| / ln 2 in the exponent rounds."""
        e = tl.exp2(tl.abs(x) * -LOG2E)
        r = tl.rsqrt(1.0 + e)
        return e * (r * r), e

    @triton.jit
    def _sigmoid_sides(x):
        """(sigmoid(x), 1 - sigmoid(x), sigmoid'(x)), each to float32's relative precision
        (`_sigmoid_small`'s)."""
        e = tl.exp2(tl.abs(x) * -LOG2E)
        r = tl.rsqrt(1.0 + e)
        r = r * r
        er = e * r
        return tl.where(x >= 0, r, er), tl.where(x >= 0, er, r), er * r

    @triton.jit
    def _log1p_unit(e):
        """log(1 + e) for e in [0, 1]: e times a degree-8 polynomial (log1p(e) / e
        interpolated at the 9 Chebyshev nodes of [0, 1], in the power basis),
        2.4e-7 relative error in float32 arithmetic -- no library logarithm
        (about 20 instructions on a GPU), and full relative precision for small
        e, where log(1 + e) has none."""
        q = 0.005126102361828089 * e - 0.029074065387248993
        q = q * e + 0.0775160863995552
        q = q * e - 0.13602247834205627
        q = q * e + 0.19076880812644958
        q = q * e - 0.2483539879322052
        q = q * e + 0.3331812024116516
        q = q * e - 0.4999944567680359
        q = q * e + 0.9999999403953552
        return q * e

    @triton.jit
    def _arith(x, EXACT: tl.constexpr):
        """x in kernel A's arithmetic: float32, float64 where EXACT (the narrow planes'
        second pass, `rmi_triton.narrow`)."""
        if EXACT:
            return x.to(tl.float64)
        else:
            return x.to(tl.float32)

    @triton.jit
    def _log_sum_exp(x_base, x_off, pix_ok, C, sx_c, EXACT: tl.constexpr):
        """Per pixel [SP, BLOCK * SP] over the C classes, float32: (log(1 + rest), the largest
        logit m, rest = sum of exp(x_c - m) over the classes but the first that holds m,
        top_small = rest / (1 + rest): 1 - softmax at m's class). The log-sum-exp is
        m + log(1 + rest); it is never formed, so that x - lse is (x - m) - log(1 + rest),
        with no rounding at the logits' scale (an ulp of 1e4 is 1e-3: softmax gradients
        were 4e-4 off at logits around 1e4);
        x_base + x_off point at class 0, classes are sx_c elements apart. One exponential
        (base 2: one instruction on a GPU) of -|x - m| a class: a new maximum scales the
        rest and adds the old maximum's term, 1. The largest logit's term stays exactly 1
        and out of `rest`, so 1 - softmax at the largest logit, rest / (1 + rest), keeps its
        relative precision (from a float32 softmax near 1 it would not). EXACT: in float64
        (`_arith`), and the first result is 1 / (1 + rest) (`_prob_split`)."""
        m = _arith(tl.full(x_off.shape, -float("inf"), tl.float32), EXACT)
        rest = _arith(tl.zeros(x_off.shape, dtype=tl.float32), EXACT)
        for _ in range(C):
            x = _arith(_load_pixels(x_base + x_off, pix_ok), EXACT)
            e = tl.exp2(tl.abs(x - m) * -LOG2E)
            rest = tl.where(x > m, (rest + 1.0) * e, rest + e)
            m = tl.maximum(m, x)
            x_base += sx_c
        if EXACT:  # (`_prob_split`'s factor where it takes p to its own precision)
            return 1.0 / (1.0 + rest), m, rest, rest / (1.0 + rest)
        return tl.log2(1.0 + rest) * LN2, m, rest, rest / (1.0 + rest)

    @triton.jit
    def _top_class(x, m, rest):
        """Where class x's softmax exceeds 1/2: it holds the largest logit m and no other class
        ties with it (rest < 1, `_log_sum_exp`)."""
        return (x == m) & (rest < 1.0)

    @triton.jit
    def _prob_split(x, log_rest, m, rest, top_small, SOFTMAX: tl.constexpr, EXACT: tl.constexpr):
        """A probability p [SP, BLOCK * SP] as (p > 1/2, the smaller of p and 1 - p), each
        to float32's relative precision, and exp(-|x|) (sigmoid only). p' near 1 held as a
        float32 p keeps too little of 1 - p' for the statistics of a confident prediction
        (where V is a small difference of large terms): kernel A sums the two sides apart.
        Softmax: only `_top_class` can exceed 1/2; its 1 - p is top_small = rest / (1 + rest).
        EXACT (float64; log_rest is then 1 / (1 + rest), `_log_sum_exp`): the other classes' p
        as exp(x - m) / (1 + rest), to p's own precision (from (x - m) - log(1 + rest) it was
        rounded at that sum's scale: an ulp of 8 is 1.8e-15), and the third result is p
        itself, which max pooling's EXACT pass ranks (`_pool_p`)."""
        if SOFTMAX:
            high = _top_class(x, m, rest)
            if EXACT:  # e: p itself, exp(x - m) / (1 + rest), as the reference forms it
                e = tl.exp2((x - m) * LOG2E) * log_rest
                small = tl.where(high, top_small, e)
            else:
                small = tl.where(high, top_small, tl.exp2(((x - m) - log_rest) * LOG2E))
                e = small
        else:
            high = x >= 0
            small, e = _sigmoid_small(x)
        return high, small, e

    @triton.jit
    def _load_next_class(x_base, x_off, pix_ok, sx_c, c, C):
        """Class c + 1's logits (class c's again after the last class), loaded while class c
        is processed: two loads in flight per element instead of one. Kernel A's class loop
        waited on memory (ncu, H200: most cycles stalled on the L1TEX scoreboard, 27% of
        the DRAM bandwidth); with this, 0.34 -> 0.23 ms at 16x21x513x513. Kernel D went
        0.42 -> 0.44 ms with it (14 more registers: 3 blocks an SM down to 2), so D loads
        as it goes."""
        return _load_pixels(x_base + tl.where(c + 1 < C, sx_c, 0) + x_off, pix_ok)

    @triton.jit
    def _map_index(cell_r, cell_c, C, H_low, W_low):
        """Index of cells in the [N, C, H', W'] maps: image program_id(1), class 0."""
        return (tl.program_id(1).to(tl.int64) * C * H_low + cell_r) * W_low + cell_c

    @triton.jit
    def _block_pixels(x_ptr, lab_ptr, C, H, W, H_low, W_low, W_cells, n_cells, sx_n, sx_h, sx_w, ignore_index,
                      S: tl.constexpr, PAD: tl.constexpr, SP: tl.constexpr, BLOCK: tl.constexpr,
                      WIDE: tl.constexpr):
        """What kernels A and D know of their block before the class loop: for each
        window column [BLOCK * SP], its cell's index into the [N, C, H', W'] maps
        (class 0; classes H' W' apart) and whether it is in the pooled map; for each
        pixel [SP, BLOCK * SP], "pixel exists", the logits' base (class 0; classes
        sx_c apart) and offsets, the labels and the valid mask, as bool and as
        float."""
        pid_block = tl.program_id(0)
        n = tl.program_id(1).to(tl.int64)
        cell_r, cell_c, pooled, row, col, pix_ok = _window(
            pid_block, n_cells, W_cells, H, W, H_low, W_low, S, PAD, SP, BLOCK)
        x_base = x_ptr + n * sx_n
        x_off = _offsets(row, col, sx_h, sx_w, WIDE)
        lab = tl.load(lab_ptr + n * H * W + _offsets(row, col, W, 1, WIDE), mask=pix_ok).to(tl.int32)
        valid = pix_ok & (lab != ignore_index)
        low = _map_index(cell_r, cell_c, C, H_low, W_low)
        return low, pooled, pix_ok, x_base, x_off, row, col, lab, valid, valid.to(tl.float32)

    @triton.jit
    def _cell_columns(v, SP: tl.constexpr, BLOCK: tl.constexpr):
        """[BLOCK] -> [1, BLOCK * SP]: each cell's value at its window's columns."""
        return tl.reshape(tl.broadcast_to(v[:, None], (BLOCK, SP)), (BLOCK * SP,))[None, :]

    @triton.jit
    def _tie_bound(top):
        """`rmi_triton.narrow.tie_bound`: how near another pixel's key must come to a cell's
        largest, `top`, to count as a tie (0, no tie, where top is 0)."""
        size = tl.abs(top)
        return size * (4.0 + tl.abs(tl.log2(tl.maximum(size, FLOAT32_TINY)) * LN2)) * TIE_TOLERANCE_C

    @triton.jit
    def _pool_p(x, high, small, valid, pix_ok, p_low_ptr, arg_ptr, low, pooled, floor, inv_area,
                S: tl.constexpr, SP: tl.constexpr, BLOCK: tl.constexpr, POOL: tl.constexpr,
                SOFTMAX: tl.constexpr, EXACT: tl.constexpr):
        """Stores one class's pooled p' (float64) and, max pooling, the window index of its
        maximum, from `_prob_split`'s sides (x: the logits, the sigmoid's order; the softmax's
        EXACT pass: p itself); padding counts as zero in avg's s * s divisor."""
        # p = sigmoid(x) v + floor is 1 - small (+ floor) on the high side
        if POOL == 2:  # the first maximum in row-major order, as torch's max pooling
            if SOFTMAX and EXACT:
                # float64 p ranked as the reference ranks it: ordering the high side by 1 - p,
                # to its own precision, split pixels whose float64 p are equal, which the
                # reference takes in row-major order (its p near 1 rounds at 1.1e-16; found by
                # a randomised run on upsampled logits)
                key = tl.where(pix_ok, tl.where(valid, x, 0.0), -float("inf"))
                p_cell, arg = _cell_argmax(key, S, SP, BLOCK)
            elif SOFTMAX:
                # Any high pixel beats every low one; on the high side the smallest 1 - p wins,
                # on the low side the largest p (ignored pixels: p = 0, below any valid one).
                # Both sides to float32's relative precision: ordering by x - lse instead tied
                # and swapped pixels whose 1 - p differ by less than lse's rounding.
                top_high, arg_high = _cell_argmax(tl.where(pix_ok, tl.where(valid & high, -small, -1.0),
                                                           -float("inf")), S, SP, BLOCK)
                low_key = tl.where(valid, tl.where(high, -1.0, small), -0.5)
                top_low, arg_low = _cell_argmax(tl.where(pix_ok, low_key, -float("inf")), S, SP, BLOCK)
                has_high = top_high > -1.0
                p_cell = tl.where(has_high, 1.0 + top_high.to(tl.float64), tl.maximum(top_low, 0.0).to(tl.float64))
                arg = tl.where(has_high, arg_high, arg_low)
                # A float32 p orders pixels whose p differ by less than its rounding at
                # random: a cell whose largest p has another within `_tie_bound` of it
                # sets TIE_BIT, and `_narrow_kernel` sends the cell to the EXACT pass.
                # Where the cell has a high pixel, the low ones on the high side's scale,
                # p - 1 (exact for p >= 1/2): the float32 split at 1/2 (rest < 1, a sum of
                # rounded terms) can put the larger of two p near 1/2 on the low side (a
                # review found a pair 1.5e-8 apart, 4.8e-2 off). Ignored pixels and cells
                # of p = 0 alone: no tie.
                top = tl.where(has_high, top_high, tl.maximum(top_low, 0.0))
                bound = _cell_columns(_tie_bound(top), SP, BLOCK)
                low_scale = tl.where(_cell_columns(has_high, SP, BLOCK), small - 1.0, small)
                key = tl.where(valid, tl.where(high, -small, low_scale), -float("inf"))
                near = tl.abs(key - _cell_columns(top, SP, BLOCK)) < bound
                arg = tl.where(_cell_sum(near.to(tl.float32), SP, BLOCK) > 1.0, arg + TIE_BIT, arg)
            else:
                # sigmoid is increasing: the largest logit has the largest p, exactly (a
                # float32 p ties logits that differ: a cell's gradient went to another pixel
                # than the float64 reference's); ignored pixels below every valid one
                key = tl.where(valid, tl.maximum(x, -FLOAT32_MAX), -FLOAT32_MAX)
                top, arg = _cell_argmax(tl.where(pix_ok, key, -float("inf")), S, SP, BLOCK)
                has_valid = top > -FLOAT32_MAX  # (sigmoid(-FLOAT32_MAX) is 0 too)
                top_small, _e = _sigmoid_small(tl.where(has_valid, top, 0.0))
                p_cell = tl.where(top >= 0, 1.0 - top_small.to(tl.float64), top_small.to(tl.float64))
                p_cell = tl.where(has_valid, p_cell, 0.0)
            tl.store(p_low_ptr + low, p_cell + PROB_CLIP_C, mask=pooled)
            tl.store(arg_ptr + low, arg.to(tl.uint8), mask=pooled)
        else:  # avg; none: s = 1
            high_count = _cell_sum(tl.where(valid & high, 1.0, 0.0), SP, BLOCK)
            signed = _cell_sum(tl.where(valid, tl.where(high, -small, small), 0.0), SP, BLOCK)
            p_cell = (high_count.to(tl.float64) + signed.to(tl.float64) + floor) * inv_area
            tl.store(p_low_ptr + low, p_cell, mask=pooled)

    @triton.jit
    def _holds_tie(arg_ptr, narrow_ptr, C, H_low, W_low, W_cells, n_cells, BLOCK: tl.constexpr):
        """Whether a cell of this program's block has kernel A's TIE_BIT in a plane flagged 2
        (sent to the EXACT pass for its ties alone): C loads of BLOCK bytes at most."""
        cell_r, cell_c, _, pooled = _cells(tl.program_id(0) * BLOCK + tl.arange(0, BLOCK), n_cells, W_cells,
                                           H_low, W_low)
        low = _map_index(cell_r, cell_c, C, H_low, W_low)
        narrow_base = narrow_ptr + tl.program_id(1).to(tl.int64) * C
        hit = tl.zeros((), tl.int32)
        for c in range(C):
            flag = tl.load(narrow_base + c) + tl.zeros((BLOCK,), tl.int32)  # (as in `_pool_forward_block`)
            arg = tl.load(arg_ptr + low + c * H_low * W_low, mask=pooled & (flag == 2), other=0).to(tl.int32)
            hit = hit | tl.max(arg & TIE_BIT, axis=0)
        return hit != 0

    @triton.jit
    def _pool_forward_kernel(
        x_ptr,  # [N, C, H, W] logits (float32/16/bf16), strides sx_*
        lab_ptr,  # [N, H, W] labels (int64/int32/uint8), contiguous
        w_ptr,  # [C] float32 class weights (read when HAS_WEIGHTS)
        p_low_ptr,  # [N, C, H', W'] float64 out: pooled probabilities p'
        y_low_ptr,  # [N, C, H', W'] float32 or float64 (`label_map_dtype`) out: pooled one-hot labels y' (when WRITE_Y)
        arg_ptr,  # [N, C, H', W'] uint8 out: window index of the max (when POOL == max)
        part_ptr,  # [N, n_blocks, 3] float32 out: pixel-loss sum, its denominator, 0 or NaN (non-finite logits)
        share_ptr,  # [N, H', W'] float32 out (avg pooling, WRITE_Y): the valid pixels of each cell, counted
        narrow_ptr,  # [N, C] int32 (EXACT): the narrow planes, nonzero
        C, H, W, H_low, W_low, W_cells, n_cells,
        sx_n, sx_c, sx_h, sx_w,
        ignore_index,
        S: tl.constexpr, PAD: tl.constexpr, SP: tl.constexpr, BLOCK: tl.constexpr,
        POOL: tl.constexpr, SOFTMAX: tl.constexpr, PIXEL: tl.constexpr,
        HAS_WEIGHTS: tl.constexpr, WRITE_Y: tl.constexpr, CHECK_FINITE: tl.constexpr, WIDE: tl.constexpr,
        EXACT: tl.constexpr, C_PAD: tl.constexpr,
    ):
        """Kernel A. EXACT: the narrow planes' second pass (`rmi_triton.narrow`), p' and the
        max pooling's arg-max of those planes only, from float64 probabilities; every program
        of an image without a narrow plane returns after one load of its C flags (C_PAD: C
        rounded up to a power of two)."""
        if EXACT:
            classes = tl.arange(0, C_PAD)
            flags = tl.load(narrow_ptr + tl.program_id(1).to(tl.int64) * C + classes, mask=classes < C, other=0)
            go = tl.max(tl.where(flags == 1, 1, 0), axis=0)  # a narrow plane: every block
            if POOL == 2 and SOFTMAX:  # planes sent for their ties alone (flag 2): the blocks that hold one
                go = go | _holds_tie(arg_ptr, narrow_ptr, C, H_low, W_low, W_cells, n_cells, BLOCK)
            if go != 0:
                _pool_forward_block(x_ptr, lab_ptr, w_ptr, p_low_ptr, y_low_ptr, arg_ptr, part_ptr, share_ptr,
                                    narrow_ptr, C, H, W, H_low, W_low, W_cells, n_cells, sx_n, sx_c, sx_h, sx_w,
                                    ignore_index, S, PAD, SP, BLOCK, POOL, SOFTMAX, PIXEL, HAS_WEIGHTS, WRITE_Y,
                                    CHECK_FINITE, WIDE, EXACT)
        else:
            _pool_forward_block(x_ptr, lab_ptr, w_ptr, p_low_ptr, y_low_ptr, arg_ptr, part_ptr, share_ptr,
                                narrow_ptr, C, H, W, H_low, W_low, W_cells, n_cells, sx_n, sx_c, sx_h, sx_w, ignore_index,
                                S, PAD, SP, BLOCK, POOL, SOFTMAX, PIXEL, HAS_WEIGHTS, WRITE_Y, CHECK_FINITE,
                                WIDE, EXACT)

    @triton.jit
    def _pool_forward_block(
        x_ptr, lab_ptr, w_ptr, p_low_ptr, y_low_ptr, arg_ptr, part_ptr, share_ptr, narrow_ptr,
        C, H, W, H_low, W_low, W_cells, n_cells, sx_n, sx_c, sx_h, sx_w, ignore_index,
        S: tl.constexpr, PAD: tl.constexpr, SP: tl.constexpr, BLOCK: tl.constexpr,
        POOL: tl.constexpr, SOFTMAX: tl.constexpr, PIXEL: tl.constexpr,
        HAS_WEIGHTS: tl.constexpr, WRITE_Y: tl.constexpr, CHECK_FINITE: tl.constexpr, WIDE: tl.constexpr,
        EXACT: tl.constexpr,
    ):
        """Kernel A's work on its block (`_pool_forward_kernel`)."""
        _, _, pix_ok, x_base, x_off, _, _, lab, valid, vf = _block_pixels(
            x_ptr, lab_ptr, C, H, W, H_low, W_low, W_cells, n_cells, sx_n, sx_h, sx_w, ignore_index,
            S, PAD, SP, BLOCK, WIDE)
        cell_r, cell_c, _, pooled = _cells(tl.program_id(0) * BLOCK + tl.arange(0, BLOCK), n_cells, W_cells,
                                           H_low, W_low)
        low = _map_index(cell_r, cell_c, C, H_low, W_low)  # [BLOCK], where the cells' results go
        lab = tl.where(valid, lab, -1)  # matches no class
        hw_low = H_low * W_low

        if SOFTMAX or PIXEL == 2:
            log_rest, m, rest, top_small = _log_sum_exp(x_base, x_off, pix_ok, C, sx_c, EXACT)
        else:
            log_rest = 0.0
            m = 0.0
            rest = 0.0
            top_small = 0.0
        if POOL != 2:  # the cells' in-image pixels times the probabilities' floor, exactly
            floor = _cell_sum(pix_ok.to(tl.float32), SP, BLOCK).to(tl.float64) * PROB_CLIP_C
            inv_area = 1.0 / tl.full((), S * S, tl.float64)
        else:
            floor = 0.0
            inv_area = 1.0
        if EXACT:
            narrow_base = narrow_ptr + tl.program_id(1).to(tl.int64) * C
            for c in range(C):
                flag = tl.load(narrow_base + c)
                if flag != 0:
                    x = _arith(_load_pixels(x_base + x_off, pix_ok), EXACT)
                    high, small, p = _prob_split(x, log_rest, m, rest, top_small, SOFTMAX, EXACT)
                    written = pooled
                    if POOL == 2 and SOFTMAX:  # flag 2: only the cells kernel A marked tied
                        cell_flag = flag + tl.zeros((BLOCK,), tl.int32)  # (a scalar in a block's mask: the interpreter refuses it)
                        old = tl.load(arg_ptr + low, mask=pooled & (cell_flag == 2), other=0)
                        written = pooled & ((cell_flag == 1) | ((old & TIE_BIT) != 0))
                    _pool_p(p if SOFTMAX else x, high, small, valid, pix_ok, p_low_ptr, arg_ptr, low, written,
                            floor, inv_area, S, SP, BLOCK, POOL, SOFTMAX, EXACT)
                x_base += sx_c
                low += hw_low
        else:
            if WRITE_Y and POOL == 1:  # p' s^2 / count is the valid pixels' mean p (`_narrow_kernel`)
                tl.store(share_ptr + (tl.program_id(1).to(tl.int64) * H_low + cell_r) * W_low + cell_c,
                         _cell_sum(vf, SP, BLOCK), mask=pooled)
            loss = tl.zeros(pix_ok.shape, dtype=tl.float32)  # BCE: sum_c w_c (softplus(x_c) - y_c x_c); CE: x_label
            bad = tl.zeros(pix_ok.shape, dtype=tl.float32)  # x * 0: NaN where a logit is NaN or infinite
            x_next = _load_pixels(x_base + x_off, pix_ok)
            for c in range(C):
                if POOL == 2:  # max pooling: the second load's registers would halve the blocks an SM holds
                    x = _load_pixels(x_base + x_off, pix_ok).to(tl.float32)
                else:
                    x = x_next.to(tl.float32)
                    x_next = _load_next_class(x_base, x_off, pix_ok, sx_c, c, C)
                is_c = lab == c
                if CHECK_FINITE:
                    bad += x * 0.0
                high, small, e = _prob_split(x, log_rest, m, rest, top_small, SOFTMAX, EXACT)
                if PIXEL == 1:  # softplus(x) - x y = max(t x, 0) + log(1 + exp(-|x|)), t = 1 - 2 y
                    if SOFTMAX:  # (max(x, 0) - x y first: exact, where x + log(1 + e) - x would lose e)
                        e = tl.exp2(tl.abs(x) * -LOG2E)
                    bce = tl.maximum(tl.where(is_c, -x, x), 0.0) + _log1p_unit(e)
                    if HAS_WEIGHTS:
                        bce = bce * tl.load(w_ptr + c)
                    loss += bce
                if PIXEL == 2:
                    loss += tl.where(is_c, x, 0.0)
                _pool_p(x, high, small, valid, pix_ok, p_low_ptr, arg_ptr, low, pooled, floor, inv_area,
                        S, SP, BLOCK, POOL, SOFTMAX, EXACT)
                if WRITE_Y:
                    y = tl.where(is_c, 1.0, 0.0)
                    if POOL == 2:
                        tl.store(y_low_ptr + low, _cell_max(y, SP, BLOCK), mask=pooled)
                    else:
                        tl.store(y_low_ptr + low, _cell_sum(y, SP, BLOCK).to(tl.float64) * inv_area, mask=pooled)
                x_base += sx_c
                low += hw_low

            if PIXEL == 2:  # w_label (lse - x_label); log(1 + rest) where the label has the largest logit
                loss = tl.where(_top_class(loss, m, rest), _log1p_unit(rest), (m - loss) + log_rest)
                if HAS_WEIGHTS:
                    pw = tl.load(w_ptr + lab, mask=valid, other=0.0) * vf
                else:
                    pw = vf
                loss_sum = _block_sum(tl.where(valid, loss * pw, 0.0))
                denom = _block_sum(pw)
            else:
                loss_sum = _block_sum(tl.where(valid, loss, 0.0))
                denom = _block_sum(vf)
            part = part_ptr + (tl.program_id(1).to(tl.int64) * tl.num_programs(0) + tl.program_id(0)) * 3
            tl.store(part, loss_sum)
            tl.store(part + 1, denom)
            tl.store(part + 2, _block_sum(bad))

    @triton.jit
    def _narrow_kernel(p_ptr, y_ptr, share_ptr, keep_ptr, arg_ptr, flag_ptr, C, H_low, W_low, H_v, W_v, spread,
                       R: tl.constexpr, BLOCK: tl.constexpr, SHARE: tl.constexpr, AREA: tl.constexpr,
                       HAS_KEEP: tl.constexpr, TIES: tl.constexpr):
        """Whether each plane is narrow: `rmi_triton.narrow.narrow_planes`' rule, one plane a
        program, in one pass over p' [N, C, H', W'] float64 and y' (its labels: a plane whose
        y' is constant has no RMI gradient, `informative_planes`, and is never narrow). SHARE:
        q = p' AREA / share, share ([N, H', W']) kernel A's count of valid pixels a cell with
        avg pooling (AREA = s^2: no float32 1 / s^2 rounds it) or the interpolated valid mask
        with "interp" (AREA = 1), over the cells where it is
        positive; else q = p' over the cells above the 1e-6 floor (max pooling and none put
        exactly the floor where no valid pixel is). HAS_KEEP: only cells a kept region vector
        ([N, H_v, W_v]) holds count. Their mean and centred sum of squares, block by block,
        merged as Chan et al. merge two samples' moments (no difference of large sums: exact
        enough near p' = 1). TIES (softmax with max pooling): a plane is also sent to the EXACT
        pass where a cell of its arg-max (arg_ptr, [N, C, H', W'] uint8) has kernel A's TIE_BIT,
        for those cells alone. Writes flag_ptr[plane]: 1 (narrow), 2 (not narrow, some cell
        tied) or 0."""
        plane = tl.program_id(0).to(tl.int64)
        n = plane // C
        hw = H_low * W_low
        count = tl.zeros((), tl.float64)
        mean = tl.zeros((), tl.float64)
        m2 = tl.zeros((), tl.float64)
        y_low = tl.full((), float("inf"), tl.float64)
        y_high = tl.full((), -float("inf"), tl.float64)
        tied = tl.zeros((), tl.int32)
        for start in range(0, hw, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            ok = idx < hw
            if TIES:
                arg = tl.load(arg_ptr + plane * hw + idx, mask=ok, other=0).to(tl.int32)
                tied = tied | tl.max(arg & TIE_BIT, axis=0)
            q = tl.load(p_ptr + plane * hw + idx, mask=ok, other=0.0)
            y = tl.load(y_ptr + plane * hw + idx, mask=ok, other=0.0).to(tl.float64)
            y_low = tl.minimum(y_low, tl.min(tl.where(ok, y, float("inf")), axis=0))
            y_high = tl.maximum(y_high, tl.max(tl.where(ok, y, -float("inf")), axis=0))
            if SHARE:
                share = tl.load(share_ptr + n * hw + idx, mask=ok, other=0.0).to(tl.float64)
                counted = ok & (share > 0)
                q = q * AREA / tl.where(counted, share, 1.0)
            else:
                counted = ok & (q > PROB_CLIP_C)
            if HAS_KEEP:
                i = idx // W_low
                j = idx % W_low
                held = tl.zeros((BLOCK,), tl.int1)
                for a in range(R):  # loops, not unrolled: R * R loads unrolled spilled at R = 5 (sm_90)
                    for b in range(R):
                        inside = (i >= a) & (i - a < H_v) & (j >= b) & (j - b < W_v)
                        kept = tl.load(keep_ptr + n * H_v * W_v + (i - a) * W_v + (j - b), mask=ok & inside,
                                       other=0.0)
                        held = held | (kept != 0)
                counted = counted & held
            q = tl.where(counted, q, 0.0)
            block_count = tl.sum(counted.to(tl.float64), axis=0)
            block_mean = tl.sum(q, axis=0) / tl.maximum(block_count, 1.0)
            block_m2 = tl.sum(tl.where(counted, (q - block_mean) * (q - block_mean), 0.0), axis=0)
            total = count + block_count
            delta = block_mean - mean
            frac = block_count / tl.maximum(total, 1.0)
            mean = mean + delta * frac
            m2 = m2 + block_m2 + delta * delta * count * frac
            count = total
        level = tl.minimum(mean, 1.0 - mean) * spread
        narrow = (count > 0) & (m2 / tl.maximum(count, 1.0) <= level * level)
        flag = tl.where(narrow, 1, tl.where(tied != 0, 2, 0))
        tl.store(flag_ptr + plane, tl.where(y_high > y_low, flag, 0))

    @triton.jit
    def _joint_gather(maps_ptr, plane, mi, mj, m_ok, J, stride, Wp, R: tl.constexpr, D: tl.constexpr,
                      D_PAD: tl.constexpr):
        """Entries J of the centred joint region vectors [y; p] at origins (mi, mj), from
        B0's padded maps (zero outside the map: origins off the grid need no mask); 0 at
        padding entries and where m_ok is false.

        J indexes the padded joint vector: J < D_PAD the labels' window entry
        J, else the probabilities' entry J - D_PAD (row-major in the R x R
        window). Returns [B, len(J)] float64.
        """
        is_p = (J >= D_PAD).to(tl.int32)
        comp = J % D_PAD
        row = mi[:, None] + (comp // R + R - 1)[None, :]
        col = mj[:, None] + (comp % R + R - 1)[None, :]
        mask = m_ok[:, None] & (comp < D)[None, :]
        return tl.load(maps_ptr + (plane * 2 + is_p[None, :]) * stride + row * Wp + col, mask=mask, other=0.0)

    @triton.jit
    def _corner_origins(m, H_v, W_v, R: tl.constexpr):
        """(row, col) of origin m of the 4 (R - 1) x (R - 1) blocks of origins off the
        H_v x W_v grid beside its corners (above and left of its first origin, above and
        right, below and left, below and right), row-major within each block."""
        K: tl.constexpr = (R - 1) * (R - 1)
        corner = m // K
        i = (m % K) // (R - 1)
        j = (m % K) % (R - 1)
        return (tl.where(corner < 2, i - (R - 1), H_v + i),
                tl.where(corner % 2 == 0, j - (R - 1), W_v + j))

    @triton.jit
    def _frame_cells(f, H, W, H_in, W_in, R: tl.constexpr):
        """(row, col) of cell f of the frame of an H x W map around the H_in x W_in
        interior at (R-1, R-1): first the H - H_in full rows above and below
        the interior, then the rows beside it, W - W_in cells each."""
        band = (H - H_in) * W
        side_w = W - W_in
        side = tl.maximum(f - band, 0)
        row = f // W
        col = side % side_w
        qi = tl.where(f < band, tl.where(row < R - 1, row, row + H_in), R - 1 + side // side_w)
        qj = tl.where(f < band, f % W, tl.where(col < R - 1, col, col + W_in))
        return qi, qj

    @triton.jit
    def _centred_maps_kernel(
        y_ptr,  # [P, H', W'] float32 or float64 pooled labels y'
        p_ptr,  # [P, H', W'] float64 pooled probabilities p'
        centre_ptr,  # [P, 2] float32 out: the centres of the y' and p' maps (their first cells, rounded)
        maps_ptr,  # [P, 2, stride] float64 out: y', p' minus their centres, 0 around them (see below)
        H_low, W_low, stride,
        R: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """B0: the maps kernels B1 and B2 read, BLOCK positions of one plane's pair a
        program: each map minus its centre (its first cell rounded to float32) in float64,
        padded to (H' + 2R - 2) x (W' + 2R - 2) with a zero frame R - 1 wide and
        followed by zeros up to `stride` (a guard for B1's last step), so that every window
        or stencil reaching the map reads in bounds without a mask, and nothing is converted
        or centred again. The centre is the map's first cell: any value of the map is within
        sqrt(n) standard deviations of its mean, and the float64 sums lose no more than that
        factor."""
        plane = tl.program_id(0).to(tl.int64)
        Wp = W_low + 2 * (R - 1)
        i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = i < stride
        row = i // Wp - (R - 1)
        col = i % Wp - (R - 1)
        inside = ok & (row >= 0) & (row < H_low) & (col >= 0) & (col < W_low)
        src = plane * H_low * W_low + row * W_low + col
        centre_y = tl.load(y_ptr + plane * H_low * W_low).to(tl.float32)
        centre_p = tl.load(p_ptr + plane * H_low * W_low).to(tl.float32)
        y = tl.load(y_ptr + src, mask=inside, other=0.0).to(tl.float64) - centre_y.to(tl.float64)
        p = tl.load(p_ptr + src, mask=inside, other=0.0).to(tl.float64) - centre_p.to(tl.float64)
        out = maps_ptr + plane * 2 * stride + i
        tl.store(out, tl.where(inside, y, 0.0), mask=ok)
        tl.store(out + stride, tl.where(inside, p, 0.0), mask=ok)
        if tl.program_id(1) == 0:
            tl.store(centre_ptr + plane * 2, centre_y)
            tl.store(centre_ptr + plane * 2 + 1, centre_p)

    @triton.jit
    def _offset_group(maps_ptr, stride, W_low, R: tl.constexpr, LANES: tl.constexpr):
        """B1's and B1b's plane (program axis 0), its y' and p' in B0's maps, and their group
        of LANES stencil offsets e (axis 2): e, e < (2R-1)^2, and the address shift of each,
        [LANES, 1] (0 for padding lanes)."""
        WIDTH: tl.constexpr = 2 * R - 1
        plane = tl.program_id(0).to(tl.int64)
        y_base = maps_ptr + plane * 2 * stride
        e = tl.program_id(2) * LANES + tl.arange(0, LANES)
        e_ok = e < WIDTH * WIDTH
        shift = tl.where(e_ok, (e // WIDTH - (R - 1)) * (W_low + 2 * (R - 1)) + (e % WIDTH - (R - 1)), 0)[:, None]
        return plane, y_base, y_base + stride, e, e_ok, shift

    @triton.jit
    def _shifted_products_kernel(
        maps_ptr,  # [P, 2, stride] float64 B0's centred, padded y' and p'
        prod_ptr,  # [P, T, 3, (2R-1)^2] float64 out: each tile's sums of yy, yp, pp products
        sum_ptr,  # [P, T, 2] float64 out: each tile's sums of the centred y' and p'
        H_low, W_low, stride, T, tile_len,
        R: tl.constexpr, LANES: tl.constexpr, CHUNK: tl.constexpr,
    ):
        """Sums over a tile of positions u of x(u) x'(u + e) for the centred maps x, x'
        in (y, y), (y, p), (p, p) and LANES offsets e of the (2R-1) x (2R-1) stencil
        (a group of them, program axis 2), over every origin whose window reaches the map
        (zeros outside it). Entry (j, j') of the joint sums is the sum for
        e = offset(j') - offset(j). Positions run over B0's padded maps from the map's first
        cell to its last, so every shifted position is an address in the plane: the frame's
        zeros (x(u) = 0 beside the map) make the columns between the map's rows add nothing,
        and the last step's positions past the map read zeros too (B0's guard). Products
        and sums in float64 (exact products of the exact differences). A thread holds a
        position's LANES offsets, so the position's own values are loaded once for them."""
        E: tl.constexpr = (2 * R - 1) * (2 * R - 1)
        plane, y_base, p_base, e, e_ok, shift = _offset_group(maps_ptr, stride, W_low, R, LANES)
        tile = tl.program_id(1)
        Wp = W_low + 2 * (R - 1)
        first = (R - 1) * Wp + (R - 1)  # the map's first cell
        start = first + tile * tile_len
        stop = tl.minimum(start + tile_len, first + (H_low - 1) * Wp + W_low)
        acc_yy = tl.zeros((LANES, CHUNK), dtype=tl.float64)
        acc_yp = tl.zeros((LANES, CHUNK), dtype=tl.float64)
        acc_pp = tl.zeros((LANES, CHUNK), dtype=tl.float64)
        sum_y = tl.zeros((1, CHUNK), dtype=tl.float64)
        sum_p = tl.zeros((1, CHUNK), dtype=tl.float64)
        for u0 in range(start, stop, CHUNK):
            u = u0 + tl.arange(0, CHUNK)[None, :]
            y0 = tl.load(y_base + u)
            p0 = tl.load(p_base + u)
            sum_y += y0
            sum_p += p0
            p1 = tl.load(p_base + u + shift)
            acc_yy += y0 * tl.load(y_base + u + shift)
            acc_yp += y0 * p1
            acc_pp += p0 * p1
        row = prod_ptr + (plane * T + tile) * (3 * E) + e
        tl.store(row, tl.sum(acc_yy, axis=1), mask=e_ok)
        tl.store(row + E, tl.sum(acc_yp, axis=1), mask=e_ok)
        tl.store(row + 2 * E, tl.sum(acc_pp, axis=1), mask=e_ok)
        if tl.program_id(2) == 0:
            tl.store(sum_ptr + (plane * T + tile) * 2, tl.sum(tl.sum(sum_y, axis=1), axis=0))
            tl.store(sum_ptr + (plane * T + tile) * 2 + 1, tl.sum(tl.sum(sum_p, axis=1), axis=0))

    @triton.jit
    def _border_sums_kernel(
        maps_ptr,  # [P, 2, stride] float64 B0's centred, padded y' and p'
        border_ptr,  # [P, 4, R-1, 3, (2R-1)^2] float64 out: sums of yy, yp, pp products along the sides' lines
        lin_ptr,  # [P, 4, R-1, 2] float64 out: sums of the centred y' and p' along them
        H_low, W_low, stride,
        R: tl.constexpr, LANES: tl.constexpr, CHUNK: tl.constexpr,
    ):
        """B1b: what B1's sums over the whole map hold beyond the grid's region vectors, by
        lines. Side 0 takes the map's top rows, 1 its bottom rows, 2 its left columns, 3 its
        right columns (program axis 1); record k - 1 of a side sums over its k outermost
        lines (k = 1 .. R - 1): x(u) x'(u + e) for the pairs (y, y), (y, p), (p, p) and
        LANES stencil offsets e (a group of them, axis 2), and x(u) for y' and p'. The
        component at window offset (a, b) never sees the top a rows, the bottom R - 1 - a,
        the left b columns and the right R - 1 - b from the grid (B3 takes them out; the
        corners, taken out twice, are B2's)."""
        E: tl.constexpr = (2 * R - 1) * (2 * R - 1)
        plane, y_base, p_base, e, e_ok, shift = _offset_group(maps_ptr, stride, W_low, R, LANES)
        side = tl.program_id(1)
        Wp = W_low + 2 * (R - 1)
        rows = side < 2
        length = tl.where(rows, W_low, H_low)  # cells along a line
        last = tl.where(rows, H_low, W_low) - 1  # the far side's outermost line
        sum_yy = tl.zeros((LANES,), dtype=tl.float64)
        sum_yp = tl.zeros((LANES,), dtype=tl.float64)
        sum_pp = tl.zeros((LANES,), dtype=tl.float64)
        sum_y = tl.zeros((), dtype=tl.float64)
        sum_p = tl.zeros((), dtype=tl.float64)
        for k in range(R - 1):
            line = tl.where(side % 2 == 0, k, last - k)
            acc_yy = tl.zeros((LANES, CHUNK), dtype=tl.float64)
            acc_yp = tl.zeros((LANES, CHUNK), dtype=tl.float64)
            acc_pp = tl.zeros((LANES, CHUNK), dtype=tl.float64)
            acc_y = tl.zeros((1, CHUNK), dtype=tl.float64)
            acc_p = tl.zeros((1, CHUNK), dtype=tl.float64)
            for t0 in range(0, length, CHUNK):
                t = t0 + tl.arange(0, CHUNK)[None, :]
                t_ok = t < length
                u = (tl.where(rows, line, t) + R - 1) * Wp + tl.where(rows, t, line) + R - 1
                y0 = tl.load(y_base + u, mask=t_ok, other=0.0)
                p0 = tl.load(p_base + u, mask=t_ok, other=0.0)
                acc_y += y0
                acc_p += p0
                p1 = tl.load(p_base + u + shift, mask=t_ok, other=0.0)
                acc_yy += y0 * tl.load(y_base + u + shift, mask=t_ok, other=0.0)
                acc_yp += y0 * p1
                acc_pp += p0 * p1
            sum_yy += tl.sum(acc_yy, axis=1)
            sum_yp += tl.sum(acc_yp, axis=1)
            sum_pp += tl.sum(acc_pp, axis=1)
            sum_y += tl.sum(tl.sum(acc_y, axis=1), axis=0)
            sum_p += tl.sum(tl.sum(acc_p, axis=1), axis=0)
            record = (plane * 4 + side) * (R - 1) + k
            out = border_ptr + record * (3 * E) + e
            tl.store(out, sum_yy, mask=e_ok)
            tl.store(out + E, sum_yp, mask=e_ok)
            tl.store(out + 2 * E, sum_pp, mask=e_ok)
            if tl.program_id(2) == 0:
                tl.store(lin_ptr + record * 2, sum_y)
                tl.store(lin_ptr + record * 2 + 1, sum_p)

    @triton.jit
    def _window_products_kernel(
        maps_ptr,  # [P, 2, stride] float64 B0's centred, padded y' and p' (P = N * C planes)
        keep_ptr,  # [N, M] float32 0/1: region vector enters the statistics (when HAS_KEEP)
        count_ptr,  # [P, T] float64 out: region vectors per tile
        sum_ptr,  # [P, T, 2d] float64 out: each tile's sum of centred vectors
        gram_ptr,  # [P, T, 2d, 2d] float64 out: each tile's sums of their products
        C, H_low, W_low, stride, H_v, W_v, M, tile_positions, T,
        R: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BD: tl.constexpr,
        BLOCK_M: tl.constexpr, HAS_KEEP: tl.constexpr, CORNERS: tl.constexpr,
    ):
        """Sums of the centred region vectors and of their products (float64,
        exact products; tl.dot runs on the float64 tensor cores) over M origins:
        the grid's (m = row * W_v + col, weighted by `keep`), or with CORNERS the
        4 (R - 1)^2 off the grid beside its corners, diagonally (`_corner_origins`).
        Each program owns a BD x BD block of the joint matrix."""
        plane = tl.program_id(0).to(tl.int64)
        tile = tl.program_id(1)
        pair = tl.program_id(2)
        NB: tl.constexpr = 2 * D_PAD // BD
        bi = pair // NB
        bj = pair % NB
        Jr = bi * BD + tl.arange(0, BD)
        Jc = bj * BD + tl.arange(0, BD)
        Wp = W_low + 2 * (R - 1)
        lo = tile * tile_positions
        hi = tl.minimum(lo + tile_positions, M)

        count = tl.zeros((BLOCK_M,), dtype=tl.float64)
        total = tl.zeros((BD,), dtype=tl.float64)
        gram = tl.zeros((BD, BD), dtype=tl.float64)
        for start in range(lo, hi, BLOCK_M):
            m = start + tl.arange(0, BLOCK_M)
            m_ok = m < hi
            if CORNERS:
                mi, mj = _corner_origins(m, H_v, W_v, R)
            else:
                mi = m // W_v
                mj = m % W_v
            vr = _joint_gather(maps_ptr, plane, mi, mj, m_ok, Jr, stride, Wp, R, D, D_PAD)
            if HAS_KEEP:
                keep = tl.load(keep_ptr + (plane // C) * M + m, mask=m_ok, other=0.0).to(tl.float64)
                vr = vr * keep[:, None]
                count += keep
            else:
                count += m_ok.to(tl.float64)
            if NB == 1:  # one block holds the whole joint vector: rows and columns coincide
                vc = vr
            else:
                vc = _joint_gather(maps_ptr, plane, mi, mj, m_ok, Jc, stride, Wp, R, D, D_PAD)
            gram += tl.dot(tl.trans(vr), vc)
            total += tl.sum(vr, axis=0)

        out = plane * T + tile
        comp_r = Jr % D_PAD
        comp_c = Jc % D_PAD
        jr = (Jr // D_PAD) * D + comp_r  # position in the unpadded joint vector
        jc = (Jc // D_PAD) * D + comp_c
        ok_r = comp_r < D
        ok_c = comp_c < D
        tl.store(gram_ptr + out * (4 * D * D) + jr[:, None] * (2 * D) + jc[None, :], gram,
                 mask=ok_r[:, None] & ok_c[None, :])
        first_col = (Jc * 0 + bj) == 0  # [BD]: this program owns the first column block
        tl.store(sum_ptr + out * (2 * D) + jr, total, mask=ok_r & first_col)
        lane = tl.arange(0, BLOCK_M)
        tl.store(count_ptr + out + lane * 0, tl.sum(count, axis=0) + lane * 0.0,
                 mask=(lane == 0) & ((lane * 0 + pair) == 0))

    @triton.jit
    def _reciprocal(x):
        """1 / x for a float64 x >= 1, within an ulp, with no division: a float64 division
        is a call on a GPU, and at R = 10 its call spilled registers to local memory (ptxas,
        sm_80). The float32 estimate (within 2**-21) squares its error in each Newton step."""
        r = tl.fdiv(1.0, x.to(tl.float32), ieee_rounding=False).to(tl.float64)
        r = r * (2.0 - x * r)
        return r * (2.0 - x * r)

    @triton.jit
    def _unseen_lines(ptr, record, comp, idx, mask, WIDTH, R: tl.constexpr):
        """B1b's sums along the lines the component at window offset comp never sees from
        the grid: the top comp // R rows, the bottom R - 1 - comp // R, the left comp % R
        columns and the right R - 1 - comp % R; entry idx of records WIDTH long, records
        (side, k - 1) from `record` on. Broadcasts comp, idx and mask."""
        a = comp // R
        b = comp % R
        return (_lines(ptr, record, 0, a, idx, mask, WIDTH, R) + _lines(ptr, record, 1, R - 1 - a, idx, mask, WIDTH, R)
                + _lines(ptr, record, 2, b, idx, mask, WIDTH, R) + _lines(ptr, record, 3, R - 1 - b, idx, mask, WIDTH, R))

    @triton.jit
    def _lines(ptr, record, side, k, idx, mask, WIDTH, R: tl.constexpr):
        """B1b's sum along side `side`'s k outermost lines (0 where k = 0)."""
        at = (record + side * (R - 1) + tl.maximum(k - 1, 0)) * WIDTH + idx
        return tl.load(ptr + at, mask=mask & (k > 0), other=0.0)

    @triton.jit
    def _merge_moments_kernel(
        prod_ptr,  # [P, T, 3, (2R-1)^2] float64 B1's tile sums of the yy, yp, pp shifted products (SHIFTED)
        sums_ptr,  # [P, T, 2] float64 B1's tile sums of the centred y' and p' (SHIFTED)
        border_ptr,  # [P, 4, R-1, 3, (2R-1)^2] float64 B1b's sums along the sides' lines (SHIFTED, R > 1)
        lin_ptr,  # [P, 4, R-1, 2] float64 B1b's sums of y' and p' along them (SHIFTED, R > 1)
        count_ptr,  # [P, T2] float64 B2's tile weights (read unless SHIFTED)
        total_ptr,  # [P, T2, 2D] float64 B2's tile sums of the centred vectors (read when HAS_B2)
        gram_ptr,  # [P, T2, 2D, 2D] float64 B2's tile sums of their products (read when HAS_B2)
        centre_ptr,  # [P, 2] float32 the centres of the y' and p' maps
        sy_ptr, sp_ptr, syp_ptr,  # [P, D, D] float64 out: the centred sums Sy, Sp, Syp
        joint_ptr,  # [P, 2D, 2D] float64 out: [[Sp + aI, Syp^T], [Syp, Sy + aI]], what the algebra factorises
        mean_ptr,  # [P, 2D] float64 out: the region vectors' mean
        T, T2, m,
        R: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr, J_PAD: tl.constexpr,
        SHIFTED: tl.constexpr, HAS_B2: tl.constexpr, RIDGE_A: tl.constexpr,
    ):
        """B3: the tile sums of B1, B1b and B2 merged into the joint [y; p] covariance
        blocks, rows ROWS of one plane per program, in float64. SHIFTED: entry (j, j') of
        the joint sums is the shifted-product sum of its pair of maps for
        e = offset(j') - offset(j) over the whole map (B1), less the map's lines that
        component j does not see from the grid (B1b: the origins of the rows of origins
        above and below the grid and of the columns beside it), plus the origins in both,
        beside the grid's corners (B2, HAS_B2): the m origins of the grid. Else B2's sums
        over the grid's weighted vectors. Centred on the mean: S = sum - count mean mean^T
        (each plane's sums, as Chan's merge). The p rows' y columns (Syp^T) are not
        computed: Syp's entries are written there too, transposed, in the matrix the
        algebra factorises (p first, the ridge a = RIDGE_A, a float64 constant, on its
        diagonal: exactly what the algebra would build from Sy, Sp, Syp)."""
        E: tl.constexpr = (2 * R - 1) * (2 * R - 1)
        plane = tl.program_id(0).to(tl.int64)
        i = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
        j = tl.arange(0, J_PAD)
        i_ok = i < 2 * D
        j_ok = j < 2 * D
        row_y = (i < D)[:, None]
        col_y = (j < D)[None, :]
        # the entries kept: Sy, Syp and Sp (the p-rows' y-columns are Syp^T, not needed)
        ok = i_ok[:, None] & j_ok[None, :] & (row_y | (~col_y))
        count = tl.zeros((), dtype=tl.float64)
        if SHIFTED:
            count += m
        else:
            for t in range(T2):
                count += tl.load(count_ptr + plane * T2 + t)
        inv_count = _reciprocal(tl.maximum(count, 1.0))
        tot_i = tl.zeros((ROWS,), dtype=tl.float64)
        tot_j = tl.zeros((J_PAD,), dtype=tl.float64)
        joint = tl.zeros((ROWS, J_PAD), dtype=tl.float64)
        if SHIFTED:
            # the pair of maps (yy, yp or pp) and the stencil offset of each entry
            a = tl.where(row_y, i[:, None], i[:, None] - D)
            b = tl.where(col_y, j[None, :], j[None, :] - D)
            tap = (b // R - a // R + R - 1) * (2 * R - 1) + (b % R - a % R + R - 1)
            at = tl.where(row_y, tl.where(col_y, 0, 1), 2) * E + tap
            for t in range(T):
                tile = plane * T + t
                s_y = tl.load(sums_ptr + tile * 2)
                s_p = tl.load(sums_ptr + tile * 2 + 1)
                tot_i += tl.where(i < D, s_y, s_p)
                tot_j += tl.where(j < D, s_y, s_p)
                joint += tl.load(prod_ptr + tile * (3 * E) + at, mask=ok, other=0.0)
            if R > 1:
                record = plane * 4 * (R - 1)
                joint -= _unseen_lines(border_ptr, record, a, at, ok, 3 * E, R)
                comp_i = tl.where(i < D, i, i - D)
                comp_j = tl.where(j < D, j, j - D)
                tot_i -= _unseen_lines(lin_ptr, record, comp_i, (i >= D).to(tl.int32), i_ok, 2, R)
                tot_j -= _unseen_lines(lin_ptr, record, comp_j, (j >= D).to(tl.int32), j_ok, 2, R)
        if HAS_B2:
            for t in range(T2):
                tile = plane * T2 + t
                vec = total_ptr + tile * (2 * D)
                tot_i += tl.load(vec + i, mask=i_ok, other=0.0)
                tot_j += tl.load(vec + j, mask=j_ok, other=0.0)
                joint += tl.load(gram_ptr + tile * (4 * D * D) + i[:, None] * (2 * D) + j[None, :], mask=ok,
                                 other=0.0)
        mean_i = tot_i * inv_count
        mean_j = tot_j * inv_count
        cov = joint - count * mean_i[:, None] * mean_j[None, :]
        block = plane * (D * D)
        ii = tl.where(row_y, i[:, None], i[:, None] - D)
        jj = tl.where(col_y, j[None, :], j[None, :] - D)
        tl.store(sy_ptr + block + ii * D + jj, cov, mask=ok & row_y & col_y)
        tl.store(sp_ptr + block + ii * D + jj, cov, mask=ok & (~row_y))
        tl.store(syp_ptr + block + ii * D + jj, cov, mask=ok & row_y & (~col_y))
        r = tl.where(row_y, D + ii, ii)
        q = tl.where(col_y, D + jj, jj)
        ridge = tl.where(r == q, tl.full((), RIDGE_A, tl.float64), 0.0)
        factored = joint_ptr + plane * (4 * D * D)
        tl.store(factored + r * (2 * D) + q, cov + ridge, mask=ok)
        tl.store(factored + q * (2 * D) + r, cov, mask=ok & row_y & (~col_y))
        centre = tl.where(j < D, tl.load(centre_ptr + plane * 2), tl.load(centre_ptr + plane * 2 + 1))
        first_rows = (j * 0 + tl.program_id(1)) == 0  # [J_PAD]: the program that writes the mean
        tl.store(mean_ptr + plane * (2 * D) + j, mean_j + centre.to(tl.float64), mask=j_ok & first_rows)

# ----------------------------------------------------------------------------
# backward kernels
# ----------------------------------------------------------------------------

    @triton.jit
    def _grad_constants_kernel(
        g_sp_ptr,  # [P, D, D] float64 dL/dSp (read when HAS_SP)
        g_syp_ptr,  # [P, D, D] float64 dL/dSyp (read when HAS_SYP)
        mean_ptr,  # [P, 2D] float64 the region vectors' mean
        g_ptr,  # [P, D, 2D] float64 out: G = [Gyp^T, Gp + Gp^T]
        shift_ptr,  # [P, D] float64 out: G (vbar - centres)
        taps_ptr,  # [P, 2, (2R-1)^2] float64 out: G's entries summed by offset difference, y then p
        level_ptr,  # [P, 3] float64 out: the centres of y' and p', sum_k shift_k
        R: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, E_PAD: tl.constexpr,
        HAS_SP: tl.constexpr, HAS_SYP: tl.constexpr,
    ):
        """C0: what kernel C needs of one plane, from dL/dSp and dL/dSyp, in float64.
        The maps are centred on their mean entries' average, so G (v_m - vbar) =
        G (v_m - centres) - shift; over the interior dL/dp'_q = sum_e taps_e .
        (x_{q+e} - centres) - level, taps_e the sum of G's entries whose offsets
        differ by e, level = sum_k shift_k. Row k of G is Gyp[:, k] (y part) and
        Gp[k, :] + Gp[:, k] (p part)."""
        WIDTH: tl.constexpr = 2 * R - 1
        E: tl.constexpr = WIDTH * WIDTH
        plane = tl.program_id(0).to(tl.int64)
        block = plane * (D * D)
        kk = tl.arange(0, D_PAD)
        k_ok = kk < D
        mean_y = tl.load(mean_ptr + plane * (2 * D) + kk, mask=k_ok, other=0.0)
        mean_p = tl.load(mean_ptr + plane * (2 * D) + D + kk, mask=k_ok, other=0.0)
        centre_y = tl.sum(mean_y, axis=0) * (1.0 / D)  # a product: a float64 division is a call
        centre_p = tl.sum(mean_p, axis=0) * (1.0 / D)
        dev_y = tl.where(k_ok, mean_y - centre_y, 0.0)
        dev_p = tl.where(k_ok, mean_p - centre_p, 0.0)
        e = tl.arange(0, E_PAD)
        da = e // WIDTH - (R - 1)  # the offset difference (a' - a, b' - b) of tap e
        db = e % WIDTH - (R - 1)
        taps_y = tl.zeros((E_PAD,), dtype=tl.float64)
        taps_p = tl.zeros((E_PAD,), dtype=tl.float64)
        level = tl.zeros((), dtype=tl.float64)
        for k in range(D):
            g_y = tl.zeros((D_PAD,), dtype=tl.float64)
            g_p = tl.zeros((D_PAD,), dtype=tl.float64)
            a2 = k // R + da
            b2 = k % R + db
            on = (e < E) & (a2 >= 0) & (a2 < R) & (b2 >= 0) & (b2 < R)
            k2 = a2 * R + b2  # the entry k' whose offset is offset(k) + (da, db)
            if HAS_SYP:
                g_y = tl.load(g_syp_ptr + block + kk * D + k, mask=k_ok, other=0.0)
                taps_y += tl.load(g_syp_ptr + block + k2 * D + k, mask=on, other=0.0)
            if HAS_SP:
                g_p = (tl.load(g_sp_ptr + block + k * D + kk, mask=k_ok, other=0.0)
                       + tl.load(g_sp_ptr + block + kk * D + k, mask=k_ok, other=0.0))
                taps_p += (tl.load(g_sp_ptr + block + k * D + k2, mask=on, other=0.0)
                           + tl.load(g_sp_ptr + block + k2 * D + k, mask=on, other=0.0))
            row = g_ptr + (plane * D + k) * (2 * D)
            tl.store(row + kk, g_y, mask=k_ok)
            tl.store(row + D + kk, g_p, mask=k_ok)
            shift = tl.sum(g_y * dev_y + g_p * dev_p, axis=0)
            tl.store(shift_ptr + plane * D + k, shift)
            level += shift
        tl.store(taps_ptr + plane * (2 * E) + e, taps_y, mask=e < E)
        tl.store(taps_ptr + plane * (2 * E) + E + e, taps_p, mask=e < E)
        tl.store(level_ptr + plane * 3, centre_y)
        tl.store(level_ptr + plane * 3 + 1, centre_p)
        tl.store(level_ptr + plane * 3 + 2, level)

    @triton.jit
    def _interior_grad(y_ptr, p_ptr, taps_ptr, level_ptr, out_ptr, plane, tile, H_low, W_low, H_in, W_in, tiles_w,
                       R: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
        """dL/dp' of one TILE_H x TILE_W tile of the interior, where every window
        holding a cell is on the grid: a fixed (2R-1) x (2R-1) stencil over the
        y' and p' maps (centred on one value each), 2 (2R-1)^2 loads a cell."""
        WIDTH: tl.constexpr = 2 * R - 1
        qi = (R - 1) + (tile // tiles_w) * TILE_H + tl.arange(0, TILE_H)
        qj = (R - 1) + (tile % tiles_w) * TILE_W + tl.arange(0, TILE_W)
        ok = (qi < R - 1 + H_in)[:, None] & (qj < R - 1 + W_in)[None, :]
        cells = plane * H_low * W_low + qi[:, None] * W_low + qj[None, :]
        taps = taps_ptr + plane * (2 * WIDTH * WIDTH)
        centre_y = tl.load(level_ptr + plane * 3)
        centre_p = tl.load(level_ptr + plane * 3 + 1)
        acc = tl.zeros((TILE_H, TILE_W), dtype=tl.float64)
        for a in range(WIDTH):
            row = cells + (a - (R - 1)) * W_low - (R - 1)
            for b in range(WIDTH):
                vy = tl.load(y_ptr + row + b, mask=ok, other=0.0)
                vp = tl.load(p_ptr + row + b, mask=ok, other=0.0)
                acc += (tl.load(taps + a * WIDTH + b) * (vy - centre_y)
                        + tl.load(taps + WIDTH * WIDTH + a * WIDTH + b) * (vp - centre_p))
        acc -= tl.load(level_ptr + plane * 3 + 2)
        tl.store(out_ptr + cells, acc.to(tl.float32), mask=ok)

    @triton.jit
    def _frame_grad(y_ptr, p_ptr, keep_ptr, g_ptr, shift_ptr, level_ptr, out_ptr, plane, block,
                    C, H_low, W_low, H_v, W_v, M, H_in, W_in,
                    R: tl.constexpr, D_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, HAS_KEEP: tl.constexpr):
        """dL/dp' of BLOCK_Q cells of the frame around the interior (every cell
        when H_in = W_in = 0), window by window: the sum over the offsets k whose
        window origin m = q - offset(k) is on the grid (and kept) of
        [G (v_m - vbar)]_k = [G (v_m - centres)]_k - shift_k. All k at once in a
        [D_PAD, BLOCK_Q] block (cells along the fast axis: loads coalesce and
        the sum over k stays in each thread), one window entry j at a time."""
        D: tl.constexpr = R * R
        f = block * BLOCK_Q + tl.arange(0, BLOCK_Q)
        q_ok = f < H_low * W_low - H_in * W_in
        qi, qj = _frame_cells(f, H_low, W_low, H_in, W_in, R)
        k = tl.arange(0, D_PAD)
        mi = qi[None, :] - (k // R)[:, None]
        mj = qj[None, :] - (k % R)[:, None]
        m_ok = (k < D)[:, None] & q_ok[None, :] & (mi >= 0) & (mi < H_v) & (mj >= 0) & (mj < W_v)
        centre_y = tl.load(level_ptr + plane * 3)
        centre_p = tl.load(level_ptr + plane * 3 + 1)
        plane_base = plane * H_low * W_low
        g_rows = g_ptr + (plane * D + k) * (2 * D)  # [D_PAD] row k of G
        acc = tl.zeros((D_PAD, BLOCK_Q), dtype=tl.float64) - tl.load(shift_ptr + plane * D + k, mask=k < D,
                                                                      other=0.0)[:, None]
        for a in range(R):
            origin = plane_base + (mi + a) * W_low + mj
            for b in range(R):
                vy = tl.load(y_ptr + origin + b, mask=m_ok, other=0.0)
                vp = tl.load(p_ptr + origin + b, mask=m_ok, other=0.0)
                g_y = tl.load(g_rows + a * R + b, mask=k < D, other=0.0)
                g_p = tl.load(g_rows + D + a * R + b, mask=k < D, other=0.0)
                acc += g_y[:, None] * (vy - centre_y) + g_p[:, None] * (vp - centre_p)
        if HAS_KEEP:
            acc = acc * tl.load(keep_ptr + (plane // C) * M + mi * W_v + mj, mask=m_ok, other=0.0)
        grad = tl.sum(tl.where(m_ok, acc, 0.0), axis=0)
        tl.store(out_ptr + plane_base + qi * W_low + qj, grad.to(tl.float32), mask=q_ok)

    @triton.jit
    def _region_grad_kernel(
        y_ptr,  # [P, H', W'] float32 or float64 pooled labels y'
        p_ptr,  # [P, H', W'] float64 pooled probabilities p'
        keep_ptr,  # [N, M] float32 0/1 kept region vectors (when HAS_KEEP)
        g_ptr,  # [P, d, 2d] float64 G = [Gyp^T, Gp + Gp^T] acting on the centred joint vector
        shift_ptr,  # [P, d] float64 G (vbar - centres): what centring on the maps' centres adds
        taps_ptr,  # [P, 2, (2R-1)^2] float64 G's entries summed by offset difference, y map then p map
        level_ptr,  # [P, 3] float64 the y and p maps' centres and sum_k [G (vbar - centres)]_k
        out_ptr,  # [P, H', W'] float32 out: dL/dp'
        C, H_low, W_low, H_v, W_v, M, H_in, W_in, tiles_w, n_tiles,
        R: tl.constexpr, D_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, TILE_H: tl.constexpr,
        TILE_W: tl.constexpr, HAS_KEEP: tl.constexpr,
    ):
        """A plane's programs on the grid's first axis, the planes on its second (with
        exclude_ignored a plane's frame blocks passed the 65535 programs CUDA allows on a
        second axis: 131072 for a 1024 x 2048 map at R = 10; one flat axis, divided back into
        the two, took 12 registers more on sm_80): programs [0, n_tiles) take the interior's
        tiles, the rest the frame's cells (see `_interior_grad` and `_frame_grad`)."""
        pid = tl.program_id(0)
        plane = tl.program_id(1).to(tl.int64)
        if pid < n_tiles:
            _interior_grad(y_ptr, p_ptr, taps_ptr, level_ptr, out_ptr, plane, pid, H_low, W_low, H_in, W_in,
                           tiles_w,
                           R, TILE_H, TILE_W)
        else:
            _frame_grad(y_ptr, p_ptr, keep_ptr, g_ptr, shift_ptr, level_ptr, out_ptr, plane, pid - n_tiles,
                        C, H_low, W_low, H_v, W_v, M, H_in, W_in, R, D_PAD, BLOCK_Q, HAS_KEEP)

    @triton.jit
    def _unpooled_grad(g_low_ptr, arg_ptr, low, pooled, rmi_ok, k, S: tl.constexpr, POOL: tl.constexpr):
        """dL/dp at full resolution [SP, BLOCK * SP] from dL/dp' of the window columns'
        cells [BLOCK * SP] (zero at ignored pixels and outside the pooled map)."""
        g = tl.load(g_low_ptr + low, mask=pooled, other=0.0)
        if POOL == 2:
            arg = tl.load(arg_ptr + low, mask=pooled, other=0).to(tl.int32) & (TIE_BIT - 1)
            routed = tl.where(k == arg[None, :], g[None, :], 0.0)
        else:  # avg spreads over the s * s window; none: s = 1
            routed = g[None, :] * (1.0 / (S * S))
        return tl.where(rmi_ok, routed, 0.0)

    @triton.jit
    def _pool_backward_kernel(
        x_ptr,  # [N, C, H, W] logits, strides sx_*
        lab_ptr,  # [N, H, W] labels, contiguous
        w_ptr,  # [C] float32 class weights (read when HAS_WEIGHTS)
        g_low_ptr,  # [N, C, H', W'] float32 dL/dp' (read when HAS_RMI)
        arg_ptr,  # [N, C, H', W'] uint8 window index of the max (read when POOL == max)
        g_pixel_ptr,  # [] float64 dL/d(pixel term) (read when PIXEL != 0)
        denom_ptr,  # [] float64 the pixel term's denominator (read when PIXEL != 0)
        gx_ptr,  # [N, C, H, W] out: dL/dlogits in the logits' dtype, strides sg_*
        C, H, W, H_low, W_low, W_cells, n_cells,
        sx_n, sx_c, sx_h, sx_w,
        sg_n, sg_c, sg_h, sg_w,
        ignore_index,
        S: tl.constexpr, PAD: tl.constexpr, SP: tl.constexpr, BLOCK: tl.constexpr,
        POOL: tl.constexpr, SOFTMAX: tl.constexpr, PIXEL: tl.constexpr,
        HAS_WEIGHTS: tl.constexpr, HAS_RMI: tl.constexpr, WIDE: tl.constexpr,
    ):
        low, pooled, pix_ok, x_base, x_off, row, col, lab, valid, vf = _block_pixels(
            x_ptr, lab_ptr, C, H, W, H_low, W_low, W_cells, n_cells, sx_n, sx_h, sx_w, ignore_index,
            S, PAD, SP, BLOCK, WIDE)
        g_base = gx_ptr + tl.program_id(1).to(tl.int64) * sg_n  # class 0; classes sg_c apart
        g_off = _offsets(row, col, sg_h, sg_w, WIDE)
        hw_low = H_low * W_low
        k = _window_index(S, SP, BLOCK)
        rmi_ok = pooled[None, :] & valid

        if PIXEL != 0:
            coef = (tl.load(g_pixel_ptr) / tl.load(denom_ptr)).to(tl.float32)
            if PIXEL == 2 and HAS_WEIGHTS:
                coef = coef * tl.load(w_ptr + lab, mask=valid, other=0.0)
        if SOFTMAX or PIXEL == 2:
            log_rest, m, rest, top_small = _log_sum_exp(x_base, x_off, pix_ok, C, sx_c, False)
        if SOFTMAX and HAS_RMI:
            # dL/dx_c = p_c (g_c - sum_k p_k g_k), g = dL/dp. Where the largest logit's class
            # t has p_t > 1/2, g_t - sum_k p_k g_k = (1 - p_t) g_t - sum_{k != t} p_k g_k
            # (`shared`), and the other classes' g_c - g_t + shared: no difference of the near
            # equal g_t and sum_k p_k g_k, which loses everything as p_t -> 1 (the float32
            # softmax rounds to 1 beyond a margin of 17). No such class: g_t = 0.
            g_top = tl.zeros(pix_ok.shape, dtype=tl.float32)
            others = tl.zeros(pix_ok.shape, dtype=tl.float32)
            xs = x_base
            low_c = low
            for c in range(C):  # a named loop variable: Triton carries `_` into the next loop
                x = _load_pixels(xs + x_off, pix_ok).to(tl.float32)
                gp = _unpooled_grad(g_low_ptr, arg_ptr, low_c, pooled, rmi_ok, k, S, POOL)
                top = _top_class(x, m, rest)
                g_top += tl.where(top, gp, 0.0)
                others += tl.where(top, 0.0, gp * tl.exp2(((x - m) - log_rest) * LOG2E))
                xs += sx_c
                low_c += hw_low
            shared = g_top * top_small - others

        for c in range(C):
            x = _load_pixels(x_base + x_off, pix_ok).to(tl.float32)
            grad = tl.zeros(pix_ok.shape, dtype=tl.float32)
            is_c = lab == c
            if SOFTMAX or PIXEL == 2:
                soft = tl.exp2(((x - m) - log_rest) * LOG2E)
                top = _top_class(x, m, rest)
            if SOFTMAX:
                prob = soft
            else:
                prob, q, dprob = _sigmoid_sides(x)
            if HAS_RMI:
                gp = _unpooled_grad(g_low_ptr, arg_ptr, low, pooled, rmi_ok, k, S, POOL)
                if SOFTMAX:
                    grad += prob * tl.where(top, shared, gp - g_top + shared)
                else:
                    grad += gp * dprob
            y = tl.where(is_c, 1.0, 0.0)
            if PIXEL == 1:  # sigmoid(x) - y: -(1 - sigmoid(x)) at the label
                c_coef = coef
                if HAS_WEIGHTS:
                    c_coef = coef * tl.load(w_ptr + c)
                if SOFTMAX:
                    sig, q, dsig = _sigmoid_sides(x)
                else:
                    sig = prob
                grad += c_coef * tl.where(is_c, -q, sig)
            if PIXEL == 2:  # softmax(x) - y: -(1 - softmax) at a label that has the largest logit
                grad += coef * tl.where(is_c & top, -top_small, soft - y)
            grad = grad * vf
            tl.store(g_base + g_off, grad.to(gx_ptr.dtype.element_ty), mask=pix_ok)
            x_base += sx_c
            g_base += sg_c
            low += hw_low

# ----------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------


def _new(shape, dtype, device, fill_nan_value=float("nan")):
    """An output buffer: uninitialised, or pre-filled when FILL_OUTPUTS_WITH_NAN."""
    if FILL_OUTPUTS_WITH_NAN:
        return torch.full(shape, fill_nan_value, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


class _Geometry:
    """How kernels A and D block the full-resolution map for a pooling."""

    def __init__(self, h: int, w: int, pool_code: int, s: int):
        self.pool = pool_code
        self.s = s if pool_code != POOL_NONE else 1
        self.pad = self.s // 2
        self.h_low = (h + 2 * self.pad - self.s) // self.s + 1
        self.w_low = (w + 2 * self.pad - self.s) // self.s + 1
        self.h_cells = (h - 1 + self.pad) // self.s + 1
        self.w_cells = (w - 1 + self.pad) // self.s + 1
        self.n_cells = self.h_cells * self.w_cells
        self.sp = _next_pow2(self.s)  # the window's side in the kernels' blocks
        self.block = min(max(1, FULL_RES_ELEMENTS // (self.sp * self.sp)), _next_pow2(self.n_cells))
        self.n_blocks = _cdiv(self.n_cells, self.block)


def _wide(*images: torch.Tensor) -> bool:
    """Whether kernels A and D need int64 offsets within an image: some [N, C, H, W]
    tensor's (H-1, W-1) pixel, or the [N, H, W] labels' last, lies 2**31 elements or
    more past the image's first."""
    h, w = images[0].shape[-2:]
    extent = max([h * w] + [(h - 1) * t.stride(2) + (w - 1) * t.stride(3) for t in images])
    return extent >= 2**31


def _pool_code(opts: RMIOptions) -> int:
    if not opts.downsamples or opts.pool == "interp":
        return POOL_NONE
    return POOL_AVG if opts.pool == "avg" else POOL_MAX


def _pixel_code(pixel_loss: Optional[str]) -> int:
    return {None: PIXEL_NONE, "bce": PIXEL_BCE, "ce": PIXEL_CE}[pixel_loss]


def _ignore_value(ignore_index: int) -> int:
    """Labels are compared as int32 in the kernels; an ignore_index outside
    that range can match no label that passes the range check."""
    return ignore_index if -2**31 <= ignore_index < 2**31 else -2**31


def _launch_pool_forward(x, labels, weights, opts: RMIOptions, write_y: bool):
    """Kernel A -> (p' [N,C,H',W'] f64, y' (`label_map_dtype`) or None, argmax uint8 or None,
    partials [N, blocks, 3], the valid pixels of each cell counted [N, H', W'] float32 (avg
    pooling and write_y) or None)."""
    n, c, h, w = x.shape
    geo = _Geometry(h, w, _pool_code(opts), opts.pool_size)
    dev = x.device
    p_low = _new((n, c, geo.h_low, geo.w_low), torch.float64, dev)
    y_low = _new((n, c, geo.h_low, geo.w_low), label_map_dtype(opts), dev) if write_y else p_low
    shared = write_y and geo.pool == POOL_AVG
    share = _new((n, geo.h_low, geo.w_low), torch.float32, dev) if shared else p_low
    arg = _new((n, c, geo.h_low, geo.w_low), torch.uint8, dev, 255) if geo.pool == POOL_MAX else \
        torch.empty(1, dtype=torch.uint8, device=dev)
    parts = _new((n, geo.n_blocks, 3), torch.float32, dev)
    _pool_forward(x, labels, weights, opts, geo, (p_low, y_low, arg, parts, share), write_y, None)
    return (p_low, (y_low if write_y else None), (arg if geo.pool == POOL_MAX else None), parts,
            (share if shared else None))


def _launch_narrow(p_low, y_low, share, keep, radius: int, area: int = 1, ties=None):
    """`_narrow_kernel` -> [N, C] int32, 1 where a plane is narrow (`rmi_triton.narrow`), 2 where
    it is not but a cell of it is tied (softmax with max pooling: those cells alone); p_low
    [N, C, H', W'] float64 as the statistics see it, y_low its labels, share: the valid pixels'
    share of each cell times `area` ([N, H', W']: kernel A's counts with avg pooling, area
    s^2; the interpolated valid mask with "interp") or None, keep: [N, H_v W_v] float or None,
    ties: kernel A's arg-max (softmax with max pooling: its TIE_BIT flags a plane too) or None."""
    n, c, h_low, w_low = p_low.shape
    flags = _new((n, c), torch.int32, p_low.device, -1)
    _narrow_kernel[_grid("the narrow-plane kernel", n * c)](
        p_low, y_low, share if share is not None else p_low, keep if keep is not None else p_low,
        ties if ties is not None else p_low, flags,
        c, h_low, w_low, h_low - radius + 1, w_low - radius + 1, NARROW_SPREAD,
        R=radius, BLOCK=min(NARROW_ELEMENTS, _next_pow2(h_low * w_low)), SHARE=share is not None, AREA=area,
        HAS_KEEP=keep is not None, TIES=ties is not None, num_warps=NUM_WARPS["narrow"],
    )
    return flags


def _repool_narrow(x, labels, opts: RMIOptions, p_low, arg, flags):
    """Kernel A's EXACT pass: p_low's planes flagged in `flags` ([N, C] int32) and their
    max-pool arg-max (arg, or None) again, from float64 probabilities (`rmi_triton.narrow`);
    of a plane flagged 2, only its tied cells. Reads nothing on the host: the programs of an
    image without a narrow plane, or of a block without a tied cell, read the flags (and the
    block's arg-max bytes) and return."""
    n, c, h, w = x.shape
    geo = _Geometry(h, w, _pool_code(opts), opts.pool_size)
    arg = arg if arg is not None else torch.empty(1, dtype=torch.uint8, device=x.device)
    _pool_forward(x, labels, None, opts, geo, (p_low, p_low, arg, p_low, p_low), False, flags)


def _pool_forward(x, labels, weights, opts: RMIOptions, geo: "_Geometry", outputs, write_y: bool, flags):
    """Launches kernel A over `outputs` (p_low, y_low, arg, parts, share); flags: None, or the
    narrow planes of its EXACT pass (`_repool_narrow`)."""
    n, c, h, w = x.shape
    p_low, y_low, arg, parts, share = outputs
    exact = flags is not None
    _pool_forward_kernel[_grid("kernel A", geo.n_blocks, n)](
        x, labels, weights if weights is not None else p_low, p_low, y_low, arg, parts, share,
        flags if exact else p_low,
        c, h, w, geo.h_low, geo.w_low, geo.w_cells, geo.n_cells,
        *x.stride(), _ignore_value(opts.ignore_index),
        S=geo.s, PAD=geo.pad, SP=geo.sp, BLOCK=geo.block, POOL=geo.pool,
        SOFTMAX=opts.probs == "softmax", PIXEL=PIXEL_NONE if exact else _pixel_code(opts.pixel_loss),
        HAS_WEIGHTS=weights is not None, WRITE_Y=write_y, CHECK_FINITE=opts.validate and not exact,
        WIDE=_wide(x), EXACT=exact, C_PAD=_next_pow2(c) if exact else 1, num_warps=NUM_WARPS["pool_forward"],
    )


def _moment_layout(d: int, m: int):
    """(D_PAD, BD, NB, BLOCK_M, tile positions, T) of kernel B2 for d-dim regions,
    m positions. BLOCK_M and BD stay >= 16, the smallest tl.dot operand."""
    d_pad = _joint_pad(d)
    block_m = max(16, min(MOMENT_BLOCK_M, _next_pow2(m)))
    bd = min(2 * d_pad, MOMENT_BD)
    nb = 2 * d_pad // bd
    max_tiles = max(1, MOMENT_BUFFER_PER_PLANE // (4 * d * d))
    tiles = max(1, min(_cdiv(m, MOMENT_TILE_POSITIONS), max_tiles))
    per_tile = _cdiv(_cdiv(m, tiles), block_m) * block_m
    tiles = _cdiv(m, per_tile)
    return d_pad, bd, nb, block_m, per_tile, tiles


def _window_products(maps, keep, shape, radius: int, positions: int, corners: bool):
    """Kernel B2 -> each tile's (count [P, T2], sum [P, T2, 2d], products [P, T2, 2d, 2d]),
    float64, of the centred region vectors of the grid (weighted by `keep`) or of the origins
    beside its corners (`corners`), gathered from B0's maps; shape: the pooled maps'
    [N, C, H', W']."""
    n, c, h_low, w_low = shape
    d = radius * radius
    d_pad, bd, nb, block_m, per_tile, tiles = _moment_layout(d, positions)
    planes = n * c
    dev = maps.device
    count = _new((planes, tiles), torch.float64, dev)
    total = _new((planes, tiles, 2 * d), torch.float64, dev)
    gram = _new((planes, tiles, 2 * d, 2 * d), torch.float64, dev)
    _window_products_kernel[_grid("kernel B2", planes, tiles, nb * nb)](
        maps, keep if keep is not None else maps, count, total, gram,
        c, h_low, w_low, maps.shape[-1], h_low - radius + 1, w_low - radius + 1, positions, per_tile, tiles,
        R=radius, D=d, D_PAD=d_pad, BD=bd, BLOCK_M=block_m, HAS_KEEP=keep is not None, CORNERS=corners,
        num_warps=NUM_WARPS["window_products"],
    )
    return count, total, gram


def _border_layout(h_low: int, w_low: int, radius: int):
    """(stencil offsets, line positions) a step of kernel B1b: a line in one step where
    BORDER_ELEMENTS allow, then as many offsets as fit."""
    chunk = max(16, min(BORDER_ELEMENTS // 4, _next_pow2(max(h_low, w_low))))
    return max(1, min(_next_pow2((2 * radius - 1) ** 2), BORDER_ELEMENTS // chunk)), chunk


def _border_sums(maps, shape, radius: int):
    """Kernel B1b -> (shifted-product sums [P, 4, R-1, 3, (2R-1)^2], map sums [P, 4, R-1, 2]),
    float64, along each side's k outermost lines of the map, k = 1 .. R - 1."""
    n, c, h_low, w_low = shape
    planes, width, dev = n * c, 2 * radius - 1, maps.device
    lanes, chunk = _border_layout(h_low, w_low, radius)
    border = _new((planes, 4, radius - 1, 3, width * width), torch.float64, dev)
    lin = _new((planes, 4, radius - 1, 2), torch.float64, dev)
    _border_sums_kernel[_grid("kernel B1b", planes, 4, _cdiv(width * width, lanes))](
        maps, border, lin, h_low, w_low, maps.shape[-1], R=radius, LANES=lanes, CHUNK=chunk,
        num_warps=NUM_WARPS["border_sums"],
    )
    return border, lin


def _product_lanes(radius: int) -> int:
    """Stencil offsets per program of kernel B1 (all (2R-1)^2 of them up to R = 3)."""
    return min(PRODUCT_LANES, _next_pow2((2 * radius - 1) ** 2))


def _product_chunk(radius: int, positions: int) -> int:
    """Positions per step of kernel B1: its float64 accumulators hold lanes x chunk values."""
    return max(16, min(PRODUCT_ELEMENTS // _product_lanes(radius), _next_pow2(positions)))


def _product_layout(h_low: int, w_low: int, radius: int):
    """(positions, lanes, chunk, tile length, tiles, offset groups) of kernel B1: it runs over
    the padded rows from the map's first cell to its last."""
    wp, width = w_low + 2 * radius - 2, 2 * radius - 1
    positions = (h_low - 1) * wp + w_low
    lanes = _product_lanes(radius)
    chunk = _product_chunk(radius, positions)
    tile_len = _cdiv(min(positions, PRODUCT_TILE), chunk) * chunk
    return positions, lanes, chunk, tile_len, _cdiv(positions, tile_len), _cdiv(width * width, lanes)


def _map_stride(h_low: int, w_low: int, radius: int) -> int:
    """Elements of one of B0's maps: the map padded to (H' + 2R - 2) x (W' + 2R - 2), then
    zeros for B1's last step past it."""
    return (h_low + 2 * radius - 2) * (w_low + 2 * radius - 2) + _product_layout(h_low, w_low, radius)[2]


def _centred_maps(y_low, p_low, radius: int):
    """Kernel B0 -> (centred maps [P, 2, stride] float64, centres [P, 2] float32): each map
    padded to (H' + 2R - 2) x (W' + 2R - 2), then zeros for B1's last step past the map."""
    n, c, h_low, w_low = p_low.shape
    planes, dev = n * c, p_low.device
    stride = _map_stride(h_low, w_low, radius)
    maps = _new((planes, 2, stride), torch.float64, dev)
    centres = _new((planes, 2), torch.float32, dev)
    block = min(CENTRE_ELEMENTS, _next_pow2(stride))
    _centred_maps_kernel[_grid("kernel B0", planes, _cdiv(stride, block))](
        y_low, p_low, centres, maps, h_low, w_low, stride, R=radius, BLOCK=block,
        num_warps=NUM_WARPS["centred_maps"],
    )
    return maps, centres


def _launch_region_moments(y_low, p_low, keep, radius: int, map_budget: int):
    """Kernel B -> (mean [N, C, 2d], Sy, Sp, Syp [N, C, d, d], the matrix the algebra factorises
    [N, C, 2d, 2d]), float64, of the region vectors.

    B0 centres the maps in float64 and pads them with zeros; sums of the centred vectors
    and of their products are float64 from there (exact products of float32 values). With
    weights (`keep`) the grid's vectors are gathered (B2). Without, the sums over every
    origin whose window reaches the map (zeros outside it) are shifted-product sums over
    the map, (2R-1)^2 per pair of maps (B1, `_shifted_products_kernel`); the origins off the
    grid -- a frame R - 1 wide -- are taken out as the rows of origins above and below the
    grid and the columns beside it, whose sums are those along the map's outer lines (B1b),
    and the origins beside the corners, in both, are gathered (B2) and put back. B0's maps
    are made for as many images at a time as fit in `map_budget` bytes (at least one), each
    such chunk's sums written before the next chunk's maps; B3 merges them all."""
    n, c, h_low, w_low = p_low.shape
    m = (h_low - radius + 1) * (w_low - radius + 1)
    chunks = [_region_sums(y_low[a:b], p_low[a:b], None if keep is None else keep[a:b], radius)
              for a, b in _image_chunks(n, c, h_low, w_low, radius, map_budget)]
    return _merge_moments(*_cat_planes(chunks), n, c, radius, m)


def _image_chunks(n: int, c: int, h_low: int, w_low: int, radius: int, map_budget: int):
    """[(first image, end)]: runs of images whose B0 maps take at most `map_budget` bytes."""
    per_image = c * 2 * _map_stride(h_low, w_low, radius) * 8
    step = max(1, min(n, map_budget // per_image))
    return [(a, min(a + step, n)) for a in range(0, n, step)]


def _cat_planes(chunks):
    """The chunks' sums (tuples of [planes, ...] tensors, nested, or None) joined along the planes."""
    if len(chunks) == 1:
        return chunks[0]
    first = chunks[0]
    if first is None:
        return None
    if isinstance(first, tuple):
        return tuple(_cat_planes([chunk[i] for chunk in chunks]) for i in range(len(first)))
    return torch.cat(chunks)


def _region_sums(y_low, p_low, keep, radius: int):
    """Kernels B0, B1, B1b and B2 over some images -> (B1's products and sums, B1b's border
    sums, B2's tile sums, B0's centres) for `_merge_moments` (None where a kernel did not run)."""
    n, c, h_low, w_low = p_low.shape
    m = (h_low - radius + 1) * (w_low - radius + 1)
    planes, dev = n * c, p_low.device
    maps, centres = _centred_maps(y_low, p_low, radius)
    products = sums = border = b2 = None
    if keep is not None:
        b2 = _window_products(maps, keep, p_low.shape, radius, m, corners=False)
    else:
        width = 2 * radius - 1
        _, lanes, chunk, tile_len, tiles, groups = _product_layout(h_low, w_low, radius)
        products = _new((planes, tiles, 3, width * width), torch.float64, dev)
        sums = _new((planes, tiles, 2), torch.float64, dev)
        _shifted_products_kernel[_grid("kernel B1", planes, tiles, groups)](
            maps, products, sums, h_low, w_low, maps.shape[-1], tiles, tile_len,
            R=radius, LANES=lanes, CHUNK=chunk, num_warps=NUM_WARPS["shifted_products"],
        )
        if radius > 1:
            border = _border_sums(maps, p_low.shape, radius)
            b2 = _window_products(maps, None, p_low.shape, radius, 4 * (radius - 1) ** 2, corners=True)
    return products, sums, border, b2, centres


def _merge_layout(d: int):
    """(J_PAD, ROWS) of kernel B3: the joint matrix's padded side, its rows a program."""
    j_pad = _next_pow2(2 * d)
    return j_pad, min(j_pad, max(1, MERGE_ELEMENTS // j_pad))


def _merge_moments(products, sums, border, b2, centres, n: int, c: int, radius: int, m: int):
    """Kernel B3 -> (mean [N, C, 2d], Sy, Sp, Syp [N, C, d, d], the matrix the algebra
    factorises [N, C, 2d, 2d]), float64, from B1's, B1b's and B2's sums."""
    d, planes, dev = radius * radius, n * c, centres.device
    shifted = products is not None
    dummy = torch.empty(1, dtype=torch.float64, device=dev)
    count, total, gram = b2 if b2 is not None else (dummy, dummy, dummy)
    lines, lin = border if border is not None else (dummy, dummy)
    sy, sp, syp = (_new((n, c, d, d), torch.float64, dev) for _ in range(3))
    joint = _new((n, c, 2 * d, 2 * d), torch.float64, dev)
    mean = _new((n, c, 2 * d), torch.float64, dev)
    j_pad, rows = _merge_layout(d)
    _merge_moments_kernel[_grid("kernel B3", planes, _cdiv(2 * d, rows))](
        products if shifted else dummy, sums if shifted else dummy, lines, lin, count, total, gram, centres,
        sy, sp, syp, joint, mean, products.shape[1] if shifted else 0, count.shape[1] if b2 is not None else 0,
        m, R=radius, D=d, ROWS=rows, J_PAD=j_pad, SHIFTED=shifted, HAS_B2=b2 is not None, RIDGE_A=RIDGE,
        num_warps=NUM_WARPS["merge_moments"],
    )
    return mean, sy, sp, syp, joint


class _StencilLayout(NamedTuple):
    """How kernel C splits a plane: TILE_H x TILE_W tiles of the interior (the
    h_in x w_in cells from (R-1, R-1) on, whose windows are all on the grid;
    empty when only some region vectors count), then blocks of BLOCK_Q cells of
    the frame around it."""

    h_in: int
    w_in: int
    tile_h: int
    tile_w: int
    tiles_w: int
    n_tiles: int
    block_q: int
    n_frame_blocks: int

    @staticmethod
    def of(h_low: int, w_low: int, radius: int, weighted: bool) -> "_StencilLayout":
        h_in, w_in = h_low - 2 * radius + 2, w_low - 2 * radius + 2
        if weighted or h_in <= 0 or w_in <= 0:
            h_in = w_in = 0
        tile_w = min(STENCIL_TILE_W, _next_pow2(max(w_in, 1)))
        tile_h = min(max(1, STENCIL_TILE // tile_w), _next_pow2(max(h_in, 1)))
        tiles_w = _cdiv(w_in, tile_w)
        n_tiles = _cdiv(h_in, tile_h) * tiles_w
        frame = h_low * w_low - h_in * w_in
        block_q = max(16, min(STENCIL_FRAME_ELEMENTS // _next_pow2(radius * radius), _next_pow2(frame)))
        return _StencilLayout(h_in, w_in, tile_h, tile_w, max(tiles_w, 1), n_tiles, block_q,
                              _cdiv(frame, block_q))


def _contiguous_or_none(t):
    return None if t is None else t.contiguous()


def _launch_region_grad(y_low, p_low, keep, mean, g_sp, g_syp, radius: int):
    """Kernels C0 and C: dL/dp' [N, C, H', W'] f32 from dL/dSp, dL/dSyp [N, C, d, d] (either
    may be None: zero) and the joint mean [N, C, 2d] (float64)."""
    n, c, h_low, w_low = p_low.shape
    d, planes, dev = radius * radius, n * c, p_low.device
    width = 2 * radius - 1
    h_v, w_v = h_low - radius + 1, w_low - radius + 1
    layout = _StencilLayout.of(h_low, w_low, radius, weighted=keep is not None)
    dummy = torch.empty(1, dtype=torch.float64, device=dev)
    g_joint = _new((planes, d, 2 * d), torch.float64, dev)
    shift = _new((planes, d), torch.float64, dev)
    taps = _new((planes, 2, width * width), torch.float64, dev)
    level = _new((planes, 3), torch.float64, dev)
    _grad_constants_kernel[_grid("kernel C0", planes)](
        g_sp if g_sp is not None else dummy, g_syp if g_syp is not None else dummy, mean, g_joint, shift, taps,
        level, R=radius, D=d, D_PAD=_next_pow2(d), E_PAD=_next_pow2(width * width),
        HAS_SP=g_sp is not None, HAS_SYP=g_syp is not None, num_warps=NUM_WARPS["grad_constants"],
    )
    out = _new(p_low.shape, torch.float32, dev)
    _region_grad_kernel[_grid("kernel C", layout.n_tiles + layout.n_frame_blocks, planes)](
        y_low, p_low, keep if keep is not None else p_low, g_joint, shift, taps, level, out,
        c, h_low, w_low, h_v, w_v, h_v * w_v, layout.h_in, layout.w_in, layout.tiles_w, layout.n_tiles,
        R=radius, D_PAD=_next_pow2(d), BLOCK_Q=layout.block_q, TILE_H=layout.tile_h, TILE_W=layout.tile_w,
        HAS_KEEP=keep is not None,
        num_warps=NUM_WARPS["region_grad"],
    )
    return out


def _launch_pool_backward(x, labels, weights, opts: RMIOptions, g_low, arg, g_pixel, denom):
    """Kernel D: dL/dlogits, same dtype and memory layout as the logits; g_pixel: dL/d(pixel
    term) or None, denom: the pixel term's denominator (float64 scalars)."""
    n, c, h, w = x.shape
    geo = _Geometry(h, w, _pool_code(opts), opts.pool_size)
    grad = torch.empty_like(x)
    if FILL_OUTPUTS_WITH_NAN:
        grad.fill_(float("nan"))
    pixel = _pixel_code(opts.pixel_loss) if g_pixel is not None else PIXEL_NONE
    dummy = torch.empty(1, dtype=torch.float32, device=x.device)
    _pool_backward_kernel[_grid("kernel D", geo.n_blocks, n)](
        x, labels, weights if weights is not None else dummy,
        g_low if g_low is not None else dummy, arg if arg is not None else dummy,
        g_pixel if g_pixel is not None else dummy, denom, grad,
        c, h, w, geo.h_low, geo.w_low, geo.w_cells, geo.n_cells,
        *x.stride(), *grad.stride(), _ignore_value(opts.ignore_index),
        S=geo.s, PAD=geo.pad, SP=geo.sp, BLOCK=geo.block, POOL=geo.pool,
        SOFTMAX=opts.probs == "softmax", PIXEL=pixel,
        HAS_WEIGHTS=weights is not None, HAS_RMI=g_low is not None, WIDE=_wide(x, grad),
        num_warps=NUM_WARPS["pool_backward"],
    )
    return grad


# ----------------------------------------------------------------------------
# the two halves as torch.library custom ops, and their autograd formula
# ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _options(radius, pool, pool_size, pixel_loss, probs, ignore_index, exclude_ignored, validate):
    """The engine's options from the op's arguments (frozen: one object per setting, not two
    checked constructions a step)."""
    return RMIOptions(radius=radius, pool=pool, pool_size=pool_size, pixel_loss=pixel_loss or None,
                      probs=probs, ignore_index=ignore_index, exclude_ignored=exclude_ignored,
                      validate=validate, backend="triton")


def _device_guard(device: torch.device):
    """The current CUDA device set to `device` for the block: Triton launches a kernel on the
    current device and its current stream, whatever the tensors' device is (logits on cuda:1
    while cuda:0 was current ran the forward's kernels on GPU 0 with GPU 1's addresses)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _on_logits_device(fn):
    """`fn(logits, ...)` run under `_device_guard(logits.device)`: each of the engine's halves
    that launches kernels (autograd sets the device for a backward, not for a forward)."""
    @functools.wraps(fn)
    def run(logits, *args, **kwargs):
        with _device_guard(logits.device):
            return fn(logits, *args, **kwargs)
    return run


def _low_shape(logits, opts):
    n, c, h, w = logits.shape
    return (n, c, *opts.pooled_size(h, w))


@_on_logits_device
def _statistics_impl(logits: torch.Tensor, labels: torch.Tensor, keep: Optional[torch.Tensor],
                   weights: Optional[torch.Tensor], radius: int, pool: str, pool_size: int,
                   pixel_loss: str, probs: str, ignore_index: int, exclude_ignored: bool,
                   validate: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                            torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                            torch.Tensor, torch.Tensor]:
    """-> pixel term, Sy, Sp, Syp (float64), what backward needs: the pixel term's
    denominator, y', p' [N,C,H',W'], the max-pool arg-max (uint8, empty unless
    pool="max") and the joint mean [N, C, 2d] float64; and the matrix the algebra
    factorises, [[Sp + aI, Syp^T], [Syp, Sy + aI]] [N, C, 2d, 2d] float64."""
    opts = _options(radius, pool, pool_size, pixel_loss, probs, ignore_index, exclude_ignored, validate)
    labels = labels.contiguous()
    interp = opts.pool == "interp" and opts.downsamples
    p_low, y_low, arg, parts, share = _launch_pool_forward(logits, labels, weights, opts, write_y=not interp)
    if interp:
        size = opts.pooled_size(*logits.shape[-2:])
        p_full = p_low
        p_low = torch.nn.functional.interpolate(p_full, size=size, mode="bilinear", align_corners=True)
        valid, safe = label_maps(labels, opts)
        y_low = pooled_labels(valid, safe, logits.shape[1], opts)
        share = pool_map(valid.unsqueeze(1).double(), opts)
    area = opts.pool_size ** 2 if opts.downsamples and opts.pool == "avg" else 1
    flags = _launch_narrow(p_low, y_low, share, keep, radius, area, arg if opts.probs == "softmax" else None)
    _repool_narrow(logits, labels, opts, p_full if interp else p_low, arg, flags)
    if interp:  # every plane's again: choosing the narrow ones would read the flags on the host
        p_low = torch.nn.functional.interpolate(p_full, size=size, mode="bilinear", align_corners=True)
    if validate:
        raise_if_nonfinite(parts[..., 2].sum() == 0)
    totals = parts.sum((0, 1), dtype=torch.float64)
    if opts.pixel_loss == "bce":
        denom = totals[1] + 1
    else:
        denom = torch.where(totals[1] > 0, totals[1], torch.ones_like(totals[1]))
    pixel = totals[0] / denom if opts.pixel_loss is not None else torch.zeros_like(totals[0])
    mean, sy, sp, syp, joint = _launch_region_moments(y_low.contiguous(), p_low.contiguous(), keep, radius,
                                                      max(MAP_BYTES_PER_LOGIT * logits.numel(), MAP_BYTES_FLOOR))
    if arg is None:
        arg = torch.empty(0, dtype=torch.uint8, device=logits.device)
    return pixel, sy, sp, syp, denom, y_low, p_low, arg, mean, joint


# The op torch.compile sees (a schema, a fake implementation, autograd). Eager calls take
# `_EagerStatistics` below to the same functions: the torch.library dispatch cost more host
# time a step than all 92 of the step's small ATen ops at the time (measured on the CPU).
_statistics_op = torch.library.custom_op("rmi_triton::triton_statistics", _statistics_impl, mutates_args=())


@_statistics_op.register_fake
def _statistics_fake(logits, labels, keep, weights, radius, pool, pool_size, pixel_loss, probs,
                     ignore_index, exclude_ignored, validate):
    n, c = logits.shape[:2]
    d = radius * radius
    opts = _options(radius, pool, pool_size, pixel_loss, probs, ignore_index, exclude_ignored, validate)
    low = _low_shape(logits, opts)
    f64 = dict(dtype=torch.float64, device=logits.device)
    arg_shape = low if opts.pool == "max" and opts.downsamples else (0,)
    return (logits.new_empty((), **f64), logits.new_empty((n, c, d, d), **f64),
            logits.new_empty((n, c, d, d), **f64), logits.new_empty((n, c, d, d), **f64),
            logits.new_empty((), **f64), logits.new_empty(low, dtype=label_map_dtype(opts)),
            logits.new_empty(low, **f64), logits.new_empty(arg_shape, dtype=torch.uint8),
            logits.new_empty((n, c, 2 * d), **f64), logits.new_empty((n, c, 2 * d, 2 * d), **f64))


@_on_logits_device
def _region_grad_low(logits, keep, y_low, p_low, mean, g_sp, g_syp, opts: RMIOptions):
    """Kernels C0 and C: dL/dp' from dL/dSp, dL/dSyp (None when neither is given), at
    the logits' resolution for "interp" (the interpolation's adjoint)."""
    if g_sp is None and g_syp is None:
        return None
    g_low = _launch_region_grad(y_low, p_low, keep, mean, _contiguous_or_none(g_sp), _contiguous_or_none(g_syp),
                                opts.radius)
    if opts.pool == "interp" and opts.downsamples:
        g_low = bilinear_backward(g_low, logits.shape[-2:])
    return g_low


@_on_logits_device
def _logits_grad(logits, labels, weights, g_low, arg, denom, g_pixel, opts: RMIOptions):
    """Kernel D: dL/dlogits from dL/dp' (or None) and dL/d(pixel term) (or None)."""
    if opts.pixel_loss is None:
        g_pixel = None
    return _launch_pool_backward(logits, labels.contiguous(), weights, opts, g_low,
                                 arg if arg.numel() else None, g_pixel, denom)


def _statistics_backward_impl(logits: torch.Tensor, labels: torch.Tensor, keep: Optional[torch.Tensor],
                            weights: Optional[torch.Tensor], y_low: torch.Tensor, p_low: torch.Tensor,
                            arg: torch.Tensor, mean: torch.Tensor, denom: torch.Tensor,
                            g_pixel: Optional[torch.Tensor], g_sp: Optional[torch.Tensor],
                            g_syp: Optional[torch.Tensor], radius: int, pool: str, pool_size: int,
                            pixel_loss: str, probs: str, ignore_index: int) -> torch.Tensor:
    """dL/dlogits from dL/d(pixel term) and dL/dSp, dL/dSyp [N, C, d, d]."""
    opts = _options(radius, pool, pool_size, pixel_loss, probs, ignore_index, False, False)
    g_low = _region_grad_low(logits, keep, y_low, p_low, mean, g_sp, g_syp, opts)
    return _logits_grad(logits, labels, weights, g_low, arg, denom, g_pixel, opts)


_statistics_backward_op = torch.library.custom_op("rmi_triton::triton_statistics_backward",
                                                  _statistics_backward_impl, mutates_args=())


@_statistics_backward_op.register_fake
def _statistics_backward_fake(logits, labels, keep, weights, y_low, p_low, arg, mean, denom, g_pixel,
                              g_sp, g_syp, radius, pool, pool_size, pixel_loss, probs, ignore_index):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output, maps_saved=True):
    logits, labels, keep, weights, radius, pool, pool_size, pixel_loss, probs, ignore_index, _, _ = inputs
    _, _, _, _, denom, y_low, p_low, arg, mean, _ = output
    if not maps_saved:  # held by ctx.maps instead (`_EagerStatistics`)
        y_low = p_low = None
    ctx.save_for_backward(logits, labels, keep, weights, y_low, p_low, arg, mean, denom)
    ctx.config = (radius, pool, pool_size, pixel_loss, probs, ignore_index)
    # outputs without a gradient (y', p', the arg-max, ...) pass None to `_backward`, not
    # zero tensors autograd would otherwise fill: two [N, C, H', W'] maps a step (p' float64)
    ctx.set_materialize_grads(False)


_NO_INPUT_GRADS = (None,) * 11  # the gradients of every input but the logits


def _backward(ctx, g_pixel, _g_sy, g_sp, g_syp, *_unused):
    logits, labels, keep, weights, y_low, p_low, arg, mean, denom = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = _statistics_backward_op(logits, labels, keep, weights, y_low, p_low, arg, mean, denom,
                                       g_pixel, g_sp, g_syp, *ctx.config)
    return (grad,) + _NO_INPUT_GRADS


_statistics_op.register_autograd(_backward, setup_context=_setup_context)


def _graph_kept() -> bool:
    """Whether the running backward keeps the graph for another (retain_graph=True);
    True where this PyTorch cannot tell."""
    kept = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if kept is None else bool(kept())


class _EagerStatistics(torch.autograd.Function):
    """`_statistics_op` without the torch.library dispatch, for eager calls. Its backward lets
    y' and p' go as soon as kernel C has read them, before kernel D allocates the gradient:
    at the step's peak only dL/dp' (one [N, C, H', W'] float32 map) is held beside the
    logits and their gradient, where the op holds y' and p' too. Held on ctx, not saved,
    they pass no saved_tensors_hooks (torch.autograd.graph.save_on_cpu leaves them on the
    device)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _statistics_impl(*inputs)
        _setup_context(ctx, inputs, output, maps_saved=False)
        ctx.maps = output[5:7]  # y', p'
        ctx.mark_non_differentiable(output[1], *output[4:])  # Sy: the labels' statistics
        return output

    @staticmethod
    @once  # a second derivative raises instead of coming out partial
    def backward(ctx, g_pixel, _g_sy, g_sp, g_syp, *_unused):
        logits, labels, keep, weights, _, _, arg, mean, denom = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) + _NO_INPUT_GRADS
        opts = _options(*ctx.config, False, False)
        g_low = _region_grad_low(logits, keep, *ctx.maps, mean, g_sp, g_syp, opts)
        if not _graph_kept():
            ctx.maps = None  # the last references to y' and p'
        return (_logits_grad(logits, labels, weights, g_low, arg, denom, g_pixel, opts),) + _NO_INPUT_GRADS


# ----------------------------------------------------------------------------
# the engine's entry point
# ----------------------------------------------------------------------------

def statistics(logits: torch.Tensor, labels: torch.Tensor, opts: RMIOptions) -> Statistics:
    """The pixel term and Sy, Sp, Syp [N, C, d, d] (float64) of the region
    vectors, computed by the Triton kernels; differentiable in the logits."""
    reason = missing()
    if reason is not None:
        raise RuntimeError(f"the Triton engine cannot run here: {reason}; use backend='torch'")
    if not runs_on(logits.device):
        raise RuntimeError(f"the Triton engine runs on CUDA tensors, got logits on {logits.device}: move them "
                           "to the GPU, or use backend='torch' (backend='auto' picks by device)")
    keep = None
    if opts.exclude_ignored:
        ignored = (labels == opts.ignore_index).unsqueeze(1).float()
        keep = kept_regions(ignored, opts).flatten(1).float().contiguous()
    weights = opts.weights_tensor(logits.shape[1], logits.device, dtype=torch.float32)
    op = _statistics_op if torch.compiler.is_compiling() else _EagerStatistics.apply
    pixel, sy, sp, syp, *_, joint = op(
        logits, labels, keep, weights, opts.radius, opts.pool, opts.pool_size, opts.pixel_loss or "",
        opts.probs, opts.ignore_index, opts.exclude_ignored, opts.validate)
    return Statistics(pixel, sy, sp, syp, joint)

"""Static cost of the Triton kernels on a GPU, without a GPU: SASS instructions a cell.

    python bench/kernel_sass.py [--arch 90] [--radius 3]

Compiles each kernel for the paper's default setting at 16 x 21 x 513 x 513
(4 x 4 average pooling: 129 x 129 cells a plane, sigmoid + BCE, float32 logits,
int64 labels) the way the ahead-of-time test does (tests/test_triton_aot.py),
disassembles the cubin with the nvdisasm that ships with Triton, finds each
loop (a backward branch) and counts the instructions of its body. With the
work one trip of the loop does (from the engine's block sizes) that gives warp
instructions per downsampled cell of one (image, class) plane -- the number to
set against the copy-bandwidth floor of the full-resolution passes (16 pixels
a cell: 64 B read by A, 128 B moved by D in float32).

These are counts, not timings: they ignore latency, occupancy and caches, and
assume the loop bodies the compiler emitted (inner loops unrolled) -- the
table says which loop each figure comes from. A GPU run of bench/gpu_check.py
gives the times.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
os.environ.pop("TRITON_INTERPRET", None)

H_LOW = 129  # 513 x 513 pixels, 4 x 4 average pooling (stride 4, padding 2)


def disassemble(spec: dict, arch: int) -> list:
    """The SASS instructions of one specialisation, in order, with the loop labels."""
    import triton
    from triton.backends.compiler import GPUTarget

    import test_triton_aot as aot
    from rmi_triton.engines import triton_engine as te

    compiled = triton.compile(aot._kernel_source(spec), target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=te.NUM_WARPS[spec["kernel"]]))
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        text = subprocess.run([nvdisasm, "-c", path], capture_output=True, text=True, check=True).stdout
    return text.splitlines()


def loops(lines: list) -> list:
    """Bodies of the loops (label .. backward branch), in program order, then the whole
    kernel, as lists of opcodes."""
    ops, labels, bodies = [], {}, []
    for line in lines:
        label = re.match(r"^\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(ops)
            continue
        instruction = re.match(r"^\s*/\*[0-9a-f]+\*/\s+(.*?)\s*;", line)
        if not instruction:
            continue
        ops.append(re.sub(r"^@!?U?P\w+\s+", "", instruction.group(1)).split()[0])
        target = re.search(r"BRA\s+(?:`\()?(\.L_x_\d+)", instruction.group(1))
        if target and labels.get(target.group(1), len(ops)) < len(ops) - 1:  # a branch backwards
            bodies.append(ops[labels[target.group(1)]:])
    return bodies + [ops]  # last: the whole kernel


def summary(body: list) -> str:
    count = lambda *names: sum(op.split(".")[0] in names for op in body)  # noqa: E731
    return (f"{len(body)} instr ({count('LDG')} LDG, {count('FFMA', 'FMUL', 'FADD')} fp32, "
            f"{count('DFMA', 'DMUL', 'DADD')} fp64, {count('HMMA', 'DMMA')} mma, {count('SHFL')} SHFL, "
            f"{count('LDS', 'STS')} shared)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--radius", type=int, default=3)
    args = parser.parse_args()

    from rmi_triton.engines import triton_engine as te

    r, arch = args.radius, args.arch
    d, width = r * r, 2 * r - 1
    cells = H_LOW * H_LOW
    grid = (H_LOW - r + 1) ** 2
    corners = 4 * (r - 1) ** 2  # B2's origins beside the grid's corners
    interior = max(0, H_LOW - 2 * r + 2) ** 2
    geo = te._Geometry(513, 513, te.POOL_AVG, 4)
    layout = te._StencilLayout.of(H_LOW, H_LOW, r, weighted=False)
    warps = te.NUM_WARPS
    _, _, nb, _, _, _ = te._moment_layout(d, corners)
    # what B1 runs over: the map's first cell to its last, in B0's padded rows
    positions, lanes, chunk, _, _, groups = te._product_layout(H_LOW, H_LOW, r)
    padded = (H_LOW + 2 * r - 2) ** 2 + chunk  # B0's padded map and B1's guard
    line_lanes, line_chunk = te._border_layout(H_LOW, H_LOW, r)  # B1b's offsets and positions a step
    line_trips = 4 * -(-width * width // line_lanes) * (r - 1) * -(-H_LOW // line_chunk)  # of its loop, a plane
    b0_block = min(te.CENTRE_ELEMENTS, te._next_pow2(padded))
    full_res = dict(pool="avg", s=4, softmax=False, pixel=1, logits="fp32", labels="i64")

    # (kernel, spec, which loop, warp instructions a cell from that loop's body length n, what one trip does)
    plan = [
        ("A pool_forward", dict(kernel="pool_forward", **full_res), 0,
         lambda n: n * warps["pool_forward"] / geo.block, f"one class, {geo.block} cells"),
        ("B0 centred_maps", dict(kernel="centred_maps", radius=r), None,
         lambda n: n * warps["centred_maps"] / b0_block * padded / cells,
         f"the whole kernel, {b0_block} positions of the padded maps ({padded} a plane)"),
        ("B1 shifted_products", dict(kernel="shifted_products", radius=r), 0,
         lambda n: n * warps["shifted_products"] * groups / chunk * positions / cells,
         f"{lanes} stencil offsets, {chunk} positions ({positions} a plane, {groups} group(s) of offsets)"),
        ("B1b border_sums", dict(kernel="border_sums", radius=r), 0,
         lambda n: n * warps["border_sums"] * line_trips / cells,
         f"{line_lanes} stencil offsets, {line_chunk} positions of a line ({line_trips} trips a plane)"),
        ("B2 window_products (corners)", dict(kernel="window_products", radius=r), None,
         lambda n: n * warps["window_products"] * nb * nb / cells,
         f"the whole kernel, the {corners} origins beside the grid's corners ({nb * nb} program(s) a plane)"),
        ("C region_grad (interior)", dict(kernel="region_grad", radius=r), 0,
         lambda n: n * warps["region_grad"] * width / (layout.tile_h * layout.tile_w) * interior / cells,
         f"one stencil row, {layout.tile_h}x{layout.tile_w} cells ({interior} interior cells)"),
        ("C region_grad (frame)", dict(kernel="region_grad", radius=r), "rest",
         lambda n: n * warps["region_grad"] / layout.block_q * (cells - interior) / cells,
         f"the kernel but the interior's loop (a loop left rolled counted once), {layout.block_q} frame "
         f"cells ({cells - interior} of them)"),
        ("D pool_backward", dict(kernel="pool_backward", **full_res), 0,
         lambda n: n * warps["pool_backward"] / geo.block, f"one class, {geo.block} cells"),
    ]
    print(f"sm_{arch}, R = {r}, {H_LOW} x {H_LOW} cells a plane (16 x 21 x 513 x 513, avg 4): "
          f"warp instructions a cell, from each loop's SASS body")
    total = 0.0
    cache = {}
    for name, spec, which, per_cell, trip in plan:
        spec = dict(spec, arch=arch, warp=32)
        key = tuple(sorted(spec.items()))
        if key not in cache:
            cache[key] = loops(disassemble(spec, arch))
        *loop_bodies, whole = cache[key]
        if which is None:  # no loop: the kernel's instructions up to its first exit
            body, unit = whole[:whole.index("EXIT") + 1] if "EXIT" in whole else whole, "per program"
        elif which == "rest":  # every instruction outside loop 0, once
            start = next(i for i in range(len(whole)) if whole[i:i + len(loop_bodies[0])] == loop_bodies[0])
            body, unit = whole[:start] + whole[start + len(loop_bodies[0]):], "per program"
        elif which < len(loop_bodies):
            body, unit = loop_bodies[which], f"loop {which}: per trip"
        else:
            print(f"  {name:32s} loop {which} not found ({len(loop_bodies)} loops)")
            continue
        cost = per_cell(len(body))
        total += cost
        print(f"  {name:32s} {cost:7.1f}   {summary(body)} {unit}: {trip}")
    print(f"  {'total':32s} {total:7.1f}")


if __name__ == "__main__":
    main()

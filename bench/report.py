"""Turn a pytest-benchmark JSON file into the markdown tables of bench/RESULTS.md.

    python bench/report.py .benchmarks/cpu.json
"""

import json
import sys
from collections import defaultdict


def main(path):
    data = json.load(open(path))
    times = defaultdict(dict)  # (shape, mode) -> provider -> median ms
    memory = defaultdict(dict)  # shape -> provider -> (extra MB, logits MB)
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        if info["mode"] == "memory":
            memory[info["shape"]][info["provider"]] = (info["extra_peak_mb"], info["logits_mb"])
        else:
            times[(info["shape"], info["mode"])][info["provider"]] = bench["stats"]["median"] * 1e3
    machine = data.get("machine_info", {})
    commit = data.get("commit_info", {}).get("id", "?")[:10]
    print(f"Machine: {machine.get('cpu', {}).get('brand_raw', machine.get('processor', '?'))}, "
          f"{machine.get('cpu', {}).get('count', '?')} cores; torch threads "
          f"{next(iter(data['benchmarks']))['extra_info'].get('threads', '?')}; commit {commit}; "
          f"date {data.get('datetime', '?')[:10]}\n")
    providers = ["cross_entropy", "bce_with_logits", "published", "torch", "triton"]
    print("| shape | mode | " + " | ".join(p for p in providers if _any(times, p)) + " | torch / CE | published / torch |")
    print("|---|---|" + "---|" * (sum(_any(times, p) for p in providers) + 2))
    for (shape, mode), row in sorted(times.items()):
        cells = [f"{row[p]:.1f} ms" if p in row else "-" for p in providers if _any(times, p)]
        ratio = f"{row['torch'] / row['cross_entropy']:.2f}x" if {"torch", "cross_entropy"} <= row.keys() else "-"
        speedup = f"{row['published'] / row['torch']:.1f}x" if {"torch", "published"} <= row.keys() else "-"
        print(f"| {shape} | {mode} | " + " | ".join(cells) + f" | {ratio} | {speedup} |")
    if memory:
        print("\n| shape | logits | " + " | ".join(f"{p} extra peak" for p in providers if _anym(memory, p))
              + " | torch - CE |")
        print("|---|---|" + "---|" * (sum(_anym(memory, p) for p in providers) + 1))
        for shape, row in sorted(memory.items()):
            logits_mb = next(iter(row.values()))[1]
            cells = [f"{row[p][0]:.0f} MB" if p in row else "-" for p in providers if _anym(memory, p)]
            diff = f"{row['torch'][0] - row['cross_entropy'][0]:.0f} MB" \
                if {"torch", "cross_entropy"} <= row.keys() else "-"
            print(f"| {shape} | {logits_mb:.0f} MB | " + " | ".join(cells) + f" | {diff} |")


def _any(times, provider):
    return any(provider in row for row in times.values())


def _anym(memory, provider):
    return any(provider in row for row in memory.values())


if __name__ == "__main__":
    main(sys.argv[1])

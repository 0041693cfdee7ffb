"""Resident memory over many training iterations with RMILoss, in a process of its own.

    python tests/memory_soak.py BACKEND ITERATIONS BLOCK

Prints one line: the resident set size (kB) after each block of BLOCK iterations. Used by tests/test_memory.py.
"""

import sys

import torch

from rmi_triton import RMILoss


def rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 // 1024


def main():
    backend, iterations, block = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.manual_seed(0)
    torch.set_num_threads(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 4, 3, padding=1))
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    crit = RMILoss(backend=backend)
    g = torch.Generator().manual_seed(1)
    readings = []
    for step in range(iterations):
        images = torch.randn(2, 3, 48, 40, generator=g)
        labels = torch.randint(0, 4, (2, 48, 40), generator=g)
        labels[torch.rand(2, 48, 40, generator=g) < 0.1] = 255
        loss = crit(net(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % block == 0:
            readings.append(rss_kb())
    print(" ".join(map(str, readings)))


if __name__ == "__main__":
    main()

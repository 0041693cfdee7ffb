"""DistributedDataParallel with RMILoss: 2 CPU processes (gloo) against one process.

Equivalence, precisely: rank r computes the loss L_r over its own images B_r;
DDP averages the gradients, so every rank must end the backward with
(grad L_0 + grad L_1) / 2 -- what one process gets from the loss
(L_0 + L_1) / 2 -- and, after an SGD step, identical parameters.
"""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from rmi_triton import RMILoss

WORLD = 2


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 4, 3, padding=1))


def _batch(rank):
    g = torch.Generator().manual_seed(100 + rank)
    images = torch.randn(2, 3, 40, 44, generator=g)
    labels = torch.randint(0, 4, (2, 40, 44), generator=g)
    labels[torch.rand(2, 40, 44, generator=g) < 0.1] = 255
    return images, labels


def _worker(rank, store, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        model = DistributedDataParallel(_net())
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        images, labels = _batch(rank)
        loss = RMILoss(backend="torch")(model(images), labels)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.module.named_parameters()}
        opt.step()
        params = {name: p.detach().clone() for name, p in model.module.named_parameters()}
        torch.save({"grads": grads, "params": params}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_step_equals_single_process_mean_of_rank_losses(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    net = _net()
    crit = RMILoss(backend="torch")
    mean_loss = sum(crit(net(images), labels) for images, labels in map(_batch, range(WORLD))) / WORLD
    mean_loss.backward()
    for name, p in net.named_parameters():
        for r in range(WORLD):
            torch.testing.assert_close(ranks[r]["grads"][name], p.grad, rtol=1e-5, atol=1e-7,
                                       msg=f"rank {r} gradient of {name}")
    for name in ranks[0]["params"]:
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), f"ranks differ in {name}"

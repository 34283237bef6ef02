"""One rank of the gathered-CTC test (tests/train/test_precision_dedupe_gather.py), started by
``torch.distributed.run`` with 2 CPU processes over gloo: each computes the CTC loss of its 8 cells
with features gathered across ranks, all-reduces (averages) the gradients as DDP does, and rank 0
writes the losses and the averaged gradients."""

import json
import sys

import torch
import torch.distributed as dist

from tests.train.test_precision_dedupe_gather import ctc_step


def main(out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    loss, grads = ctc_step(rank * 8, 8)
    for g in grads.values():
        dist.all_reduce(g)
        g /= world
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, torch.tensor(loss))
    if rank == 0:
        torch.save(grads, out + ".grads")
        with open(out, "w") as f:
            json.dump({"losses": [float(x) for x in losses]}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

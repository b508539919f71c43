"""One SGD step of a tiny GPT, either under DistributedDataParallel (run by torchrun, gloo; rank 0
saves the parameters to argv[1]) or in one process (``one_step(ddp=False)``, imported by the test).
Every process draws the same global batch and takes its own rows of it."""

import sys

import torch

from fastgpt import GPT, GPTConfig

GLOBAL_BATCH = 4


def one_step(rank: int, world: int, ddp: bool) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=97))
    net = model
    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 97, (GLOBAL_BATCH, 33), generator=g)
    rows = idx.chunk(world)[rank]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    _, loss = net(rows[:, :-1], rows[:, 1:])
    loss.backward()  # DDP averages the gradients of the ranks: the mean over the global batch
    opt.step()
    return model


if __name__ == "__main__":
    import torch.distributed as dist
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    model = one_step(dist.get_rank(), dist.get_world_size(), ddp=True)
    if dist.get_rank() == 0:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, sys.argv[1])
    dist.barrier()
    dist.destroy_process_group()

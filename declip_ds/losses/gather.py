"""All-gather with gradient, the collective every batch-contrastive loss is built on.

Forward: every rank contributes its (b, ...) rows and receives the (W*b, ...) concatenation in rank
order. Backward: the gradient of the gathered tensor is summed over ranks (all-reduce SUM) and each
rank keeps its own slice. With DeepSpeed's gradient *averaging*, a per-rank loss that is the local
mean then yields exactly the gradient of the global-batch loss (METHODS.md §0).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_info(group) -> tuple[int, int]:
    """(rank, world_size) in ``group``; (0, 1) when ``group`` is None or distributed is off."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        rank, world = world_info(group)
        ctx.group, ctx.rank, ctx.b = group, rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)  # (W*b, ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)  # every rank's loss used these rows
        return grad[ctx.rank * ctx.b : (ctx.rank + 1) * ctx.b], None


def all_gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """(b, ...) local rows -> (W*b, ...) rows of all ranks, in rank order; identity without a group.

    All ranks must pass the same ``b``.
    """
    if world_info(group)[1] == 1:
        return x
    return _AllGatherWithGrad.apply(x, group)


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """(b, ...) -> (W*b, ...) without a gradient path (for targets such as DeCLIP's neighbours)."""
    world = world_info(group)[1]
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=0)

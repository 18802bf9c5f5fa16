"""A CPU collective for Disco: torch.distributed's gloo, bridged in as Disco's collectives (all-reduce,
broadcast, and the point-to-point sends a pipeline's stages use).

TVM has no CPU collective, and the PyPI wheel none at all. A compiled library's all-reduce is
`call_dps_packed("runtime.disco.allreduce", ...)`; Disco dispatches it to the global function
`runtime.disco.<ccl>.allreduce`, <ccl> being the name `init_ccl` set on the worker (TVM's C++, builtin.cc).
`init_ccl` only knows the collectives compiled into the runtime (nccl / rccl), so on a CPU session it is
not called and the name stays empty: the functions below are registered under that empty name
(`runtime.disco..allreduce`). Each worker process imports this module (worker 0 lives in the controller
process), then `qcompile.parallel.gloo_init` joins them into one gloo process group over localhost TCP.

A session whose runtime has NCCL/RCCL uses `init_ccl` instead, which sets the name, and these are unused.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
from tvm_ffi import get_global_func, register_global_func

PREFIX = "runtime.disco.."  # runtime.disco.<ccl>.<op> with no ccl initialised
# Disco's ReduceKind (sum, prod, min, max, avg) -> gloo's; avg is a sum divided by the world size.
REDUCE_OPS = (dist.ReduceOp.SUM, dist.ReduceOp.PRODUCT, dist.ReduceOp.MIN, dist.ReduceOp.MAX, dist.ReduceOp.SUM)
AVG = 4


_groups: list = []  # per Disco worker group (a pipeline stage's shards): its gloo sub-group
_group_size = 1


def _group(in_group: bool):
    return _groups[dist.get_rank() // _group_size] if in_group else None


@register_global_func("qcompile.parallel.gloo_init", override=True)
def gloo_init(port: int, group_size: int) -> None:
    """Join this worker to the session's gloo group (rank = Disco worker id) at 127.0.0.1:`port`, and to
    its worker group's sub-group (workers [g * group_size, (g + 1) * group_size))."""
    global _groups, _group_size
    rank = int(get_global_func("runtime.disco.worker_rank")())
    world = int(get_global_func("runtime.disco.world_size")())
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    _group_size = group_size
    _groups = [dist.new_group(list(range(g, g + group_size))) for g in range(0, world, group_size)]


@register_global_func(PREFIX + "allreduce", override=True)
def allreduce(send, kind: int, in_group: bool, recv) -> None:
    """recv = the reduction of `send` over the workers (of this worker's group when `in_group`); Disco
    passes the ReduceKind as an int."""
    total = torch.from_dlpack(send).clone()
    group = _group(in_group)
    dist.all_reduce(total, op=REDUCE_OPS[kind], group=group)
    if kind == AVG:
        total /= dist.get_world_size(group)
    torch.from_dlpack(recv).copy_(total)


@register_global_func(PREFIX + "broadcast_from_worker0", override=True)
def broadcast_from_worker0(send, in_group: bool, recv) -> None:
    """recv = worker 0's `send` (the group's first worker's when `in_group`), on every worker."""
    out, group = torch.from_dlpack(recv), _group(in_group)
    root = dist.get_rank() // _group_size * _group_size if in_group else 0
    if dist.get_rank() == root:
        out.copy_(torch.from_dlpack(send))
    dist.broadcast(out, src=root, group=group)


@register_global_func(PREFIX + "send_to_next_group", override=True)
def send_to_next_group(buffer) -> None:
    """To the worker of the same place in the next group (the next pipeline stage)."""
    dist.send(torch.from_dlpack(buffer).contiguous(), dst=dist.get_rank() + _group_size)


@register_global_func(PREFIX + "recv_from_prev_group", override=True)
def recv_from_prev_group(buffer) -> None:
    dist.recv(torch.from_dlpack(buffer), src=dist.get_rank() - _group_size)


@register_global_func(PREFIX + "send_to_worker", override=True)
def send_to_worker(buffer, receiver: int) -> None:
    dist.send(torch.from_dlpack(buffer).contiguous(), dst=receiver)


@register_global_func(PREFIX + "recv_from_worker", override=True)
def recv_from_worker(buffer, sender: int) -> None:
    dist.recv(torch.from_dlpack(buffer), src=sender)

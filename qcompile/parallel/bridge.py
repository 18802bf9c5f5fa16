"""A CPU collective for Disco: torch.distributed's gloo, bridged in as Disco's all-reduce and broadcast.

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


def _world() -> int:
    return int(get_global_func("runtime.disco.world_size")())


@register_global_func("qcompile.parallel.gloo_init", override=True)
def gloo_init(port: int) -> None:
    """Join this worker to the session's gloo group (rank = Disco worker id) at 127.0.0.1:`port`."""
    rank = int(get_global_func("runtime.disco.worker_rank")())
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=_world(),
                            timeout=datetime.timedelta(seconds=120))


@register_global_func(PREFIX + "allreduce", override=True)
def allreduce(send, kind: int, in_group: bool, recv) -> None:
    """recv = the reduction of every worker's `send` (Disco passes the ReduceKind as an int)."""
    total = torch.from_dlpack(send).clone()
    dist.all_reduce(total, op=REDUCE_OPS[kind])
    if kind == AVG:
        total /= dist.get_world_size()
    torch.from_dlpack(recv).copy_(total)


@register_global_func(PREFIX + "broadcast_from_worker0", override=True)
def broadcast_from_worker0(send, in_group: bool, recv) -> None:
    """recv = worker 0's `send`, on every worker."""
    out = torch.from_dlpack(recv)
    if dist.get_rank() == 0:
        out.copy_(torch.from_dlpack(send))
    dist.broadcast(out, src=0)

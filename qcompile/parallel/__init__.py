"""Tensor parallelism from the families' declared plans (`Family.tensor_parallel_plan`), run on TVM's
distributed runtime (Disco).

  shards.py   the plan applied, no TVM: per-shard config, which HF tensor slice each shard reads, the
              manifest record (what the builder, the loader and the memory plan read)
  session.py  the controller: a Disco ProcessSession of N workers running a sharded library
  worker.py   the worker processes' entry point (`python -m qcompile.parallel.worker`) and what each
              worker does for itself (load its slices, make its empty KV cache)
  bridge.py   a CPU collective for Disco: torch.distributed's gloo, bridged in as Disco's all-reduce
"""

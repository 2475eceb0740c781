"""Per-process memory of the weights and the optimizer state under DDP and FSDP.

`python -m bench.memory [--preset gpt2-xl] [--world-sizes 1 2 4 8] [--device meta|cuda]`
prints one row per (parallelism, world size): the bytes one process holds for its
parameters and its AdamW state, measured, beside the arithmetic.

How each number is obtained. The model is built as the trainer builds it (fp32
master weights, the vocabulary padded to a multiple of 64, the LM head tied to
the token embedding) and, for FSDP, sharded as the trainer shards it
(`engine.distributed.shard_model`: each Block, then the root) over a process
group of the given size. That group is torch's fake backend in this one process
(`torch.testing._internal.distributed.fake_pg`, rank 0, the largest shard when
shards are uneven): nothing is communicated, and the layout of every parameter
and its shard is FSDP's own. The optimizer is torch's AdamW over the trainer's two
parameter groups, its state created as torch.distributed.checkpoint creates it
(one step with zero gradients and a zero learning rate). Then:

- `--device meta` (any machine): the bytes are the sizes of the tensors this
  process holds: each parameter's local shard (under DDP the whole parameter:
  DDP replicates the model, so each process holds what a single process holds:
  measured once, the same at every world size) and each state tensor (exp_avg,
  exp_avg_sq, step);
- `--device cuda` (a GPU): the same tensors are allocated on the GPU and the
  bytes are torch.cuda.memory_allocated() before and after.

The arithmetic: P parameters in fp32 are 4P bytes, AdamW's two fp32 moments 8P,
plus a 4-byte step count per parameter tensor; FSDP divides the 12P bytes by the
world size N (up to the padding of uneven shards), DDP does not. Gradients (4P
under DDP, 4P/N under FSDP after each step's reduce-scatter; unsharded until then
while micro-batches accumulate) and activations are not in these figures.
"""
from __future__ import annotations

import argparse
import contextlib
import json

import torch
import torch.distributed as dist

PARALLELS = ("ddp", "fsdp")


@contextlib.contextmanager
def fake_group(world_size: int):
    """A process group of `world_size` in this process (rank 0) that communicates nothing."""
    from torch.testing._internal.distributed.fake_pg import FakeStore
    if dist.is_initialized():
        raise RuntimeError("bench.memory needs a process without a process group")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _tensor_bytes(tensors) -> int:
    from engine.distributed import local_tensor
    return sum(local_tensor(t).numel() * t.element_size() for t in tensors)


def measure(preset: str, parallel: str, world_size: int, device: str = "meta") -> dict:
    """{"params_bytes", "optimizer_bytes", "num_params", "num_tensors"} of rank 0."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    from engine.config import GPTConfig
    from engine.distributed import shard_model
    from engine.model import GPT
    from engine.optim import param_groups
    allocated = torch.cuda.memory_allocated if device == "cuda" else None
    with fake_group(world_size if parallel == "fsdp" else 1):
        with torch.device("meta"):
            model = GPT(GPTConfig.from_preset(preset, vocab_multiple=64, backend="torch"))
        num_params = sum(p.numel() for p in model.parameters())
        num_tensors = len(list(model.parameters()))
        if parallel == "fsdp":
            shard_model(model)
        start = allocated() if allocated else 0
        if device != "meta":
            model.to_empty(device=device)
        params_bytes = allocated() - start if allocated else _tensor_bytes(model.parameters())
        optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=0.0, fused=device == "cuda")
        start = allocated() if allocated else 0
        _init_optim_state(optimizer)  # the state as DCP creates it: one step, zero gradients and lr
        for p in model.parameters():
            p.grad = None
        state = [v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
        optimizer_bytes = allocated() - start if allocated else _tensor_bytes(state)
        del model, optimizer, state
    return dict(params_bytes=params_bytes, optimizer_bytes=optimizer_bytes, num_params=num_params,
                num_tensors=num_tensors)


def arithmetic(num_params: int, num_tensors: int, parallel: str, world_size: int) -> int:
    """Parameters and AdamW state in bytes, per process: (4 + 8) * P / N (FSDP) or
    (4 + 8) * P (DDP), plus a 4-byte step per parameter tensor."""
    share = world_size if parallel == "fsdp" else 1
    return 12 * num_params // share + 4 * num_tensors


def rows(preset: str = "gpt2-xl", world_sizes=(1, 2, 4, 8), device: str = "meta") -> list[dict]:
    out = []
    replicated = measure(preset, "ddp", 1, device)  # what each DDP process holds, at any world size
    for parallel in PARALLELS:
        for n in world_sizes:
            m = replicated if parallel == "ddp" else measure(preset, parallel, n, device)
            total = m["params_bytes"] + m["optimizer_bytes"]
            out.append(dict(preset=preset, parallel=parallel, world_size=n, device=device, **m,
                            measured_bytes=total,
                            arithmetic_bytes=arithmetic(m["num_params"], m["num_tensors"], parallel, n)))
    return out


def table(results: list[dict]) -> list[str]:
    gb = 1e9
    lines = ["| parallel | processes | parameters GB | AdamW state GB | measured GB | arithmetic GB |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['parallel']} | {r['world_size']} | {r['params_bytes'] / gb:.3f} | "
                     f"{r['optimizer_bytes'] / gb:.3f} | {r['measured_bytes'] / gb:.3f} | "
                     f"{r['arithmetic_bytes'] / gb:.3f} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-xl")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--device", choices=("meta", "cuda"), default="meta")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    results = rows(args.preset, tuple(args.world_sizes), args.device)
    first = results[0]
    print(f"{args.preset}: {first['num_params']:,} parameters in {first['num_tensors']} tensors (fp32), "
          f"per process, measured on {args.device}:")
    print("\n".join(table(results)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

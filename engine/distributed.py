"""Data-parallel training under `torchrun`: process group, rank 0 as the master,
and the model replicated (DDP) or sharded (FSDP2), both PyTorch's own.

`torchrun --nproc_per_node=N train.py ...` sets RANK, LOCAL_RANK and WORLD_SIZE;
without them the run is a single process. CUDA runs use NCCL and one GPU per
process (cuda:LOCAL_RANK); CPU runs use gloo (slow, for tests and laptops).

`--parallel` (resolve_parallel): `ddp` replicates the model and all-reduces the
gradients; `fsdp` shards every parameter, gradient and optimizer state over the
processes (`fully_shard` on each Block, then on the root, which holds the
embeddings, ln_f and the LM head tied to the token embedding: the tied pair must
be one unit). FSDP in a single process runs over a one-process group, so its
checkpoints are sharded ones too.

Every collective waits at most `ddp_timeout_s` (init_process_group's timeout)
for the other processes: with gloo a stalled or dead peer then raises an error
that the trainer reports as one line (PeerLost, exit 5); with NCCL the watchdog
aborts the process after the same time. Teardown releases the DDP wrapper
before destroying the process group: the wrapper's reducer holds the group,
and a gloo group that outlives destroy_process_group aborts the process at
exit ("terminate called without an active exception").
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import re
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.errors import UserInputError


PARALLEL_MODES = ("auto", "ddp", "fsdp")


@dataclass(frozen=True)
class DistInfo:
    ddp: bool = False  # several processes (under DDP or FSDP)
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    parallel: str = "none"  # none | ddp | fsdp (resolve_parallel)

    @property
    def master(self) -> bool:
        """Only the master logs and writes files (checkpoints, CSV, plots)."""
        return self.rank == 0


def env_dist_info() -> DistInfo:
    """What torchrun's environment says; a single process when it says nothing."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo()
    try:
        rank = int(os.environ["RANK"])
        world = int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise UserInputError("RANK / WORLD_SIZE / LOCAL_RANK must be integers (set by torchrun)") from None
    if world < 1 or not 0 <= rank < world:
        raise UserInputError(f"RANK={rank} / WORLD_SIZE={world} are inconsistent")
    return DistInfo(ddp=world > 1, rank=rank, local_rank=local, world_size=world)


def resolve_parallel(mode: str, world_size: int) -> str:
    """What --parallel means for this launch: `fsdp` when asked for (one process
    included), else `ddp` for several processes and `none` for one."""
    if mode not in PARALLEL_MODES:
        raise UserInputError(f"parallel (--parallel) must be one of {', '.join(PARALLEL_MODES)}, got {mode!r}")
    if mode == "fsdp":
        return "fsdp"
    return "ddp" if world_size > 1 else "none"


def init_distributed(device_type: str, timeout_s: float = 600.0, parallel: str = "auto") -> DistInfo:
    """Start the process group if torchrun launched several processes, or for
    FSDP in one process; each collective then waits at most timeout_s seconds.

    On CUDA selects this process's GPU first (NCCL needs it before init)."""
    info = env_dist_info()
    info = dataclasses.replace(info, parallel=resolve_parallel(parallel, info.world_size))
    if info.parallel == "none":
        return info
    if device_type == "cuda":
        if info.local_rank >= torch.cuda.device_count():
            raise UserInputError(f"LOCAL_RANK {info.local_rank} but only "
                                 f"{torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(info.local_rank)
        backend = "nccl"
    elif device_type == "cpu":
        backend = "gloo"
    else:
        raise UserInputError(f"distributed training on {device_type} is not supported; use cuda or cpu")
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        try:
            if info.ddp:
                dist.init_process_group(backend=backend, timeout=timeout)
            else:  # FSDP in one process: a group of one, no rendezvous
                dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1,
                                        timeout=timeout)
        except (RuntimeError, TimeoutError, ValueError) as e:
            from engine.run_errors import PeerLost
            raise PeerLost(f"DDP rank {info.rank}: could not join the other {info.world_size - 1} "
                           f"process(es) within {timeout_s:g} s ({failure_reason(e)})") from None
    return info


def process_device(device: str, info: DistInfo) -> str:
    """Under DDP on CUDA each process owns cuda:LOCAL_RANK."""
    if info.ddp and device.startswith("cuda"):
        return f"cuda:{info.local_rank}"
    return device


def wrap_model(model: torch.nn.Module, info: DistInfo, device: torch.device, dtype: str = "fp32",
               compile: bool = False) -> torch.nn.Module:
    """The model a training step calls: under DDP its wrapper, under FSDP the model
    itself, sharded in place (shard_model); torch.compile'd where asked."""
    if info.parallel == "fsdp":
        return shard_model(model, dtype, compile=compile)
    if compile:
        model = torch.compile(model)
    if info.parallel == "none":
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    if device.type == "cuda":
        return DDP(model, device_ids=[info.local_rank])
    return DDP(model)


def shard_model(model: torch.nn.Module, dtype: str = "fp32", compile: bool = False) -> torch.nn.Module:
    """FSDP2 over a GPT, in place: each Block a unit (all-gathered for its forward
    and backward, resharded after), then the root, which keeps the tied token
    embedding and LM head in one unit. Under dtype bf16 the unsharded weights and
    the compute are bf16, the sharded master weights and the gradient reduction
    fp32. With `compile`, each Block is compiled before sharding (FSDP's hooks
    stay outside the compiled code)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if dtype == "bf16"
              else MixedPrecisionPolicy())
    # FSDP warns when a unit's output is a view, for fear of an in-place op on it
    # dropping its backward hook; the model never modifies a block's output in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    for block in model.transformer.h:
        if compile:
            block.compile()
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether the model's parameters are DTensors (FSDP)."""
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in model.parameters())


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this process; any other tensor as it is."""
    from torch.distributed.tensor import DTensor
    return t.to_local() if isinstance(t, DTensor) else t


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module itself, under DDP and torch.compile wrappers alike."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """In place: the mean over processes (a no-op in a single process)."""
    if info.ddp:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(info.world_size)
    return t


def all_reduce_max(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """In place: the maximum over processes (a no-op in a single process)."""
    if info.ddp:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


_COLLECTIVE_FAILURE = re.compile(r"gloo|nccl|timed out|timeout|connection (closed|reset)|broken pipe|"
                                 r"socket|peer", re.IGNORECASE)


def is_collective_failure(e: BaseException) -> bool:
    """Whether an exception raised in a DDP run comes from a collective whose
    peers stalled or died (gloo raises plain RuntimeErrors for both)."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    return isinstance(e, RuntimeError) and bool(_COLLECTIVE_FAILURE.search(str(e)))


def failure_reason(e: BaseException) -> str:
    """The first line of a collective's error, without its C++ source location."""
    lines = str(e).strip().splitlines()
    first = lines[0] if lines else type(e).__name__
    return re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0].rstrip(".")


def all_gather_objects(obj, info: DistInfo) -> list:
    """One picklable object from every rank, in rank order (used for loader states)."""
    if not info.ddp:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, info: DistInfo):
    if not info.ddp:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.ddp:
        dist.barrier()


def destroy(info: DistInfo) -> None:
    if info.parallel != "none" and dist.is_initialized():
        dist.destroy_process_group()

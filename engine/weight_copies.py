"""bf16 copies of the matmul weights, written once per optimizer step.

Under bf16 autocast every matmul reads its weight in bf16. Casting the fp32
master weights in every micro-step reads 4 and writes 2 bytes per parameter
each time (and the backward casts each gradient back). Instead the training
step keeps one bf16 copy of each matmul weight (GPT.matmul_weights) and the
matmuls read it (GPT.forward_backward, the triton backend's `bf16_weights`
fusion). The copies are written where the master weights change:

- by FusedAdamW, in the same kernel that updates the master
  (FusedAdamW.bf16_copies), at no extra pass;
- by torch's AdamW, in one pass after each step (a step post-hook: inside the
  optimizer's step(), so a captured CUDA graph replays it).

A copy always equals `master.to(torch.bfloat16)` (round to nearest even), so
checkpoints keep holding only the fp32 masters and a resumed run rebuilds the
same copies. A master changed in place outside the optimizer (loading a
checkpoint) moves its version counter: `get` then copies it again before use.
"""
from __future__ import annotations

import torch


class WeightCopies:
    """bf16 copies of `params` (float32), kept equal to them by `optimizer` (None:
    by whoever calls `refresh`, as tests and counts do)."""

    def __init__(self, params, optimizer=None):
        params = list(params)
        from torch.distributed.tensor import DTensor
        if any(isinstance(p, DTensor) for p in params):
            raise TypeError("WeightCopies: the parameters are sharded (DTensors); under FSDP the "
                            "mixed-precision policy makes the bf16 weights, not these copies")
        for i, p in enumerate(params):
            if p.dtype != torch.float32:
                raise TypeError(f"WeightCopies: parameter {i} is {p.dtype}; copies are of float32 "
                                "master weights")
        if optimizer is not None and hasattr(optimizer, "bf16_copies"):  # FusedAdamW: in its kernel
            copies = optimizer.bf16_copies(params)
        else:
            flat = torch.empty(sum(p.numel() for p in params), dtype=torch.bfloat16,
                               device=params[0].device if params else None)
            copies, start = [], 0
            for p in params:
                copies.append(flat[start:start + p.numel()].view(p.shape))
                start += p.numel()
            if optimizer is not None:
                optimizer.register_step_post_hook(lambda *_: self.refresh())
        self._copies = {id(p): (p, c) for p, c in zip(params, copies)}
        self._versions: dict[int, int] = {}
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy every master into its copy now (one pass where torch can fuse it)."""
        pairs = list(self._copies.values())
        if pairs:
            torch._foreach_copy_([c for _, c in pairs], [p for p, _ in pairs])
        self._versions = {key: p._version for key, (p, _) in self._copies.items()}

    def get(self, param: torch.Tensor) -> torch.Tensor | None:
        """The bf16 copy of `param`, or None when it has none. A master modified
        in place since its copy was written (its version moved) is copied first."""
        entry = self._copies.get(id(param))
        if entry is None or entry[0] is not param:
            return None
        master, copy = entry
        if master._version != self._versions[id(param)]:
            with torch.no_grad():
                copy.copy_(master)
            self._versions[id(param)] = master._version
        return copy

    def __len__(self) -> int:
        return len(self._copies)

"""The whole training step as one CUDA graph: capture once, replay every step.

A GPT-2 step launches hundreds of kernels per micro-step; replaying a captured
graph removes their CPU launch cost and any host sync. What makes the step
capturable:
- static input buffers (accum, B, T) on the device; each step copies its batches
  in from pinned host memory (non_blocking) before the replay;
- gradients zeroed inside the graph (`zero_grad(set_to_none=False)`), so their
  addresses never change after the warm-up steps created them;
- the global grad norm clipped on the device (`clip_grad_norm_(foreach=True)`
  returns a device tensor and scales the grads by a device-side coefficient);
- an optimizer whose step count and learning rate live on the device
  (FusedAdamW, or torch's AdamW with capturable=True and a tensor lr) and an lr
  set with `fill_` before each replay;
- the loss and norm left in device buffers that the trainer reads when it logs.

Before capture, >= 3 eager steps run the same body on a side stream (as PyTorch's
docs require): they are real training steps, and they let Triton compile and
autotune every kernel, since autotuning during capture would break it.
"""
from __future__ import annotations

import torch

from engine.errors import UserInputError
from engine.step import train_step

WARMUP_STEPS = 3


def graph_decision(mode: str, device_type: str, backend: str, compile: bool, ddp: bool,
                   profile: bool = False, fsdp: bool = False) -> tuple[bool, str]:
    """(use graphs?, reason). `on` raises UserInputError where graphs cannot be used;
    `auto` returns False with the reason, for one log line."""
    if mode == "off":
        return False, "cuda_graphs=off"
    reason = None
    if device_type != "cuda":
        reason = f"the device is {device_type}; CUDA graphs need a CUDA GPU"
    elif backend != "triton":
        reason = f"the backend is {backend}; the captured step is built for the triton backend"
    elif compile:
        reason = "compile is on; torch.compile manages its own graphs"
    elif fsdp:
        reason = "FSDP is on; its all-gathers and reduce-scatters run from hooks a captured graph would freeze"
    elif ddp:
        reason = "DDP is on; its gradient all-reduce hooks are not captured"
    elif profile:
        # The profiled window is a few steps: it would hold the capture, not the replays.
        reason = "--profile traces eager steps (a capture inside the window would hide them)"
    if reason is None:
        return True, "capturing the training step in a CUDA graph"
    if mode == "on":
        raise UserInputError(f"cuda_graphs=on but {reason} (use --cuda-graphs auto or off)")
    return False, reason


class GraphedTrainStep:
    """One training step (all micro-steps, clipping, optimizer step) as a CUDA graph.

    Call `step(x, y)` with CPU int64 batches of shape (accum, B, T) after setting the
    lr (engine.optim.set_lr, which fills the device tensor): it returns the step's
    (loss, grad norm) as device tensors that stay valid until the next call.
    The first `warmup` calls run eagerly on a side stream; the next one captures.
    """

    def __init__(self, model, optimizer, accum: int, batch_size: int, seq_len: int,
                 device: torch.device, autocast, grad_clip: float,
                 warmup: int = WARMUP_STEPS, log=print):
        if warmup < WARMUP_STEPS:
            raise ValueError(f"GraphedTrainStep: warmup must be >= {WARMUP_STEPS}, got {warmup}")
        self.model = model
        self.optimizer = optimizer
        self.accum = accum
        self.device = device
        self.autocast = autocast  # a callable returning a fresh context manager
        self.grad_clip = grad_clip
        self.warmup = warmup
        self.log = log
        shape = (accum, batch_size, seq_len)
        self.static_x = torch.zeros(shape, dtype=torch.long, device=device)
        self.static_y = torch.zeros(shape, dtype=torch.long, device=device)
        # Pinned staging: host->device copies are then asynchronous (no host sync).
        pin = device.type == "cuda"
        self.pinned_x = torch.zeros(shape, dtype=torch.long, pin_memory=pin)
        self.pinned_y = torch.zeros(shape, dtype=torch.long, pin_memory=pin)
        self.copied = None  # event: the last copy out of the pinned buffers finished
        self.graph = None
        self.static_loss = None
        self.static_norm = None
        self.calls = 0
        self.failed = False
        self.side_stream = None

    def _body(self):
        return train_step(self.model, self.optimizer, self.static_x, self.static_y,
                          grad_clip=self.grad_clip, autocast=self.autocast)

    def _load(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.copied is not None:
            self.copied.synchronize()  # the previous copy has left the pinned buffers
        self.pinned_x.copy_(x)
        self.pinned_y.copy_(y)
        self.static_x.copy_(self.pinned_x, non_blocking=True)
        self.static_y.copy_(self.pinned_y, non_blocking=True)
        self.copied = torch.cuda.Event()
        self.copied.record()

    def _eager_on_side_stream(self):
        # One side stream for all warm-up steps: the caching allocator reuses blocks
        # only on the stream that freed them.
        if self.side_stream is None:
            self.side_stream = torch.cuda.Stream(device=self.device)
        side = self.side_stream
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            loss, norm = self._body()
        torch.cuda.current_stream(self.device).wait_stream(side)
        return loss, norm

    def _capture(self) -> bool:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.static_loss, self.static_norm = self._body()
        except Exception as e:  # noqa: BLE001 - any capture failure means: continue eagerly
            self.log(f"cuda graphs: capture failed ({type(e).__name__}: {e}); continuing eagerly")
            self.failed = True
            self.graph = None
            torch.cuda.synchronize(self.device)
            return False
        self.graph = graph
        self.log(f"cuda graphs: captured the training step after {self.warmup} eager warm-up steps")
        return True

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def step(self, x: torch.Tensor, y: torch.Tensor):
        self._load(x, y)
        self.calls += 1
        if self.graph is None and (self.failed or self.calls <= self.warmup):
            return self._eager_on_side_stream()
        if self.graph is None and not self._capture():
            return self._eager_on_side_stream()
        self.graph.replay()
        return self.static_loss, self.static_norm

"""What a run measures at its intervals, besides the training loss: the val loss,
HellaSwag (when --hellaswag names the jsonl) and a few samples. Each takes the
model itself (not its DDP wrapper) and gives every process the same answer."""
from __future__ import annotations

import torch

from engine import distributed as dist_lib
from engine.train_config import SAMPLE_PROMPT


@torch.no_grad()
def val_loss(model, loader, batches: int, device, autocast, dist_info) -> float:
    """Mean loss over the first `batches` val batches (the loader is reset, so every
    evaluation sees the same ones), averaged over the processes."""
    model.eval()
    loader.reset()
    total = torch.zeros((), dtype=torch.float32, device=device)
    for _ in range(batches):
        x, y = loader.next_batch()
        with autocast():
            _, loss = model(x.to(device), y.to(device), return_logits=False, check_targets=False)
        total += loss.float()
    total /= batches
    dist_lib.all_reduce_mean(total, dist_info)
    model.train()
    return float(total.item())


def hellaswag(model, items, tokenizer, device, autocast, dist_info) -> dict:
    """{"hellaswag_acc", "hellaswag_acc_norm"} over `items` (engine.eval), scored as
    build-nanogpt scores them; the items are sharded over the processes."""
    from engine.eval import evaluate_hellaswag
    model.eval()
    try:
        result = evaluate_hellaswag(model, items, tokenizer, device, autocast, dist_info)
    finally:
        model.train()
    return {"hellaswag_acc": result["acc"], "hellaswag_acc_norm": result["acc_norm"]}


def samples(model, tokenizer, device, autocast, seed: int, num_samples: int = 2,
            max_new_tokens: int = 32) -> list[str]:
    """A few continuations of a fixed prompt (top-k 50)."""
    from engine.generate import generate
    ids = tokenizer.encode(SAMPLE_PROMPT)
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    limit = model.config.block_size - idx.size(1)
    with autocast():
        out = generate(model, idx, max_new_tokens=max(0, min(max_new_tokens, limit)), temperature=1.0,
                       top_k=50, seed=seed)
    return [tokenizer.decode(row.tolist()) for row in out]

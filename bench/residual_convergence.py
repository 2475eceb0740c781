"""Does a bf16 residual stream train like an fp32 one? A convergence comparison on CPU.

    python -m bench.residual_convergence --data tinyshakespeare.txt [--seeds 4] [--steps 300]

Trains the same small GPT several times with each residual dtype, through the
trainer itself: the PyTorch path under bf16 autocast (the matmuls in bf16, as on
a GPU), byte tokens, one seed per run (initial weights and data order), the
same schedule. Only GPTConfig.residual_dtype differs: "fp32" keeps the stream in
fp32, "bf16" rounds it to bf16 after the embeddings and after every residual add
(the rule the Triton kernels follow). The val loss is taken every
`--eval-interval` steps on the same held-out batches.

Prints a markdown table: at each evaluation, each dtype's mean val loss over the
seeds with its range (min-max), and the difference of the means; then the
verdict: whether the bf16 mean lies inside fp32's seed-to-seed range at every
evaluation. `--json FILE` keeps every curve.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

DTYPES = ("fp32", "bf16")


def run_one(data: str, residual_dtype: str, seed: int, args, run_dir: str) -> dict:
    """One training run; returns its train-loss curve and its val losses by step."""
    from engine.train_config import TrainConfig
    from engine.trainer import train

    cfg = TrainConfig(
        data=data, tokenizer="bytes", device="cpu", dtype="bf16", backend="torch", optimizer="torch",
        residual_dtype=residual_dtype, model=args.model, n_layer=args.n_layer, n_embd=args.n_embd,
        n_head=args.n_head, batch_size=args.batch_size, seq_len=args.seq_len,
        max_steps=args.steps, warmup_steps=args.warmup_steps, max_lr=args.max_lr,
        eval_interval=args.eval_interval, eval_batches=args.eval_batches,
        sample_interval=0, checkpoint_interval=0, seed=seed, run_dir=run_dir, overwrite=True)
    trainer = train(cfg, log=lambda *a, **k: None)
    history = trainer.history
    return {"residual_dtype": residual_dtype, "seed": seed,
            "train_loss": [h["loss"] for h in history],
            "val_loss": {h["step"]: h["val_loss"] for h in history if h.get("val_loss") is not None}}


def table(runs: list[dict]) -> tuple[list[str], bool]:
    """The markdown lines and whether bf16's mean stays within fp32's seed range."""
    steps = sorted(runs[0]["val_loss"])
    lines = ["| step | fp32 mean [min, max] | bf16 mean [min, max] | bf16 - fp32 | fp32 seed range |",
             "|---|---|---|---|---|"]
    inside = True
    for step in steps:
        cells, stats = [], {}
        for dtype in DTYPES:
            vals = [r["val_loss"][step] for r in runs if r["residual_dtype"] == dtype]
            stats[dtype] = (statistics.fmean(vals), min(vals), max(vals))
            cells.append(f"{stats[dtype][0]:.4f} [{stats[dtype][1]:.4f}, {stats[dtype][2]:.4f}]")
        mean32, lo32, hi32 = stats["fp32"]
        inside &= lo32 <= stats["bf16"][0] <= hi32
        lines.append(f"| {step} | {cells[0]} | {cells[1]} | {stats['bf16'][0] - mean32:+.4f} | "
                     f"{hi32 - lo32:.4f} |")
    finals = {d: [statistics.fmean(r["train_loss"][-50:]) for r in runs if r["residual_dtype"] == d]
              for d in DTYPES}
    lines.append("")
    lines.append("train loss, mean of the last 50 steps, per seed: "
                 + "; ".join(f"{d} " + ", ".join(f"{v:.4f}" for v in finals[d]) for d in DTYPES))
    return lines, inside


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.residual_convergence",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a text corpus (tiny-shakespeare)")
    p.add_argument("--seeds", type=int, default=4, help="runs per residual dtype (seeds 0..N-1)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--model", default="tiny")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--max-lr", type=float, default=8e-4)
    p.add_argument("--eval-interval", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--json", help="write every run's curves here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    runs = []
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for dtype in DTYPES:
                runs.append(run_one(args.data, dtype, seed, args, f"{tmp}/{dtype}-{seed}"))
                print(f"residual {dtype} seed {seed}: final val loss "
                      f"{runs[-1]['val_loss'][max(runs[-1]['val_loss'])]:.4f} "
                      f"({time.monotonic() - start:.0f} s so far)", file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": runs}, f, indent=1)
    lines, inside = table(runs)
    print("\n".join(lines))
    print()
    print(f"verdict: the bf16 stream's mean val loss is {'inside' if inside else 'OUTSIDE'} fp32's "
          f"seed-to-seed range at every evaluation ({args.seeds} seeds each, {args.steps} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

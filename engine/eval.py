"""HellaSwag, scored as build-nanogpt scores it (completion style).

`python -m engine.eval hellaswag --model SOURCE [--data FILE.jsonl] [--limit N]
[--json OUT] [--batch-items N] [--device D] [--dtype T] [--backend B]`; SOURCE is
a run folder, a checkpoint file or a Hugging Face GPT-2 folder (engine.load).
Under `torchrun` the items are shared out across the processes.

Each item is a context and four endings. Each ending is encoded with a leading
space and appended to the context's tokens; the model's cross-entropy is summed
over the ending's tokens only. `pred` is the ending with the lowest summed loss,
`pred_norm` the one with the lowest mean loss per token; `acc` and `acc_norm`
are the fractions of items where they equal the label. The four endings of an
item are rows of one forward, several items per forward, padded to the longest
row rounded up to a multiple of 32 (positions after a row's end cannot affect
it: attention is causal).

A row longer than the model's block size (never for GPT-2's 1024 on HellaSwag;
possible for small models) keeps its ending and the end of its context: the
context is cut from the left, by the same amount for all four endings; such
items are counted in the result's "truncated".

Without --data the validation split (10,042 items) is downloaded once into the
engine's cache folder (`$XDG_CACHE_HOME/gpt2-engine`, else `~/.cache/gpt2-engine`).

`--json OUT` is checked before scoring: a new file in a writable folder, or a
predictions file of this command (replaced); a read-only file, the --data file
or any other existing file is refused. The result line is printed before the
file is written. Exit status: 0 done, 2 bad input, 4 the predictions could not
be written (the result line stands), 130 interrupted.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import sys
import time
from dataclasses import dataclass

from engine.cli import add_model_flags
from engine.errors import UserInputError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.eval", allow_abbrev=False,
                                description="Evaluate a model on a benchmark.")
    sub = p.add_subparsers(dest="task", required=True, metavar="TASK")
    h = sub.add_parser("hellaswag", allow_abbrev=False,
                       help="HellaSwag validation accuracy, scored as build-nanogpt does")
    h.add_argument("--model", required=True, metavar="SOURCE",
                   help="run folder, checkpoint file (ckpt_NNNNNN.pt) or Hugging Face GPT-2 folder")
    h.add_argument("--data", metavar="FILE.jsonl",
                   help="HellaSwag jsonl (default: the validation split, downloaded once into the cache)")
    h.add_argument("--limit", type=int, metavar="N", help="score only the first N items (default: all)")
    h.add_argument("--json", metavar="OUT",
                   help="write acc, acc_norm, n and every prediction to this file (default: none)")
    h.add_argument("--batch-items", type=int, metavar="N", default=8,
                   help="items per forward, 4 rows each (default: 8)")
    add_model_flags(h)
    return p


if __name__ == "__main__":
    # Parsed before torch is imported below, so that --help and a bad flag answer at
    # once; main() parses the same arguments again.
    build_parser().parse_args()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from engine import distributed as dist_lib  # noqa: E402
from engine.data import default_cache_dir  # noqa: E402
from engine.data.corpus import download as _urlopen  # noqa: E402
from engine.fileio import atomic_write, os_reason  # noqa: E402
from engine.run_errors import RunFileError  # noqa: E402

HELLASWAG_VAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
HELLASWAG_VAL_FILE = "hellaswag_val.jsonl"
NUM_ENDINGS = 4
PAD_ID = 0  # any valid id: padded positions come after every scored one
WIDTH_MULTIPLE = 32


@dataclass(frozen=True)
class HellaSwagItem:
    ind: int  # the item's id in the file ("ind"), else its position
    ctx: str
    endings: tuple[str, ...]
    label: int


@dataclass
class ItemScore:
    ind: int
    label: int
    pred: int  # lowest summed loss over the ending's tokens
    pred_norm: int  # lowest mean loss per ending token
    sum_losses: list[float]
    avg_losses: list[float]
    truncated: bool  # the context was cut from the left to fit the block size


# --------------------------------------------------------------------------
# The data
# --------------------------------------------------------------------------

def _item(obj, where: str, position: int) -> HellaSwagItem:
    if not isinstance(obj, dict):
        raise UserInputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    ctx = obj.get("ctx")
    if not isinstance(ctx, str) or not ctx:
        raise UserInputError(f"{where}: 'ctx' must be a non-empty string")
    endings = obj.get("endings")
    if (not isinstance(endings, list) or len(endings) != NUM_ENDINGS
            or not all(isinstance(e, str) for e in endings)):
        raise UserInputError(f"{where}: 'endings' must be a list of {NUM_ENDINGS} strings")
    label = obj.get("label")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < NUM_ENDINGS:
        hint = " (the test split has no labels: use the validation split)" if label in (None, "") else ""
        raise UserInputError(f"{where}: 'label' must be an integer 0..{NUM_ENDINGS - 1}, got "
                             f"{json.dumps(label)}{hint}")
    ind = obj.get("ind", position)
    if isinstance(ind, bool) or not isinstance(ind, int):
        raise UserInputError(f"{where}: 'ind' must be an integer, got {json.dumps(ind)}")
    return HellaSwagItem(ind=ind, ctx=ctx, endings=tuple(endings), label=label)


def load_hellaswag(path, limit: int | None = None) -> list[HellaSwagItem]:
    """The items of a HellaSwag jsonl file (one JSON object a line, blank lines
    skipped), the first `limit` of them when given. A line that is not a valid
    item is refused with the file and line named."""
    path = pathlib.Path(path)
    if limit is not None and limit < 1:
        raise UserInputError(f"--limit {limit}: must be at least 1")
    if not path.is_file():
        raise UserInputError(f"{path}: no such file (expected a HellaSwag .jsonl file)")
    items: list[HellaSwagItem] = []
    try:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if limit is not None and len(items) >= limit:
                    break
                if not raw.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    obj = json.loads(raw)
                except ValueError as e:  # JSONDecodeError and UnicodeDecodeError alike
                    raise UserInputError(f"{where}: not valid JSON ({e})") from None
                items.append(_item(obj, where, len(items)))
    except OSError as e:
        raise UserInputError(f"{path}: cannot read it ({e.strerror or e})") from None
    if not items:
        raise UserInputError(f"{path}: holds no HellaSwag items")
    return items


def fetch_hellaswag(cache_dir=None, fetch=None, url: str = HELLASWAG_VAL_URL,
                    timeout: float = 60.0) -> pathlib.Path:
    """The validation jsonl in the cache folder, downloaded there once (written
    atomically). Offline, a UserInputError says where to put the file.
    `fetch(url, timeout) -> bytes` replaces the download (tests)."""
    cache = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    dest = cache / HELLASWAG_VAL_FILE
    if dest.is_file():
        return dest
    offline = (f"put {HELLASWAG_VAL_FILE} (from {url}) at {dest}, or pass --data FILE")
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserInputError(f"{cache}: cannot create the cache folder ({e.strerror or e}); "
                             "pass --data FILE") from None
    try:
        data = (fetch or _urlopen)(url, timeout)
    except (OSError, ValueError) as e:  # urllib's errors are OSErrors
        raise UserInputError(f"hellaswag: cannot download the validation set ({type(e).__name__}); "
                             f"{offline}") from None
    first = data.split(b"\n", 1)[0]
    try:
        _item(json.loads(first), url, 0)
    except (ValueError, UserInputError):
        raise UserInputError(f"hellaswag: {url} did not return HellaSwag items; {offline}") from None
    atomic_write(dest, lambda f: f.write(data))
    return dest


# --------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------

def render_item(item: HellaSwagItem, tokenizer, block_size: int) -> tuple[list[list[int]], int, bool]:
    """(the four rows of context + ending tokens, the context length, truncated).

    Never fails, so that no process of a sharded evaluation stops alone: a row
    that does not fit keeps the end of its context (at least one token) and,
    only if an ending alone fills the block, the start of its ending."""
    ctx = tokenizer.encode(item.ctx)
    endings = [tokenizer.encode(" " + e) for e in item.endings]
    room = block_size - max(len(e) for e in endings)
    truncated = len(ctx) > room
    if truncated:
        ctx = ctx[-max(room, 1):]
        endings = [e[:block_size - len(ctx)] for e in endings]
    return [ctx + e for e in endings], len(ctx), truncated


@torch.no_grad()
def _score_batch(model, rendered, device, autocast_ctx, block_size: int) -> list[tuple[list[float], list[float]]]:
    rows = [row for item_rows, _, _ in rendered for row in item_rows]
    # Widths rounded up to a multiple of WIDTH_MULTIPLE: a few dozen shapes over
    # the whole set instead of one per length, so kernels tuned per shape tune rarely.
    width = min(-(-max(len(r) for r in rows) // WIDTH_MULTIPLE) * WIDTH_MULTIPLE, block_size)
    tokens = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    # mask[r, j]: position j's prediction (of token j + 1) belongs to row r's ending.
    mask = torch.zeros((len(rows), width - 1), dtype=torch.bool)
    r = 0
    for item_rows, ctx_len, _ in rendered:
        for row in item_rows:
            tokens[r, :len(row)] = torch.tensor(row)
            mask[r, ctx_len - 1:len(row) - 1] = True
            r += 1
    tokens, mask = tokens.to(device), mask.to(device)
    with autocast_ctx():
        logits, _ = model(tokens)
    out = []
    # One item at a time in fp32: bounds the memory of the upcast logits.
    for i in range(len(rendered)):
        sl = slice(i * NUM_ENDINGS, (i + 1) * NUM_ENDINGS)
        item_logits = logits[sl, :-1].float()
        losses = F.cross_entropy(item_logits.reshape(-1, item_logits.size(-1)),
                                 tokens[sl, 1:].reshape(-1), reduction="none").view(NUM_ENDINGS, -1)
        m = mask[sl]
        sums = (losses * m).sum(dim=1)
        avgs = sums / m.sum(dim=1)
        out.append((sums.tolist(), avgs.tolist()))
    return out


def _argmin(values: list[float]) -> int:
    return min(range(len(values)), key=lambda i: (values[i], i))  # ties: the first, as torch.argmin


def score_items(model, items, tokenizer, device, autocast_ctx=contextlib.nullcontext,
                batch_items: int = 8, progress=None) -> list[ItemScore]:
    """Score `items` on this process: one ItemScore each, in order. `progress`,
    when given, is called with the number of items done after each batch."""
    if batch_items < 1:
        raise UserInputError(f"--batch-items {batch_items}: must be at least 1")
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module  # scoring is per process: no gradient sync wanted
    config = dist_lib.unwrap_model(model).config
    if tokenizer.vocab_size > config.vocab_size:  # checked on every process alike, before any work
        raise UserInputError(f"hellaswag: the {tokenizer.name} tokenizer has {tokenizer.vocab_size:,} ids, the "
                             f"model's vocabulary {config.vocab_size:,} (not the tokenizer it was trained with?)")
    was_training = model.training
    model.eval()
    scores: list[ItemScore] = []
    try:
        for start in range(0, len(items), batch_items):
            batch = items[start:start + batch_items]
            rendered = [render_item(item, tokenizer, config.block_size) for item in batch]
            for item, (rows, _, truncated), (sums, avgs) in zip(
                    batch, rendered, _score_batch(model, rendered, device, autocast_ctx, config.block_size)):
                scores.append(ItemScore(ind=item.ind, label=item.label, pred=_argmin(sums),
                                        pred_norm=_argmin(avgs), sum_losses=sums, avg_losses=avgs,
                                        truncated=truncated))
            if progress is not None:
                progress(len(scores))
    finally:
        model.train(was_training)
    return scores


def evaluate_hellaswag(model, items, tokenizer, device, autocast_ctx=contextlib.nullcontext,
                       dist_info: dist_lib.DistInfo | None = None, batch_items: int = 8,
                       return_predictions: bool = False, progress=None) -> dict:
    """{"acc", "acc_norm", "n", "truncated"} over `items`, the same on every process.

    Under DDP (`dist_info.ddp`) process `rank` scores items i with
    i % world_size == rank and the results are gathered; pass the model itself,
    not its DDP wrapper. `autocast_ctx` is a callable giving a context for the
    forwards (the trainer's autocast factory). With `return_predictions`, the
    dict also holds "predictions": [{"ind", "label", "pred", "pred_norm"}] in
    file order.
    """
    info = dist_info or dist_lib.DistInfo()
    mine = list(range(info.rank, len(items), info.world_size))
    # Every process runs as many forwards as the others (an FSDP model all-gathers
    # its weights in each): a share one item short scores a repeat, then drops it.
    share = -(-len(items) // info.world_size)
    padded = [items[i] for i in mine] + [items[0]] * (share - len(mine))
    report = progress and (lambda done: progress(min(done, len(mine))))
    scores = score_items(model, padded, tokenizer, device, autocast_ctx, batch_items, report)[:len(mine)]
    rows = [(i, s.ind, s.label, s.pred, s.pred_norm, s.truncated) for i, s in zip(mine, scores)]
    gathered = sorted(row for part in dist_lib.all_gather_objects(rows, info) for row in part)
    n = len(gathered)
    result = {
        "acc": sum(label == pred for _, _, label, pred, _, _ in gathered) / n if n else 0.0,
        "acc_norm": sum(label == pred_norm for _, _, label, _, pred_norm, _ in gathered) / n if n else 0.0,
        "n": n,
        "truncated": sum(t for *_, t in gathered),
    }
    if return_predictions:
        result["predictions"] = [dict(ind=ind, label=label, pred=pred, pred_norm=pred_norm)
                                 for _, ind, label, pred, pred_norm, _ in gathered]
    return result


# --------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------

def _is_predictions_file(path: pathlib.Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(PREDICTIONS_HEAD)) == PREDICTIONS_HEAD
    except OSError:
        return False


def _check_json_dest(path, data=None) -> pathlib.Path:
    """Where --json may write, checked before scoring (which can take an hour): a
    new file in a writable folder, or a predictions file this command wrote
    before and that is not read-only. Anything else is refused, never replaced."""
    dest = pathlib.Path(path)
    shown = f"--json {dest}"
    if dest.is_dir():
        raise UserInputError(f"{shown}: is a folder; give a file name")
    folder = dest.parent
    if not folder.is_dir():
        raise UserInputError(f"{shown}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserInputError(f"{shown}: cannot write into {folder} (permission denied)")
    if dest.exists():
        if data and pathlib.Path(data).exists() and dest.resolve() == pathlib.Path(data).resolve():
            raise UserInputError(f"{shown}: is the --data file; writing the predictions would replace the dataset")
        if not _is_predictions_file(dest):
            raise UserInputError(f"{shown}: exists and is not a predictions file of this command; not replaced "
                                 "(give a new file name)")
        # Mode bits, not only os.access: a file marked read-only says "keep me",
        # also to root, whom os.access lets write anything.
        if not os.access(dest, os.W_OK) or not dest.stat().st_mode & 0o222:
            raise UserInputError(f"{shown}: is read-only; not replaced")
    return dest


PREDICTIONS_HEAD = b'{"acc": '


def predictions_json(result: dict) -> str:
    """{"acc", "acc_norm", "n", "predictions": [...]} with one prediction a line
    (it starts with PREDICTIONS_HEAD, by which --json recognises its own files)."""
    head = ", ".join(f"{json.dumps(k)}: {json.dumps(result[k])}" for k in ("acc", "acc_norm", "n"))
    preds = ",\n".join("  " + json.dumps(p) for p in result["predictions"])
    return "{" + head + ', "predictions": [\n' + preds + "\n]}\n"


def run_hellaswag(args, out=None, err=None) -> dict:
    from engine.load import autocast_context, load_model, resolve_device
    from engine.tokenizer import tokenizer_for_model

    out, err = out or sys.stdout, err or sys.stderr
    json_dest = _check_json_dest(args.json, args.data) if args.json else None
    if args.batch_items < 1:
        raise UserInputError(f"--batch-items {args.batch_items}: must be at least 1")
    device = resolve_device(args.device)
    info = dist_lib.init_distributed(device.type)
    try:
        device = torch.device(dist_lib.process_device(str(device), info))
        say = (lambda *a: print(*a, file=err, flush=True)) if info.master else (lambda *a: None)
        data = args.data
        if not data:
            # Rank 0 downloads; every rank learns the path, or the error, from it.
            fetched = None
            if info.master:
                try:
                    fetched = ("path", str(fetch_hellaswag()))
                except UserInputError as e:
                    fetched = ("error", str(e))
            kind, data = dist_lib.broadcast_object(fetched, info)
            if kind == "error":
                raise UserInputError(data)
        items = load_hellaswag(data, args.limit)
        autocast = autocast_context(args.dtype, device)
        model, tokenizer_name, description = load_model(args.model, device=device, backend=args.backend)
        tokenizer, _ = tokenizer_for_model("auto", tokenizer_name, args.model)
        share = len(range(info.rank, len(items), info.world_size))
        say(f"model: {description}")
        say(f"hellaswag: {len(items):,} items from {data} | tokenizer {tokenizer.name} | device {device} | "
            f"backend {model.backend} | {args.batch_items} items per forward"
            + (f" | {info.world_size} processes" if info.ddp else ""))
        start = time.perf_counter()
        step = max(1, share // 10)
        reported = [0]

        def progress(done):
            if done - reported[0] >= step or done == share:
                reported[0] = done
                say(f"  {done:,}/{share:,} items scored ({time.perf_counter() - start:.0f} s)")

        result = evaluate_hellaswag(model, items, tokenizer, device, autocast, info, args.batch_items,
                                    return_predictions=json_dest is not None, progress=progress)
        seconds = time.perf_counter() - start
        if info.master:
            if result["truncated"]:
                say(f"note: {result['truncated']} item(s) had their context cut from the left to fit the "
                    f"model's block size {model.config.block_size}")
            # The result first: a failed write must not lose an hour of scoring.
            print(f"hellaswag: {result['n']} items | acc {result['acc']:.4f} | acc_norm "
                  f"{result['acc_norm']:.4f} | {seconds:.1f} s"
                  + (f" | predictions: {json_dest}" if json_dest is not None else ""), file=out, flush=True)
            if json_dest is not None:
                try:
                    atomic_write(json_dest, lambda f: f.write(predictions_json(result).encode()))
                except OSError as e:
                    raise RunFileError(f"--json {json_dest}: could not write the predictions ({os_reason(e)}); "
                                       "the result above stands") from None
        return result
    finally:
        dist_lib.destroy(info)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_hellaswag(args)
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

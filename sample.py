"""Sample from a trained GPT-2: `python sample.py SOURCE [--prompt TEXT] [...]`.

SOURCE is a run folder (its newest checkpoint that loads), a checkpoint file
(ckpt_NNNNNN.pt) or a Hugging Face GPT-2 folder. The text is encoded with the
tokenizer the model was trained with (a Hugging Face folder: GPT-2 BPE). Tokens
are printed as they are generated, one sample after another (or, with
--batch, all samples in one batch, printed when it is done), with the KV cache;
generation of a sample stops at the end-of-text token. Samples go to stdout;
the model line and the closing speed line (tokens/s, time to first token) go
to stderr.

Exit status: 0 done, 2 bad input (one `error: ...` line, no traceback),
130 interrupted.
"""
from __future__ import annotations

import argparse
import codecs
import os
import sys
import time

from engine.errors import UserInputError
from engine.cli import add_model_flags

SEPARATOR = "\n---------------\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sample.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False,
        description="Generate text from a run folder, a checkpoint file or a Hugging Face GPT-2 folder.")
    p.add_argument("source", metavar="SOURCE",
                   help="run folder, checkpoint file (ckpt_NNNNNN.pt) or Hugging Face GPT-2 folder")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="", metavar="TEXT",
                        help="text to continue (empty: start a new document at <|endoftext|>, or at a "
                             "newline for a byte-level model)")
    prompt.add_argument("--prompt-file", metavar="FILE", help="read the prompt from a UTF-8 text file")
    p.add_argument("--num-samples", type=int, metavar="N", default=3, help="how many samples")
    p.add_argument("--max-new-tokens", type=int, metavar="N", default=200, help="tokens generated per sample")
    p.add_argument("--temperature", type=float, metavar="T", default=0.8, help="0 = greedy (always the likeliest token)")
    p.add_argument("--top-k", type=int, metavar="K", default=200, help="sample among the k likeliest tokens (0: all)")
    p.add_argument("--top-p", type=float, metavar="P", default=1.0, help="nucleus sampling: the smallest set of tokens "
                                                            "whose probability reaches p (1: all)")
    p.add_argument("--seed", type=int, metavar="S", default=1337, help="sample i uses seed + i (with --batch: seed)")
    add_model_flags(p)
    p.add_argument("--batch", action="store_true",
                   help="generate all samples in one batch (faster; printed when the batch is done)")
    return p


def check_args(args) -> None:
    if args.num_samples < 1:
        raise UserInputError(f"--num-samples {args.num_samples}: must be at least 1")
    if args.max_new_tokens < 0:
        raise UserInputError(f"--max-new-tokens {args.max_new_tokens}: must be 0 or more")
    if not 0 <= args.temperature < float("inf"):
        raise UserInputError(f"--temperature {args.temperature}: must be a finite number, 0 (greedy) or more")
    if args.top_k < 0:
        raise UserInputError(f"--top-k {args.top_k}: must be 0 (no limit) or more")
    if not 0.0 < args.top_p <= 1.0:
        raise UserInputError(f"--top-p {args.top_p}: must be in (0, 1]")
    if not 0 <= args.seed < 2 ** 63 - args.num_samples:
        raise UserInputError(f"--seed {args.seed}: must be in [0, 2^63 - num_samples)")


def read_prompt(args) -> tuple[str, str]:
    """(prompt text, what to call it in messages)."""
    if args.prompt_file is None:
        return args.prompt, "--prompt"
    what = f"--prompt-file {args.prompt_file}"
    try:
        data = open(args.prompt_file, "rb").read()
    except FileNotFoundError:
        raise UserInputError(f"{what}: no such file") from None
    except OSError as e:
        raise UserInputError(f"{what}: cannot read it ({e.strerror or e})") from None
    try:
        return data.decode("utf-8"), what
    except UnicodeDecodeError as e:
        raise UserInputError(f"{what}: byte {e.start} is not UTF-8 text ({data[e.start]:#04x}); "
                             "save the prompt as UTF-8") from None


def encode_prompt(text: str, what: str, tokenizer, model) -> list[int]:
    from engine.tokenizer import check_encodable
    check_encodable(text, what)
    ids = tokenizer.encode(text)
    if not ids:  # start a new document
        ids = [tokenizer.eot_token] if tokenizer.eot_token is not None else tokenizer.encode("\n")
    block, vocab = model.config.block_size, model.config.vocab_size
    if len(ids) > block:
        raise UserInputError(f"{what}: the prompt is {len(ids)} {tokenizer.name} tokens; the model's "
                             f"block size is {block}: shorten it")
    if max(ids) >= vocab:
        raise UserInputError(f"{what}: token id {max(ids)} of the {tokenizer.name} tokenizer is outside "
                             f"the model's vocabulary of {vocab}")
    return ids


class RowPrinter:
    """Writes one sample's tokens as they come: bytes through an incremental
    UTF-8 decoder, so a character split across tokens prints whole; ids the
    tokenizer does not define print as <|id|>; stops at the end-of-text token."""

    def __init__(self, tokenizer, out):
        self.tokenizer, self.out = tokenizer, out
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.done = False
        self.count = 0
        self.ids: list[int] = []

    def _bytes(self, token: int) -> bytes:
        try:
            return self.tokenizer.decode_bytes([token])
        except ValueError:
            return f"<|{token}|>".encode()

    def push(self, token: int, write: bool = True) -> None:
        if self.done:
            return
        self.count += 1
        if token == self.tokenizer.eot_token:
            self.done = True
            return
        self.ids.append(token)
        if write:
            self.out.write(self.decoder.decode(self._bytes(token)))
            self.out.flush()

    def text(self) -> str:
        return b"".join(self._bytes(t) for t in self.ids).decode("utf-8", errors="replace")

    def close(self) -> None:
        self.out.write(self.decoder.decode(b"", final=True))


def run(args, out=None, err=None) -> None:
    import torch

    from engine.generate import generate
    from engine.load import autocast_context, load_model, resolve_device
    from engine.tokenizer import tokenizer_for_model

    out, err = out or sys.stdout, err or sys.stderr
    check_args(args)
    text, what = read_prompt(args)
    device = resolve_device(args.device)
    autocast = autocast_context(args.dtype, device)
    model, tokenizer_name, description = load_model(args.source, device=device, backend=args.backend)
    tokenizer, _ = tokenizer_for_model("auto", tokenizer_name, args.source)
    ids = encode_prompt(text, what, tokenizer, model)
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    print(f"model: {description}", file=err)
    print(f"tokenizer: {tokenizer.name} | device: {device} | backend: {model.backend} | dtype: {dtype} | "
          f"prompt: {len(ids)} token{'' if len(ids) == 1 else 's'}", file=err, flush=True)

    rows = args.num_samples if args.batch else 1
    idx = torch.tensor([ids] * rows, dtype=torch.long, device=device)
    settings = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_k=args.top_k or None, top_p=args.top_p if args.top_p < 1.0 else None,
                    eos_token=tokenizer.eot_token)
    if device.type == "cuda":  # kernels compile and autotune outside the timed region
        with autocast():
            generate(model, idx, **{**settings, "max_new_tokens": min(2, args.max_new_tokens)}, seed=0)

    def timed_generate(printers, seed, stream):
        first = []
        start = time.perf_counter()

        def on_token(tokens):
            if not first:
                first.append(time.perf_counter() - start)
            for printer, token in zip(printers, tokens[:, 0].tolist()):
                printer.push(token, write=stream)

        with autocast():
            generate(model, idx, seed=seed, on_token=on_token, **settings)
        return time.perf_counter() - start, (first[0] if first else None)

    elapsed, firsts, printers = 0.0, [], []
    if args.batch:
        printers = [RowPrinter(tokenizer, out) for _ in range(rows)]
        seconds, first = timed_generate(printers, args.seed, stream=False)
        elapsed += seconds
        firsts += [first] if first is not None else []
        for i, printer in enumerate(printers):
            out.write((SEPARATOR if i else "") + text + printer.text())
        out.write("\n")
    else:
        for i in range(args.num_samples):
            out.write((SEPARATOR if i else "") + text)
            out.flush()
            printer = RowPrinter(tokenizer, out)
            printers.append(printer)
            seconds, first = timed_generate([printer], args.seed + i, stream=True)
            printer.close()
            elapsed += seconds
            firsts += [first] if first is not None else []
        out.write("\n")
    out.flush()

    generated = sum(p.count for p in printers)
    speed = f"{generated / elapsed:.1f} tokens/s" if elapsed > 0 and generated else "no tokens generated"
    if firsts:
        mean_first = sum(firsts) / len(firsts)
        of = f" (mean of {len(firsts)} samples)" if len(firsts) > 1 else ""
        ttft = f"time to first token {mean_first * 1000:.1f} ms{of}"
    else:
        ttft = "time to first token: none generated"
    print(f"{generated} tokens in {elapsed:.2f} s: {speed} | {ttft}", file=err, flush=True)


def _out_of_memory(e: BaseException) -> bool:
    import torch
    # torch.OutOfMemoryError is the CUDA allocator's; the CPU allocator raises a
    # plain RuntimeError ("DefaultCPUAllocator: can't allocate memory: ...").
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(e)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # A terminal or pipe that cannot show a character gets an escape, not a crash.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        run(args)
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly; point stdout at devnull
        # so the interpreter's final flush does not complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (MemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise
        print("error: out of memory; use fewer --num-samples, no --batch, or a smaller model",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The data loader: (B, T) int64 batches from text or token shards.

Two sources behind one loader (`TokenLoader`, built by `build_loader`):

- **text**: a UTF-8 text file (or a folder of them) tokenized once in memory,
  served in order like build-nanogpt's DataLoaderLite; the last `val_fraction`
  of the tokens is the val split.
- **shards**: uint16 `.bin` files written by `python -m engine.data prepare`
  (or llm.c's scripts), or build-nanogpt's `.npy` shards, memory-mapped and
  streamed across shard boundaries, shard order shuffled per epoch from a seed.

Both sources are one token stream per epoch, read in rows of B*T+1 tokens (the
B*T tokens of a batch and the next one, its last target): row j of an epoch
starts at token j*B*T, and an epoch holds (tokens - 1) // (B*T) rows. The rows
of all epochs, one after another, are the global stream; under torchrun, rank r
reads row `position + r` and every rank advances `position` by world_size, so
the ranks see disjoint rows and the stream does not depend on how many
processes read it. A loader's state is that global position (a token offset of
position*B*T), the same on every rank: a run saved at N processes continues at
M exactly where the stream stopped.

Every problem with the user's files raises `UserInputError` naming the file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from engine.data.shards import SHARD_SUFFIXES, SPLIT_TAG, check_manifest, list_shards, open_shard, read_shard_header
from engine.data.text import find_text_files, tokenize_file
from engine.errors import UserInputError
from engine.tokenizer import data_tokenizer_mismatch, load_tokenizer

_KNOWN_VOCAB = {"gpt2": 50257, "bytes": 256}


class TokenLoader:
    """(B, T) int64 batches from a token stream made of named pieces (a text
    split, or shards), rank-aware and resumable.

    An epoch holds `rows_per_epoch` rows of B*T tokens (the tokens past the last
    whole row are skipped that epoch), `batches_per_epoch` whole global steps.
    With `shuffle`, the pieces' order is a permutation drawn from (seed, epoch),
    identical on all ranks. `epoch` is the epoch of the batch read last.
    """

    def __init__(self, pieces, B: int, T: int, *, rank: int = 0, world_size: int = 1,
                 shuffle: bool = False, seed: int = 0, vocab_size: int | None = None,
                 kind: str = "text", split: str = "train", source: str = "",
                 summary: str = "", pin_memory: bool = False):
        for name, v, lo in (("B", B, 1), ("T", T, 1), ("world_size", world_size, 1)):
            if not isinstance(v, (int, np.integer)) or v < lo:
                raise UserInputError(f"data loader: {name} must be an integer >= {lo}, got {v!r}")
        if not 0 <= rank < world_size:
            raise UserInputError(f"data loader: rank {rank} is outside 0..{world_size - 1}")
        self.B, self.T, self.rank, self.world_size = int(B), int(T), int(rank), int(world_size)
        self.names = [n for n, _ in pieces]
        self._arrays = [a for _, a in pieces]
        self._lengths = np.array([len(a) for a in self._arrays], dtype=np.int64)
        self.num_tokens = int(self._lengths.sum())
        self.shuffle, self.seed = bool(shuffle), int(seed)
        self.vocab_size, self.kind, self.split, self.source = vocab_size, kind, split, source
        self.pin_memory = bool(pin_memory) and torch.cuda.is_available()
        step = self.B * self.T * self.world_size
        need = step + 1
        if self.num_tokens < need:
            raise UserInputError(
                f"{source}: the {split} split has {self.num_tokens:,} tokens; one batch needs "
                f"B*T*world_size+1 = {need:,} (B={self.B}, T={self.T}, world_size={self.world_size}); "
                "use a larger corpus or a smaller batch/sequence length")
        self.rows_per_epoch = (self.num_tokens - 1) // (self.B * self.T)
        self.batches_per_epoch = self.rows_per_epoch // self.world_size
        self.tokens_per_epoch = self.rows_per_epoch * self.B * self.T  # all ranks together
        self.description = (
            f"{summary}; B={self.B} T={self.T} rank {self.rank}/{self.world_size}: "
            f"{self.batches_per_epoch:,} batches ({self.tokens_per_epoch:,} tokens) per epoch")
        self.reset()

    def reset(self):
        """Back to the first batch of epoch 0 (e.g. before each evaluation)."""
        self.position = 0  # rows read by all ranks together: the global stream's offset
        self.epoch = 0
        self._set_order(self._epoch_order(0))

    def _epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self._arrays)))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self._arrays)).tolist()

    def _set_order(self, order: list[int]):
        self._order = order
        self._starts = np.concatenate([[0], np.cumsum(self._lengths[order])])

    def _read(self, a: int, b: int) -> np.ndarray:
        out = np.empty(b - a, dtype=np.int64)
        k = int(np.searchsorted(self._starts, a, side="right")) - 1
        filled = 0
        while filled < b - a:
            piece = self._order[k]
            lo = a + filled - int(self._starts[k])
            take = min(b - a - filled, int(self._lengths[piece]) - lo)
            chunk = self._arrays[piece][lo:lo + take]
            if self.vocab_size is not None and take and int(chunk.max()) >= self.vocab_size:
                raise UserInputError(
                    f"{self.source}: {self.names[piece]} holds token id {int(chunk.max())}, outside the "
                    f"tokenizer's vocabulary of {self.vocab_size}")
            out[filled:filled + take] = chunk
            filled += take
            k += 1
        return out

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y): int64 CPU tensors of shape (B, T); y is x shifted by one token."""
        epoch, row = divmod(self.position + self.rank, self.rows_per_epoch)
        if epoch != self.epoch:
            self.epoch = epoch
            self._set_order(self._epoch_order(epoch))
        BT = self.B * self.T
        buf = torch.from_numpy(self._read(row * BT, row * BT + BT + 1))
        if self.pin_memory:
            buf = buf.pin_memory()
        self.position += self.world_size
        return buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)

    def state_dict(self) -> dict:
        """Everything needed to continue with the same global stream; the same on
        every rank, and valid at any world size."""
        return {"version": 2, "kind": self.kind, "split": self.split, "B": self.B, "T": self.T,
                "world_size": self.world_size, "num_tokens": self.num_tokens,
                "shuffle": self.shuffle, "seed": self.seed,
                "token_offset": self.position * self.B * self.T,  # into the global stream
                # the epoch of the batch read last, and its order of the pieces
                "epoch": self.epoch, "order": [self.names[i] for i in self._order]}

    def load_state_dict(self, state: dict):
        """Continue where `state` (from `state_dict` of any rank, at any world size)
        left off. Its seed and shuffle setting win, so later epochs repeat the
        saved run's order."""
        mine = {"kind": self.kind, "B": self.B, "T": self.T, "num_tokens": self.num_tokens}
        diff = [f"{k}={state.get(k)!r} (now {v!r})" for k, v in mine.items() if state.get(k) != v]
        if diff:
            raise UserInputError(
                f"{self.source}: cannot resume the data loader: the checkpoint's loader had "
                + ", ".join(diff) + "; resume with the same data, batch size and sequence length")
        index = {n: i for i, n in enumerate(self.names)}
        order = state["order"]
        if len(self.names) == 1 == len(order):
            order = self.names  # one piece: its name (the file's, which may have moved) orders nothing
        if sorted(order) != sorted(self.names):
            raise UserInputError(
                f"{self.source}: cannot resume the data loader: the checkpoint's shards differ "
                "from the ones found now")
        self.shuffle, self.seed = bool(state["shuffle"]), int(state["seed"])
        if "token_offset" in state:
            self.position = int(state["token_offset"]) // (self.B * self.T)
        else:  # version 1: the epoch, and the batches each of world_size ranks read in it
            self.position = int(state["epoch"]) * self.rows_per_epoch + int(state["batch"]) * int(state["world_size"])
        self.epoch = int(state["epoch"])
        self._set_order([index[n] for n in order])

    def __repr__(self) -> str:
        return f"TokenLoader({self.description})"


def _vocab_of(tokenizer) -> int | None:
    if isinstance(tokenizer, str):
        return _KNOWN_VOCAB.get(tokenizer)
    return getattr(tokenizer, "vocab_size", None)


def _resolve_tokenizer(tokenizer):
    if isinstance(tokenizer, str):
        return load_tokenizer(tokenizer)[0]
    return tokenizer


def _shard_pieces(paths: list[Path], tokenizer, requested_tokenizer: str = ""):
    want = _vocab_of(tokenizer)
    pieces, vocab = [], None
    for p in paths:
        ntok, v = read_shard_header(p)
        if v and want and v != want:
            name = tokenizer if isinstance(tokenizer, str) else tokenizer.name
            raise UserInputError(data_tokenizer_mismatch(str(p), v, name, want, requested=requested_tokenizer))
        vocab = vocab or v or want
        # Names without their folder, so a resumed run may find the data moved.
        pieces.append((p.name, open_shard(p)))
    return pieces, vocab


def build_loader(data_path, B: int, T: int, split: str = "train", rank: int = 0,
                 world_size: int = 1, tokenizer="gpt2", val_fraction: float = 0.1,
                 seed: int = 0, shuffle: bool | None = None,
                 pin_memory: bool = False, requested_tokenizer: str = "") -> TokenLoader:
    """A `TokenLoader` for `split` ("train" or "val") of `data_path`.

    - a folder of `*_train_*.bin` / `*_val_*.bin` shards (or build-nanogpt's
      `*_train_*.npy` / `*_val_*.npy`): those shards, the train split shuffled
      per epoch (`shuffle=None` means: train only); a folder whose manifest.json
      lists a missing shard (an interrupted prepare) is refused;
    - a single `.bin` or `.npy`: named `..._train...` or `..._val...`, it and its sibling
      for the other split; otherwise its tokens split like a text file;
    - a text file, or a folder of text files without shards: tokenized with
      `tokenizer` (a tokenizer object or "gpt2"/"bytes"/"auto"), the last
      `val_fraction` of the tokens being the val split.
    Shards written by another tokenizer are refused; `requested_tokenizer` (the
    run's --tokenizer) lets the message say why an `auto` run has the one it has.
    """
    if split not in ("train", "val"):
        raise UserInputError(f"build_loader: split must be 'train' or 'val', got {split!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise UserInputError(f"build_loader: val_fraction must be in [0, 1), got {val_fraction}")
    path = Path(data_path)
    if not path.exists():
        raise UserInputError(f"{path}: no such file or directory")
    shuffle = (split == "train") if shuffle is None else shuffle
    common = dict(B=B, T=T, rank=rank, world_size=world_size, split=split, source=str(path),
                  pin_memory=pin_memory)

    if path.is_dir():
        bins = list_shards(path)
        if check_manifest(path) is not None or bins:
            mine = [p for p in bins if (m := SPLIT_TAG.search(p.name)) and m.group(1) == split]
            if not mine:
                kind = bins[0].suffix if bins else ".bin"
                raise UserInputError(
                    f"{path}: none of its {len(bins)} {kind} files is a {split} shard "
                    f"(named *_{split}_*{kind})")
            pieces, vocab = _shard_pieces(mine, tokenizer, requested_tokenizer)
            n = sum(len(a) for _, a in pieces)
            order = f"shuffled per epoch (seed {seed})" if shuffle else "in order"
            return TokenLoader(pieces, shuffle=shuffle, seed=seed, vocab_size=vocab, kind="shards",
                               summary=f"shards {path}: {len(pieces)} {split} shards, {n:,} tokens, {order}",
                               **common)
        try:
            files = find_text_files([path])
        except UserInputError:
            raise UserInputError(
                f"{path}: no token shards (*_train_*.bin, *_val_*.bin or .npy) and no text files in "
                "this folder") from None
        tok = _resolve_tokenizer(tokenizer)
        parts = [tokenize_file(f, tok, document_eot=True) for f in files if f.stat().st_size]
        if not parts:
            raise UserInputError(f"{path}: all text files in this folder are empty")
        return _text_loader(np.concatenate(parts), tok, path, f"{len(files)} text files in {path}",
                            val_fraction, common)

    if path.suffix in SHARD_SUFFIXES:
        check_manifest(path.parent)
        tag = SPLIT_TAG.search(path.name)
        if tag:
            if tag.group(1) != split:
                a, b = tag.span(1)
                sibling = path.with_name(path.name[:a] + split + path.name[b:])
                if not sibling.is_file():
                    raise UserInputError(
                        f"{path}: is a {tag.group(1)} shard; the {split} split needs {sibling.name} "
                        "beside it, which does not exist")
                path = sibling
            pieces, vocab = _shard_pieces([path], tokenizer, requested_tokenizer)
            return TokenLoader(pieces, vocab_size=vocab, kind="shards",
                               summary=f"shard {path}: {len(pieces[0][1]):,} tokens", **common)
        pieces, vocab = _shard_pieces([path], tokenizer, requested_tokenizer)
        return _split_loader(pieces[0][1], path, f"shard {path}", val_fraction, common, vocab)

    tok = _resolve_tokenizer(tokenizer)
    return _text_loader(tokenize_file(path, tok), tok, path, f"text {path}", val_fraction, common)


def _split_loader(tokens, path: Path, what: str, val_fraction: float, common: dict,
                  vocab: int | None, tokenizer_name: str = "") -> TokenLoader:
    n = len(tokens)
    n_val = int(n * val_fraction)
    split = common["split"]
    if split == "val" and n_val == 0:
        raise UserInputError(
            f"{path}: the val split is empty ({n:,} tokens, val_fraction={val_fraction})")
    part = tokens[n - n_val:] if split == "val" else tokens[:n - n_val]
    where = f"last {val_fraction:.0%}" if split == "val" else f"first {1 - val_fraction:.0%}"
    tn = f" ({tokenizer_name} tokenizer)" if tokenizer_name else ""
    summary = f"{what}: {n:,} tokens{tn}; {split} split = {where}, {len(part):,} tokens"
    return TokenLoader([(path.name, part)], vocab_size=vocab, kind="text", summary=summary, **common)


def _text_loader(tokens, tok, path: Path, what: str, val_fraction: float, common: dict):
    # Our own tokenizer made these ids, so the per-batch vocabulary check is moot.
    return _split_loader(tokens, path, what, val_fraction, common, None, tok.name)

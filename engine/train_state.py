"""What a training checkpoint holds, and how a run resumes from one.

The checkpoint's `train_config` is the source of truth of a resumed run: every
field the user did not give takes its stored value (data path, tokenizer, batch
geometry, schedule, seed, ...). A field the user gave that is resume-safe
(engine.train_config.resume_safe_fields) replaces the stored value; one that
is not, and differs, is refused in one line naming it. `resume`, `run_dir`,
`overwrite` and `profile` describe this invocation, never the stored run.
The data may move: `--data NEWPATH` is accepted when its content hash
(engine.data.fingerprint) equals the one the checkpoint recorded.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import time

import torch

from engine import checkpoint as ckpt_lib
from engine.data.fingerprint import content_hash
from engine.errors import UserInputError
from engine.train_config import TrainConfig, resume_safe_fields

PER_INVOCATION = ("resume", "run_dir", "overwrite", "profile")


def explicit_fields(cfg: TrainConfig, explicit=None) -> frozenset[str]:
    """The fields the user gave: `explicit` as train.py parsed it, or, for a
    TrainConfig built in code, the fields that differ from their defaults."""
    if explicit is not None:
        return frozenset(explicit)
    return frozenset(f.name for f in dataclasses.fields(TrainConfig) if getattr(cfg, f.name) != f.default)


def _same(name: str, given, stored) -> bool:
    if name == "data":
        return bool(given) and bool(stored) and os.path.abspath(given) == os.path.abspath(stored)
    if name == "betas":
        return [float(b) for b in given] == [float(b) for b in stored]
    if isinstance(given, float) or isinstance(stored, float):
        return isinstance(stored, (int, float)) and float(given) == float(stored)
    return given == stored


def _moved_data(cfg: TrainConfig, explicit: frozenset[str], state: dict, path, log) -> str | None:
    """The run's data at a new path (--data NEWPATH whose content hash is the run's),
    or None when it stays where it was; a run whose data is gone says what to do."""
    stored = state["train_config"].get("data")
    if not stored:
        return None
    if "data" not in explicit or not cfg.data or _same("data", cfg.data, stored):
        if not os.path.exists(stored):
            raise UserInputError(f"resume: the run's data {stored} is no longer there (moved or deleted?); give "
                                 "--data NEWPATH: data with the same content (checked by its hash) continues the run")
        return None
    recorded = state.get("data_hash")
    if not recorded:
        raise UserInputError(f"resume: --data {cfg.data}: the run's data is {stored}, and {path} predates content "
                             f"hashes, so data elsewhere cannot be recognised as the same; put it back at {stored}")
    try:
        now = content_hash(cfg.data)
    except OSError as e:
        raise UserInputError(f"resume: --data {cfg.data}: cannot read it ({e.strerror or e})") from None
    if now != recorded:
        raise UserInputError(f"resume: --data {cfg.data}: not the run's data (its content hash differs from that "
                             f"of {stored}); a resumed run keeps its data")
    log(f"resume: the run's data has moved: {stored} -> {cfg.data} (same content hash)")
    return cfg.data


def resumed_config(cfg: TrainConfig, explicit: frozenset[str], state: dict, path, log=print) -> TrainConfig:
    """The configuration a resumed run continues with (see the module docstring)."""
    stored = state["train_config"]
    safe = set(resume_safe_fields())
    moved = _moved_data(cfg, explicit, state, path, log)
    values, conflicts = {}, []
    for f in dataclasses.fields(TrainConfig):
        name, given = f.name, getattr(cfg, f.name)
        if name in PER_INVOCATION or name not in stored:
            values[name] = given
        elif name == "data" and moved:
            values[name] = moved
        elif name not in explicit:
            values[name] = stored[name]
        elif name in safe:
            values[name] = given
        else:
            values[name] = stored[name]
            # "auto" for a fixed field means: whatever the run used.
            if given not in (None, "auto") and not _same(name, given, stored[name]):
                conflicts.append((name, given, stored[name]))
    if conflicts:
        given_text = ", ".join(f"--{n.replace('_', '-')} {g}" for n, g, _ in conflicts)
        stored_text = ", ".join(f"{n} = {s!r}" for n, _, s in conflicts)
        allowed = ", ".join("--" + n.replace("_", "-") for n in sorted(safe - set(PER_INVOCATION)))
        raise UserInputError(
            f"resume: {given_text} would change the run in {path}, which has {stored_text}; a resumed run "
            f"keeps its model, data and schedule: drop these flags (it may change only {allowed})")
    values["init_from"] = ""  # the weights come from the checkpoint
    try:
        return TrainConfig(**values)
    except UserInputError as e:
        raise UserInputError(f"resume: {path}: {e}") from None


def training_state(trainer, step: int) -> dict:
    """Everything a checkpoint holds: weights, optimizer, loaders, RNG, configs."""
    return {
        "version": ckpt_lib.FORMAT_VERSION,
        "step": step,
        "model": trainer.raw_model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "train_loader": trainer.train_loader.state_dict(),
        "val_loader": trainer.val_loader.state_dict(),
        "rng": ckpt_lib.rng_state(),
        "train_config": trainer.cfg.to_dict(),
        "model_config": trainer.model_config.to_dict(),
        "tokenizer": trainer.tokenizer.name,
        "run_id": trainer.run_id,
        "data_hash": trainer.data.data_hash,
        "world_size": trainer.dist.world_size,
        "bad_streak": trainer.bad_streak,
    }


def restore(trainer, state: dict, path) -> None:
    """Load a checkpoint's state into a freshly built trainer; a state that does not
    fit is 'not a training checkpoint of this engine', never a KeyError."""
    if state.get("tokenizer") not in (None, trainer.tokenizer.name):
        raise UserInputError(f"resume: {path} was trained with the {state['tokenizer']} tokenizer, "
                             f"this run uses {trainer.tokenizer.name}")
    try:
        trainer.raw_model.load_state_dict(state["model"])
        # Keep this run's learning-rate objects (device tensors when capturable):
        # load_state_dict would replace them with the saved ones.
        lrs = [g["lr"] for g in trainer.optimizer.param_groups]
        trainer.optimizer.load_state_dict(state["optimizer"])
        for g, lr in zip(trainer.optimizer.param_groups, lrs):
            g["lr"] = lr
        trainer.train_loader.load_state_dict(state["train_loader"])
        trainer.val_loader.load_state_dict(state["val_loader"])
        ckpt_lib.set_rng_state(state["rng"])
    except UserInputError:
        raise
    except (KeyError, ValueError, RuntimeError, TypeError, IndexError, AttributeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ckpt_lib.CheckpointError(path, f"its state does not fit this model: {type(e).__name__}: {first}",
                                       damaged=False) from None
    trainer.step = int(state["step"])
    trainer.bad_streak = int(state.get("bad_streak", 0))


def set_aside_later_checkpoints(run_dir: pathlib.Path, step: int, log=print) -> None:
    """Resuming from an earlier checkpoint abandons the steps after it (and a damaged
    later checkpoint): those files move to superseded/ (kept, never deleted), so that
    `--resume RUN_DIR` keeps meaning this run's latest step."""
    later = [p for p in ckpt_lib.list_checkpoints(run_dir) if ckpt_lib.checkpoint_step(p) > step]
    if not later:
        return
    aside = run_dir / "superseded" / time.strftime("%Y%m%d-%H%M%S")
    aside.mkdir(parents=True, exist_ok=True)
    for p in later:
        os.replace(p, aside / p.name)
    log(f"resume: moved {len(later)} later checkpoint(s) of the abandoned steps to {aside}")


def weights_are_finite(model: torch.nn.Module) -> bool:
    """One host sync: every parameter finite (checked before a checkpoint is written)."""
    flags = [torch.isfinite(p).all() for p in model.parameters()]
    return bool(torch.stack(flags).all()) if flags else True

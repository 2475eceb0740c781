"""What a training checkpoint holds, and how a run resumes from one.

The checkpoint's `train_config` is the source of truth of a resumed run: every
field the user did not give takes its stored value (data path, tokenizer, batch
geometry, schedule, seed, ...). A field the user gave that is resume-safe
(engine.train_config.resume_safe_fields) replaces the stored value; one that
is not, and differs, is refused in one line naming it. `resume`, `run_dir`,
`overwrite` and `profile` describe this invocation, never the stored run.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import time

import torch

from engine import checkpoint as ckpt_lib
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


def resumed_config(cfg: TrainConfig, explicit: frozenset[str], state: dict, path) -> TrainConfig:
    """The configuration a resumed run continues with (see the module docstring)."""
    stored = state["train_config"]
    safe = set(resume_safe_fields())
    values, conflicts = {}, []
    for f in dataclasses.fields(TrainConfig):
        name, given = f.name, getattr(cfg, f.name)
        if name in PER_INVOCATION or name not in stored:
            values[name] = given
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
    if "lr_decay_steps" not in stored and "lr_decay_steps" not in explicit:
        # A checkpoint from before lr_decay_steps existed: its cosine spanned its max_steps.
        values["lr_decay_steps"] = stored.get("max_steps")
    values["init_from"] = ""  # the weights come from the checkpoint
    try:
        return TrainConfig(**values)
    except UserInputError as e:
        raise UserInputError(f"resume: {path}: {e}") from None


def schedule_note(stored: dict, cfg: TrainConfig, step: int) -> str | None:
    """What a resumed run's new max_steps does to its learning rate, in one line
    (None when max_steps is unchanged)."""
    old = stored.get("max_steps")
    if not isinstance(old, int) or cfg.max_steps == old:
        return None
    decay = cfg.lr_decay_steps if cfg.lr_decay_steps is not None else cfg.max_steps
    head = f"resume: max_steps {old} -> {cfg.max_steps}"
    if decay == stored.get("lr_decay_steps", old):
        if cfg.max_steps <= decay:
            return f"{head}; the learning rate keeps its schedule (cosine over {decay} steps)"
        return (f"{head}: the learning rate keeps its schedule, so steps {max(step, decay)}..{cfg.max_steps - 1} "
                f"run at its floor min_lr (the cosine ends at step {decay}); --lr-decay-steps {cfg.max_steps} "
                f"re-plans the cosine over {cfg.max_steps} steps instead")
    return (f"{head}: --lr-decay-steps {decay} re-plans the cosine over {decay} steps (it was "
            f"{stored.get('lr_decay_steps', old)}): the learning rate from step {step} on follows the new curve")


def training_state(step: int, *, cfg: TrainConfig, model, optimizer, loaders, tokenizer_name: str,
                   world_size: int, bad_streak: int) -> dict:
    """Everything a checkpoint holds: weights, optimizer, loaders (train, val), RNG, configs."""
    train_loader, val_loader = loaders
    return {
        "version": ckpt_lib.FORMAT_VERSION,
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "train_loader": train_loader.state_dict(),
        "val_loader": val_loader.state_dict(),
        "rng": ckpt_lib.rng_state(),
        "train_config": cfg.to_dict(),
        "model_config": model.config.to_dict(),
        "tokenizer": tokenizer_name,
        "world_size": world_size,
        "bad_streak": bad_streak,
    }


def restore(state: dict, path, *, model, optimizer, loaders, tokenizer_name: str) -> tuple[int, int]:
    """Load a checkpoint's state into a freshly built model, optimizer and loaders
    (train, val); returns (step, bad_streak). A state that does not fit is 'not a
    training checkpoint of this engine', never a KeyError."""
    if state.get("tokenizer") not in (None, tokenizer_name):
        raise UserInputError(f"resume: {path} was trained with the {state['tokenizer']} tokenizer, "
                             f"this run uses {tokenizer_name}")
    try:
        model.load_state_dict(state["model"])
        # Keep this run's learning-rate objects (device tensors when capturable):
        # load_state_dict would replace them with the saved ones.
        lrs = [g["lr"] for g in optimizer.param_groups]
        optimizer.load_state_dict(state["optimizer"])
        for g, lr in zip(optimizer.param_groups, lrs):
            g["lr"] = lr
        for loader, key in zip(loaders, ("train_loader", "val_loader")):
            loader.load_state_dict(state[key])
        ckpt_lib.set_rng_state(state["rng"])
    except UserInputError:
        raise
    except (KeyError, ValueError, RuntimeError, TypeError, IndexError, AttributeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ckpt_lib.CheckpointError(path, f"its state does not fit this model: {type(e).__name__}: {first}",
                                       damaged=False) from None
    return int(state["step"]), int(state.get("bad_streak", 0))


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

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
    if "lr_decay_steps" not in stored and "lr_decay_steps" not in explicit:
        # A checkpoint from before lr_decay_steps existed: its cosine spanned its max_steps.
        values["lr_decay_steps"] = stored.get("max_steps")
    values["init_from"] = ""  # the weights come from the checkpoint
    try:
        return TrainConfig(**values)
    except UserInputError as e:
        raise UserInputError(f"resume: {path}: {e}") from None


def auto_resume(cfg: TrainConfig, log=print) -> TrainConfig:
    """--resume auto: the run folder's newest checkpoint if it holds one, else a
    fresh run there (replacing what an attempt that wrote no checkpoint left), so
    that torchrun --max-restarts can replay one command."""
    if ckpt_lib.list_checkpoints(cfg.run_dir):
        return dataclasses.replace(cfg, resume=cfg.run_dir)
    log(f"resume auto: no checkpoint in {cfg.run_dir} yet: starting the run there")
    return dataclasses.replace(cfg, resume="", overwrite=True)


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
                   run_id: str | None, data_hash, world_size: int, bad_streak: int, weights: bool = True) -> dict:
    """Everything a checkpoint holds: weights, optimizer, loaders (train, val), RNG,
    configs, the run's identity. weights=False leaves out the weights and the
    optimizer state (a sharded checkpoint keeps those in its shards)."""
    train_loader, val_loader = loaders
    state = {
        "version": ckpt_lib.FORMAT_VERSION,
        "step": step,
        "train_loader": train_loader.state_dict(),
        "val_loader": val_loader.state_dict(),
        "rng": ckpt_lib.rng_state(),
        "train_config": cfg.to_dict(),
        "model_config": model.config.to_dict(),
        "tokenizer": tokenizer_name,
        "run_id": run_id,
        "data_hash": data_hash,
        "world_size": world_size,
        "bad_streak": bad_streak,
    }
    if weights:
        state["model"] = model.state_dict()
        state["optimizer"] = optimizer.state_dict()
    return state


def restore(state: dict, path, *, model, optimizer, loaders, tokenizer_name: str, dist) -> tuple[int, int]:
    """Load a checkpoint's state into a freshly built model, optimizer and loaders
    (train, val) of a run whose processes `dist` describes (a single-file
    checkpoint into FSDP shards, a sharded one into any); returns (step, bad_streak). A state that does not fit is 'not a
    training checkpoint of this engine', never a KeyError."""
    if state.get("tokenizer") not in (None, tokenizer_name):
        raise UserInputError(f"resume: {path} was trained with the {state['tokenizer']} tokenizer, "
                             f"this run uses {tokenizer_name}")
    try:
        if state.get("sharded"):
            from engine.sharded_checkpoint import restore_tensors
            restore_tensors(state["sharded"], model, optimizer, state["sharded_files"])
        elif dist.parallel == "fsdp":
            _restore_full_into_sharded(model, optimizer, state, master=dist.master)
        else:
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


def _restore_full_into_sharded(model, optimizer, state: dict, master: bool) -> None:
    """A single-file checkpoint into an FSDP model and optimizer: rank 0's copy is
    broadcast and each process keeps its shards (the others need not hold it)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    model_state = optimizer_state = {}
    if master:
        model_state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in state["model"].items()}
        optimizer_state = _optimizer_state_by_name(model, optimizer, state["optimizer"])
    lrs = [g["lr"] for g in optimizer.param_groups]
    # Two calls, not set_state_dict: given an empty model state (the other ranks'),
    # set_state_dict takes it for an optimizer-only load and skips the weights' broadcast.
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr


def _optimizer_state_by_name(model, optimizer, saved: dict) -> dict:
    """torch's optimizer state dict (parameters by position) keyed by parameter
    name instead, as set_state_dict takes it; positions follow the optimizer's groups."""
    names = {id(p): name for name, p in model.named_parameters()}
    ordered = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    positions = [i for group in saved["param_groups"] for i in group["params"]]
    if len(positions) != len(ordered):
        raise ValueError(f"the checkpoint's optimizer has {len(positions)} parameters, this model {len(ordered)}")
    name_of = dict(zip(positions, ordered))
    return {"state": {name_of[i]: value for i, value in saved["state"].items()},
            "param_groups": [dict(group, params=[name_of[i] for i in group["params"]])
                             for group in saved["param_groups"]]}


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


def weights_are_finite(model: torch.nn.Module, dist_info=None) -> bool:
    """One host sync: every parameter finite (checked before a checkpoint is written).
    Sharded parameters are checked shard by shard, and the processes agree."""
    from engine import distributed as dist_lib
    flags = [torch.isfinite(dist_lib.local_tensor(p)).all() for p in model.parameters()]
    finite = torch.stack(flags).all() if flags else torch.tensor(True)
    if dist_info is not None and dist_info.parallel == "fsdp":
        bad = (~finite).to(torch.int64).reshape(1).to(next(model.parameters()).device)
        finite = dist_lib.all_reduce_max(bad, dist_info)[0] == 0
    return bool(finite)

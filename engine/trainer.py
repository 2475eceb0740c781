"""The training run: build-nanogpt's train_gpt2.py, made into a tool.

`Trainer(cfg).run()` trains: it wires the device, data, model, optimizer and run
folder from a TrainConfig, then loops. Each step is `engine.step.train_step`
(gradient accumulation, clipping, AdamW; on CUDA with the triton backend the
whole step replayed as a CUDA graph), with build-nanogpt's warm-up + cosine
learning rate. One log line and CSV row per step (engine.run_log), the val loss
every eval_interval steps, samples every sample_interval steps, checkpoints every
checkpoint_interval steps, a loss-curve PNG at the end. Under torchrun the model
is wrapped in DDP, or sharded by FSDP (--parallel fsdp: sharded checkpoints,
written by every rank, optionally in the background); rank 0 logs and writes
every other file. Every rank runs the same forwards (evaluation and sampling
included), so none waits alone in a collective.

Faults end a run in one line with its own exit status (engine.run_errors):
max_bad_steps skipped non-finite steps in a row, SIGINT/SIGTERM (between steps,
with a checkpoint: engine.signals), a failed write, a stalled DDP peer. Under
DDP every rank decides at the same step, so all exit alike and none waits in a
collective. Resumes take the checkpoint's configuration (engine.train_state);
one process at a time holds a run folder (engine.run_dir). `--resume auto`
continues the run folder's newest checkpoint, or starts the run there, so that
torchrun's --max-restarts can replay the same command after a lost worker.
"""
from __future__ import annotations

import dataclasses
import gc
import math
import os
import pathlib
import signal
import time

import torch

from engine import checkpoint as ckpt_lib
from engine import distributed as dist_lib
from engine import run_evals
from engine.config import Fusions
from engine.cuda_graph import GraphedTrainStep, graph_decision
from engine.errors import UserInputError
from engine.optim import configure_optimizer, lr_at, resolve_optimizer, set_lr
from engine.run_dir import new_token
from engine.run_errors import Interrupted, PeerLost, RunFileError, RunFinished, TrainingDiverged, signal_name
from engine.run_log import RunLog
from engine.load import resolve_device
from engine.run_setup import (build_model, claim_run_dir, describe_optimizer, header_lines, load_data,
                              resolve_dtype, resolve_residual_dtype, write_config_json)
from engine.signals import StopSignals, abort_on_sigterm
from engine.step import autocast_factory, train_step
from engine.train_config import TrainConfig
from engine.train_state import (auto_resume, explicit_fields, restore, resumed_config, schedule_note,
                                set_aside_later_checkpoints, training_state, weights_are_finite)

__all__ = ["Trainer", "TrainingDiverged", "resolve_device", "resolve_dtype", "train"]


class Trainer:
    """Everything a run needs, set up from a TrainConfig; `run()` trains.

    `log` receives each line (rank 0 only). After `run()`, `history` holds one dict
    per step (step, loss, lr, grad_norm, dt_ms, tokens_per_sec, val_loss or None),
    the earlier steps of a resumed run included.

    With `cfg.resume`, the fields named in `explicit` (train.py passes those the
    user gave; None means the fields that differ from their defaults) may change
    the stored configuration where resume-safe. A finished run raises RunFinished.
    """

    def __init__(self, cfg: TrainConfig, log=print, explicit=None):
        self._print = log if dist_lib.env_dist_info().master else (lambda *a, **k: None)
        self._early_lines: list[str] = []  # logged before the run folder (and its log.txt) exists
        self._log = self._log_early
        self.token = new_token()  # names this process's temp files
        self.folder = None
        resume_path = state = None
        if cfg.resume == "auto":
            cfg = auto_resume(cfg, log=self._log)
        if cfg.resume:
            resume_path, state = ckpt_lib.load_for_resume(cfg.resume, log=self._log)
            cfg = resumed_config(cfg, explicit_fields(cfg, explicit), state, resume_path, log=self._log)
            note = schedule_note(state["train_config"], cfg, state["step"])
            if note:
                self._log(note)
            if state["step"] >= cfg.max_steps:
                raise RunFinished(f"{resume_path.parent}: this run is finished (step {state['step']} of "
                                  f"max_steps {cfg.max_steps}); give --max-steps N with N > {state['step']} "
                                  "to train further")
        device_type = resolve_device(cfg.device).type
        if device_type == "cuda":
            # As build-nanogpt: fp32 matmuls (--dtype fp32, and those autocast leaves
            # in fp32) on TF32 tensor cores. Process-wide, as torch's switch is.
            torch.set_float32_matmul_precision("high")
        self.ddp_timeout_s = cfg.ddp_timeout_s
        self.dist = dist_lib.init_distributed(device_type, cfg.ddp_timeout_s, cfg.parallel)
        self._async_save = None  # the sharded checkpoint being written in the background
        self._unstarted_files: list[pathlib.Path] = []  # written by set-up for a run not yet begun
        self.replaced_previous_run: list[str] = []  # what --overwrite deleted
        try:
            with abort_on_sigterm():  # SIGTERM during set-up ends it as Ctrl-C does
                self._setup(cfg, device_type, resume_path, state)
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                for path in self._unstarted_files:
                    path.unlink(missing_ok=True)
            self._teardown(ok=False)
            lost = self._peer_lost(e)
            if lost is not None:
                raise lost from None
            if isinstance(e, KeyboardInterrupt):
                resumable = "" if self._unstarted_files else cfg.resume
                raise Interrupted.during_setup(getattr(e, "signum", signal.SIGINT), resumable,
                                               self.replaced_previous_run) from None
            raise

    def _setup(self, cfg: TrainConfig, device_type: str, resume_path, state):
        info = self.dist
        self.device = torch.device(dist_lib.process_device(device_type, info))
        self.device_type = self.device.type
        try:
            self.cfg = cfg = cfg.resolved(self.device_type, info.world_size)
        except UserInputError as e:
            if resume_path is None or cfg.total_batch_size is None:
                raise
            raise UserInputError(f"resume: {resume_path} trains on {cfg.total_batch_size:,} tokens per step, "
                                 f"which {info.world_size} process(es) cannot split ({e}); resume with a "
                                 "number of processes that divides it") from None
        self.accum = cfg.accumulation(info.world_size)
        self.dtype = resolve_dtype(cfg.dtype, self.device_type)
        self.cfg = cfg = dataclasses.replace(
            cfg, residual_dtype=resolve_residual_dtype(cfg.residual_dtype, self.dtype, self.device_type))
        self.autocast = autocast_factory(self.dtype, self.device_type)
        from engine.ops import resolve_backend
        try:
            self.backend = resolve_backend(cfg.backend, self.device_type)
            self.optimizer_kind = resolve_optimizer(cfg.optimizer, self.device_type, self.backend)
        except RuntimeError as e:
            raise UserInputError(str(e)) from None

        self.run_dir, self.folder = claim_run_dir(cfg, resume_path, info, self.token)
        self.data = load_data(cfg, info, self.device_type)
        self.tokenizer, self.train_loader, self.val_loader = (self.data.tokenizer, self.data.train_loader,
                                                              self.data.val_loader)
        self.hellaswag_items = None
        if cfg.hellaswag:  # read now, so a bad file fails before any training
            from engine.eval import load_hellaswag
            self.hellaswag_items = load_hellaswag(cfg.hellaswag)
        self.raw_model = build_model(cfg, state, backend=self.backend, vocab_size=self.tokenizer.vocab_size,
                                     device=self.device, dtype=self.dtype)
        self.model_config = self.raw_model.config
        if cfg.seq_len > self.model_config.block_size:
            raise UserInputError(f"seq_len (--seq-len) {cfg.seq_len} exceeds the model's block_size "
                                 f"{self.model_config.block_size}")
        if self.tokenizer.vocab_size > self.model_config.vocab_size:
            raise UserInputError(f"the {self.tokenizer.name} tokenizer has {self.tokenizer.vocab_size} ids "
                                 f"but the model's vocabulary has {self.model_config.vocab_size}")

        self.use_graphs, graph_reason = graph_decision(cfg.cuda_graphs, self.device_type, self.backend,
                                                       cfg.compile, info.ddp, profile=cfg.profile,
                                                       fsdp=info.parallel == "fsdp")
        # Sharded first (FSDP replaces the parameters with DTensors), then the optimizer over them.
        self.model = dist_lib.wrap_model(self.raw_model, info, self.device, self.dtype, compile=cfg.compile)
        optimizer_lines = []  # printed with the header lines below
        self.optimizer = configure_optimizer(self.raw_model, lr=cfg.max_lr, betas=cfg.betas,
                                             weight_decay=cfg.weight_decay, device=self.device,
                                             kind=self.optimizer_kind, capturable=self.use_graphs,
                                             weight_copies=self._bf16_weight_copies(),
                                             log=optimizer_lines.append)
        self.checkpoint_group = None  # the async saves' own gloo group
        if cfg.checkpoint_async:
            if info.parallel == "fsdp":
                from engine.sharded_checkpoint import checkpoint_group
                self.checkpoint_group = checkpoint_group()
            else:
                optimizer_lines.append("note: --checkpoint-async applies to sharded checkpoints (--parallel fsdp); "
                                       "this run writes single-file checkpoints in the training loop")

        self.step = self.bad_streak = 0
        self.last_checkpoint = None  # (step, path): the newest checkpoint this run can go back to
        # A resumed run keeps its identity (None for one from before run ids).
        self.run_id = state.get("run_id") if state is not None else ckpt_lib.new_run_id()
        if state is not None:
            self.step, self.bad_streak = restore(state, resume_path, model=self.raw_model, optimizer=self.optimizer,
                                                 loaders=(self.train_loader, self.val_loader),
                                                 tokenizer_name=self.tokenizer.name, dist=info)
            if state.get("world_size", info.world_size) != info.world_size:
                optimizer_lines.append(f"resume: the checkpoint was written by {state['world_size']} process(es); "
                                       f"continuing at {info.world_size} at the same place of the data stream")
            self.last_checkpoint = (self.step, resume_path)
            if self.raw_model.weight_copies is not None:
                # The masters were loaded in place: their bf16 copies are made again
                # from them, as a run that never stopped holds them.
                self.raw_model.weight_copies.refresh()
        # Every input has been checked: only from here on does the run change files.
        if self.folder is not None:
            self.replaced_previous_run = self.folder.replaces
            self.folder.start_writing(log=self._log)
        # log.txt too is written only now; what was logged before goes into it first.
        self.run_log = RunLog(self.run_dir, master=info.master, max_steps=cfg.max_steps, log=self._print,
                              token=self.token)
        for text in self._early_lines:
            self.run_log.line(text, echo=False)
        self._log = self.run_log.line
        if state is not None and info.master:
            set_aside_later_checkpoints(self.run_dir, self.step, log=self._log)
        # What checkpoints store: the values this run resolved, so that a resume
        # elsewhere (another folder, device or tiktoken cache) continues the same run.
        self.cfg = cfg = dataclasses.replace(cfg, data=os.path.abspath(self.data.data_path),
                                             hellaswag=cfg.hellaswag and os.path.abspath(cfg.hellaswag),
                                             tokenizer=self.tokenizer.name, dtype=self.dtype,
                                             residual_dtype=self.model_config.residual_dtype,
                                             run_dir=str(self.run_dir), resume="", overwrite=False)
        self.graphed = None
        if self.use_graphs:
            self.graphed = GraphedTrainStep(self.model, self.optimizer, self.accum, cfg.batch_size,
                                            cfg.seq_len, self.device,
                                            autocast_factory(self.dtype, self.device_type, False),
                                            cfg.grad_clip, log=self._log)
        source = (f"from {resume_path}" if resume_path else f"from {cfg.init_from}" if cfg.init_from
                  else f"preset {cfg.model}")
        for line in header_lines(
                cfg, info, device=self.device, dtype=self.dtype, backend=self.backend,
                optimizer=describe_optimizer(self.optimizer_kind, self.optimizer, info.parallel), optimizer_lines=optimizer_lines,
                model=self.raw_model, source=source, data=self.data, accum=self.accum,
                graphs=(self.use_graphs, graph_reason), run_dir=self.run_dir,
                resumed=(resume_path, self.step) if resume_path else None):
            self._log(line)

        self._pending: list[tuple] = []
        self._evals_at: dict[int, dict] = {}
        self.signals = StopSignals()  # inactive; run() installs the handlers
        elsewhere = resume_path is not None and resume_path.parent.resolve() != self.run_dir.resolve()
        if info.master and (resume_path is None or elsewhere):
            # Until the first step these hold nothing that is not elsewhere too.
            self._unstarted_files = [self.run_dir / "config.json", self.run_log.csv_path, self.run_log.log_path]
        if info.master:
            write_config_json(self.run_dir, cfg, self.model_config, self.token, self.run_id)
        self.run_log.start(self.step, earlier_csv=resume_path.parent / "metrics.csv" if elsewhere else None)

    def _bf16_weight_copies(self) -> bool:
        """Whether the step's matmuls read optimizer-kept bf16 copies: bf16 autocast
        on the triton backend with that fusion on, in one process and not compiled
        (the step's GPT.forward_backward; engine.step)."""
        return (self.dtype == "bf16" and self.backend == "triton" and self.dist.parallel == "none"
                and not self.cfg.compile and Fusions.parse(self.model_config.fusions).bf16_weights)

    def _log_early(self, text: str) -> None:
        self._print(text)
        self._early_lines.append(text)

    @property
    def history(self) -> list[dict]:
        return self.run_log.history

    # ------------------------------------------------------------------ steps
    def lr(self, step: int) -> float:
        c = self.cfg
        return lr_at(step, max_lr=c.max_lr, min_lr=c.min_lr, warmup_steps=c.warmup_steps,
                     max_steps=c.lr_decay_steps)

    def take_step(self, step: int):
        """One optimizer step (engine.step.train_step, or its CUDA graph) at step
        `step`'s learning rate; returns (lr, loss, grad norm), the last two as device
        tensors (no host sync)."""
        lr = self.lr(step)
        set_lr(self.optimizer, lr)
        with torch.profiler.record_function("data_loading"):
            batches = [self.train_loader.next_batch() for _ in range(self.accum)]
            xs = torch.stack([x for x, _ in batches])
            ys = torch.stack([y for _, y in batches])
        if self.graphed is not None:
            loss, norm = self.graphed.step(xs, ys)
            # the graph's output buffers are overwritten by the next replay
            return lr, loss.clone(), norm.clone()
        self.model.train()
        if self.device_type == "cuda":
            xs, ys = xs.pin_memory(), ys.pin_memory()  # so the copies below are asynchronous
        xs = xs.to(self.device, non_blocking=True)
        ys = ys.to(self.device, non_blocking=True)
        loss, norm = train_step(self.model, self.optimizer, xs, ys, grad_clip=self.cfg.grad_clip,
                                autocast=self.autocast,
                                all_reduce=lambda t: dist_lib.all_reduce_mean(t, self.dist))
        return lr, loss, norm

    def _flush(self, keep_newest: bool = False):
        """Read the pending steps' loss and norm (one host sync), log them, and stop
        after max_bad_steps non-finite steps in a row or a non-finite last step.
        keep_newest leaves the step just queued pending, so the host waits on the
        step before it while the GPU already runs this one. Under DDP the ranks then
        agree (one tiny all-reduce) on a pending signal and on a failed log write."""
        keep = 1 if keep_newest else 0
        if len(self._pending) <= keep:
            return
        pending, self._pending = self._pending[:len(self._pending) - keep], self._pending[len(self._pending) - keep:]
        values = torch.stack([torch.stack([loss.float(), norm.float()]) for _, _, loss, norm in pending]).tolist()
        now = time.perf_counter()
        dt = (now - self._t_mark) / len(pending)
        self._t_mark = now
        io_error = None
        for (step, lr, _, _), (loss, norm) in zip(pending, values):
            finite = math.isfinite(loss) and math.isfinite(norm)
            try:
                self.run_log.record(dict(step=step, loss=loss, lr=lr, grad_norm=norm, dt_ms=dt * 1000,
                                         tokens_per_sec=self.cfg.total_batch_size / dt if dt > 0 else float("inf"),
                                         skipped=not finite, **self._evals_at.pop(step, {})))
            except RunFileError as e:
                io_error = io_error or e
            self.bad_streak = 0 if finite else self.bad_streak + 1
            if not finite and (self.bad_streak >= self.cfg.max_bad_steps or step == self.cfg.max_steps - 1):
                raise self._diverged(step, loss, norm)
        if self.dist.ddp:
            flags = torch.tensor([self.signals.requested or 0, io_error is not None], dtype=torch.int64,
                                 device=self.device)
            self._agreed_signal, io_failed = dist_lib.all_reduce_max(flags, self.dist).tolist()
            if io_failed:
                raise io_error or RunFileError(f"DDP rank {self.dist.rank}: rank 0 could not write the run's "
                                               "files (its message says why); stopping with it")
        elif io_error is not None:
            raise io_error

    def _last_good(self) -> str:
        last = getattr(self, "last_checkpoint", None)
        return str(last[1]) if last else "none written yet"

    def _diverged(self, step, loss, norm) -> TrainingDiverged:
        on_last = step == self.cfg.max_steps - 1 and self.bad_streak < self.cfg.max_bad_steps
        return TrainingDiverged.at_step(step, loss, norm, self.bad_streak, self.cfg.max_bad_steps, on_last,
                                        self._last_good())

    def _peer_lost(self, e: BaseException) -> PeerLost | None:
        info = getattr(self, "dist", None)
        if info is None or not info.ddp or not dist_lib.is_collective_failure(e):
            return None
        return PeerLost.after(info.rank, dist_lib.failure_reason(e), self.ddp_timeout_s, self._last_good())

    def _reset_clock(self):
        if self.device_type == "cuda":
            torch.cuda.synchronize(self.device)
        self._t_mark = time.perf_counter()

    def evaluate(self, step: int) -> None:
        """The val loss (and HellaSwag, when given) before step `step`: logged, and
        kept for that step's CSV row."""
        results = {"val_loss": run_evals.val_loss(self.raw_model, self.val_loader, self.cfg.eval_batches,
                                                  self.device, self.autocast, self.dist)}
        line = f"validation loss: {results['val_loss']:.4f}"
        if self.hellaswag_items:
            results.update(run_evals.hellaswag(self.raw_model, self.hellaswag_items, self.tokenizer,
                                               self.device, self.autocast, self.dist))
            line += (f" | hellaswag acc {results['hellaswag_acc']:.4f} acc_norm "
                     f"{results['hellaswag_acc_norm']:.4f} ({len(self.hellaswag_items)} items)")
        self._evals_at[step] = results
        self._log(line)

    def sample(self, step: int) -> list[str]:
        """A few continuations of a fixed prompt, logged by rank 0. Every rank
        generates them (the same forwards: an FSDP model's all-gathers need all)."""
        texts = run_evals.samples(self.raw_model, self.tokenizer, self.device, self.autocast,
                                  seed=self.cfg.seed + step)
        for i, t in enumerate(texts):
            self._log(f"sample {i}: {t!r}")
        return texts

    def save_checkpoint(self, step: int) -> pathlib.Path:
        """Write ckpt_{step:06d}.pt (step = steps completed); rank 0 writes, every rank
        learns the outcome. Never from non-finite weights."""
        self._flush()  # a diverged run raises here, so it is never saved
        if not weights_are_finite(self.raw_model, self.dist):
            raise TrainingDiverged(f"training diverged: the weights are not finite at step {step}; no checkpoint "
                                   f"written. Last good checkpoint: {self._last_good()}")
        if self.dist.parallel == "fsdp":
            return self._save_sharded(step)
        path = error = None
        if self.dist.master:
            try:
                path = ckpt_lib.save_checkpoint(self.run_dir, step, self._training_state(step),
                                                keep=self.cfg.keep_checkpoints,
                                                token=self.token)
            except RunFileError as e:
                error = str(e)
        path, error = dist_lib.broadcast_object((path and str(path), error), self.dist)
        if error:
            raise RunFileError(error)
        self.last_checkpoint = (step, pathlib.Path(path))
        self._log(f"checkpoint: {path}")
        return pathlib.Path(path)

    def _training_state(self, step: int, weights: bool = True) -> dict:
        return training_state(step, cfg=self.cfg, model=self.raw_model, optimizer=self.optimizer,
                              loaders=(self.train_loader, self.val_loader), tokenizer_name=self.tokenizer.name,
                              run_id=self.run_id, data_hash=self.data.data_hash, world_size=self.dist.world_size,
                              bad_streak=self.bad_streak, weights=weights)

    def _save_sharded(self, step: int) -> pathlib.Path:
        """Every rank writes its shards of ckpt_{step:06d}/ (engine.sharded_checkpoint);
        with --checkpoint-async a snapshot is written in the background while
        training goes on (one save in flight at a time)."""
        from engine import sharded_checkpoint as sharded
        self.wait_for_checkpoint()
        token = dist_lib.broadcast_object(self.token, self.dist)  # rank 0's names the temp folder
        job = sharded.SaveJob(self.run_dir, step, self.dist.rank, self.dist.world_size, token,
                              self._training_state(step, weights=False) if self.dist.master else None,
                              keep=self.cfg.keep_checkpoints, group=self.checkpoint_group)
        tensors = sharded.tensors_state(self.raw_model, self.optimizer)
        if self.checkpoint_group is not None:
            self._async_save = sharded.AsyncSave(job, sharded.cpu_snapshot(tensors))
            return job.final
        job.write(tensors)
        path = job.finish()
        self.last_checkpoint = (step, path)
        self._log(f"checkpoint: {path}")
        return path

    def wait_for_checkpoint(self) -> None:
        """Wait for the checkpoint being written in the background, if any (every
        rank alike: its outcome, or its RunFileError, is the same on all)."""
        pending, self._async_save = self._async_save, None
        if pending is not None:
            path = pending.wait()
            self.last_checkpoint = (pending.job.step, path)
            self._log(f"checkpoint: {path}")

    # ------------------------------------------------------------------ run
    def run(self) -> list[dict]:
        """Train from self.step to max_steps; returns the history. Tears down DDP
        and releases the run folder, whatever happens."""
        ok = False
        notice = "stopping after this step and writing a checkpoint (again to abort at once)"
        try:
            with StopSignals(notice if self.dist.master else None) as self.signals:
                try:
                    if self.cfg.profile:
                        self._profile()
                    else:
                        self._loop()
                        self.run_log.plot()
                except (TrainingDiverged, Interrupted):
                    self._plot_quietly()
                    raise
            ok = True
            return self.history
        except Exception as e:
            lost = self._peer_lost(e)
            if lost is not None:
                raise lost from None
            raise
        finally:
            self._teardown(ok)

    def close(self) -> None:
        """Release what a Trainer holds (the run folder's lock, DDP) without running;
        run() does this itself."""
        self._teardown(ok=False)

    def _plot_quietly(self):
        try:
            self.run_log.plot()
        except RunFileError:
            pass  # the run's own reason to stop is the message that matters

    def _teardown(self, ok: bool):
        info = getattr(self, "dist", None)
        if info is not None and info.ddp:
            if ok:
                try:
                    dist_lib.barrier(info)  # nobody leaves before rank 0 has written its files
                except RuntimeError:
                    pass
            # The DDP wrapper's reducer holds the process group; released first, so
            # that destroy_process_group really ends it (see engine.distributed).
            self.model = self.graphed = None
            gc.collect()
        if info is not None:
            dist_lib.destroy(info)
        if self.folder is not None:
            self.folder.release(remove_if_unused=not ok)
            self.folder = None

    def _stop_requested(self) -> int:
        """The signal to stop for, decided between steps: this process's own in a
        single process; under DDP what the ranks agreed on at the last log flush."""
        return self._agreed_signal if self.dist.ddp else (self.signals.requested or 0)

    def _stop(self, signum: int):
        self._flush()
        self.wait_for_checkpoint()
        if self.cfg.checkpoint_interval > 0 and (self.last_checkpoint or (None,))[0] != self.step:
            self.save_checkpoint(self.step)
            self.wait_for_checkpoint()
        if self.last_checkpoint and self.last_checkpoint[0] == self.step:
            where = f"wrote {self.last_checkpoint[1]}; continue with: python train.py --resume {self.run_dir}"
        else:
            where = f"no checkpoint written (checkpoint_interval=0); last checkpoint: {self._last_good()}"
        raise Interrupted(signum, f"interrupted by {signal_name(signum)} after step {self.step - 1}: {where}")

    def _loop(self):
        cfg = self.cfg

        def due(interval, step):
            return interval > 0 and (step % interval == 0 or step == cfg.max_steps - 1)

        self._agreed_signal = 0
        self._reset_clock()
        for step in range(self.step, cfg.max_steps):
            last = step == cfg.max_steps - 1
            if due(cfg.eval_interval, step):
                self._flush()
                self.evaluate(step)
                self._reset_clock()
            if step > 0 and due(cfg.sample_interval, step):
                self._flush()
                self.sample(step)
                self._reset_clock()
            self._pending.append((step, *self.take_step(step)))
            self.step = step + 1
            if (step + 1) % cfg.log_interval == 0 or last:
                # On CUDA a step's line is printed once the next step is queued, so
                # reading the loss never leaves the GPU idle.
                self._flush(keep_newest=self.device_type == "cuda" and not last)
            if cfg.checkpoint_interval > 0 and ((step + 1) % cfg.checkpoint_interval == 0 or last):
                self.save_checkpoint(step + 1)
                self._reset_clock()
            signum = self._stop_requested()
            if signum:
                self._stop(signum)
        self._flush()
        self.wait_for_checkpoint()

    def _profile(self):
        from engine.profiling import profile_training

        def run_step(i):
            step = min(self.step, self.cfg.max_steps - 1)
            self._pending.append((step, *self.take_step(step)))
            self.step += 1
            self._flush()

        self._reset_clock()
        out_dir = self.run_dir if self.dist.master else self.run_dir / f"profile_rank{self.dist.rank}"
        trace = profile_training(run_step, str(out_dir), self.device_type, log=self._log)
        self._log(f"profile trace: {trace}")


def train(cfg: TrainConfig, log=print, explicit=None) -> Trainer:
    """Set up and run; returns the Trainer (its history, run_dir, model)."""
    trainer = Trainer(cfg, log=log, explicit=explicit)
    trainer.run()
    return trainer

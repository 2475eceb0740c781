"""FSDP (--parallel fsdp) on CPU with gloo, in forked process groups: training
equals one process; sharded checkpoints reshard across world sizes and formats
(2 -> 3 processes -> one process -> 2 processes from a single file -> export);
FusedAdamW on DTensor shards equals torch's AdamW; async saves equal a snapshot."""
import csv
import os
from pathlib import Path

import pytest
import torch

from engine import checkpoint as ckpt_lib
from engine.train_config import TrainConfig
from engine.trainer import train
from tests.helpers import assert_close, run_in_group

COMMON = dict(tokenizer="bytes", device="cpu", backend="torch", n_layer=1, n_embd=32, batch_size=2, seq_len=16,
              total_batch_size=2 * 16 * 6, warmup_steps=1, max_lr=1e-3, eval_interval=0, eval_batches=1,
              sample_interval=0, checkpoint_interval=2, keep_checkpoints=0, seed=7)
QUIET = dict(log=lambda *a, **k: None)


@pytest.fixture
def single_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def read_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _train_ranks(rank, world_size, cfg_values):
    lines = []
    trainer = train(TrainConfig(**cfg_values), log=lines.append)
    return {"lines": lines, "steps": [r["step"] for r in trainer.history]}


# FSDP against one process: the reductions add in another order (~1e-7 relative);
# AdamW turns the rounding noise of near-zero gradients (the attention's key bias,
# which the softmax ignores) into updates of up to ~1e-6 in those weights.
LOSS_RTOL = 1e-6
WEIGHT_TOL = dict(rtol=1e-5, atol=2e-6)


def assert_same_rows(got: list[dict], want: list[dict], keys=("loss", "grad_norm"), rtol=LOSS_RTOL):
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(want, got):
        for key in keys:
            x, y = float(a[key]), float(b[key])
            assert abs(x - y) <= rtol * abs(x), f"step {a['step']} {key}: one process {x}, FSDP {y}"


def test_fsdp_trains_like_one_process_across_world_sizes_and_formats(corpus, tmp_path, single_process):
    """One run, continued: 2 processes (FSDP, sharded checkpoint), 3 processes
    (resharded; the Triton FusedAdamW on the shards; async save), one process (DDP-less, single-file checkpoint), 2
    processes again from that single file (broadcast from rank 0). Its losses and
    grad norms are those of one uninterrupted process, and its last checkpoint,
    exported as one file, holds that process's weights and optimizer state."""
    data = dict(COMMON, data=str(corpus))
    # The reference stops and resumes at the same steps (max_steps shapes the schedule).
    train(TrainConfig(**data, run_dir=str(tmp_path / "ref"), max_steps=2), **QUIET)
    for max_steps in (4, 5, 6):
        train(TrainConfig(resume=str(tmp_path / "ref"), max_steps=max_steps), **QUIET)
    run = tmp_path / "run"

    (first, _) = run_in_group(_train_ranks, 2, tmp_path, dict(data, run_dir=str(run), max_steps=2, parallel="fsdp",
                                                              eval_interval=1))
    assert any("(FSDP, world size 2)" in line for line in first["lines"])
    assert (run / "ckpt_000002" / "manifest.json").is_file()
    assert sorted(p.name for p in (run / "ckpt_000002").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "manifest.json", "train_state.pt"]

    resumed = dict(resume=str(run), parallel="fsdp")
    (second, *_) = run_in_group(_train_ranks, 3, tmp_path, dict(resumed, max_steps=4, checkpoint_async=True,
                                                                 sample_interval=3, optimizer="triton"))
    assert any("triton FusedAdamW on each process's shards" in line for line in second["lines"])
    assert second["steps"] == [0, 1, 2, 3]
    assert any("written by 2 process(es); continuing at 3" in line for line in second["lines"])
    assert any(line.startswith("sample 0:") for line in second["lines"])

    # One process without FSDP (ddp of one process is none), from the sharded ckpt_000004.
    train(TrainConfig(resume=str(run), max_steps=5, parallel="ddp"), **QUIET)
    assert (run / "ckpt_000005.pt").is_file()
    run_in_group(_train_ranks, 2, tmp_path, dict(resumed, max_steps=6))  # FSDP from the single file
    assert [p.name for p in ckpt_lib.list_checkpoints(run)] == [
        "ckpt_000002", "ckpt_000004", "ckpt_000005.pt", "ckpt_000006"]

    assert_same_rows(read_rows(run), read_rows(tmp_path / "ref"))
    exported = ckpt_lib.load_checkpoint(ckpt_lib.export(run))
    want = ckpt_lib.load_checkpoint(tmp_path / "ref" / "ckpt_000006.pt")
    assert exported["step"] == 6 and exported["world_size"] == 2
    for name, tensor in want["model"].items():
        torch.testing.assert_close(exported["model"][name], tensor, **WEIGHT_TOL, msg=name)
    for i, st in want["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(exported["optimizer"]["state"][i][key], st[key], rtol=1e-5, atol=1e-9)
        assert float(exported["optimizer"]["state"][i]["step"]) == float(st["step"]) == 6
    assert exported["train_loader"]["token_offset"] == want["train_loader"]["token_offset"]


def _diverge(rank, world_size, cfg_values):
    from engine.run_errors import TrainingDiverged
    try:
        train(TrainConfig(**cfg_values), **QUIET)
    except TrainingDiverged as e:
        return str(e)
    return "trained to the end"


def test_fsdp_non_finite_steps_are_skipped_and_stop_every_rank_alike(corpus, tmp_path):
    """A learning rate that blows the weights up: every rank sees the same
    non-finite steps (the loss is all-reduced, the norm taken over all shards),
    skips them and stops at the same step with the same line."""
    run = tmp_path / "run"
    values = dict(COMMON, data=str(corpus), run_dir=str(run), parallel="fsdp", max_lr=1e30, warmup_steps=0,
                  max_steps=20, checkpoint_interval=1, keep_checkpoints=1)
    messages = run_in_group(_diverge, 2, tmp_path, values)
    assert messages[0] == messages[1] and messages[0].startswith("training diverged: step ")
    rows = read_rows(run)
    assert [r["skipped"] for r in rows[-3:]] == ["1", "1", "1"]  # max_bad_steps (3) in a row
    (last,) = ckpt_lib.list_checkpoints(run)
    assert f"Last good checkpoint: {last}" in messages[0]


# ------------------------------------------------------------ FusedAdamW on shards

SHAPES = [(7, 5), (5,), (1, 3), (64,)]  # uneven over 3 processes; (1, 3) leaves two of them empty shards


def _sharded_fused_adamw_vs_torch(rank, world_size):
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor, init_device_mesh

    from gpt2_kernels import ShardedFusedAdamW
    mesh = init_device_mesh("cpu", (world_size,))
    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(s, generator=gen) for s in SHAPES]

    def params():
        ps = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in full]
        return ps, [{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:], "weight_decay": 0.0}]

    ours, our_groups = params()
    theirs, their_groups = params()
    opt = ShardedFusedAdamW(our_groups, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    ref = torch.optim.AdamW(their_groups, lr=1e-2, betas=(0.9, 0.95))
    for step in range(4):
        grads = [torch.randn(s, generator=gen) for s in SHAPES]
        for ps in (ours, theirs):
            for p, g in zip(ps, grads):
                p.grad = distribute_tensor(g, mesh, [Shard(0)])
        if step == 2:  # a non-finite step: skipped on the device, step counts included
            opt.found_inf = torch.ones(())
            opt.step()
            del opt.found_inf
            continue
        opt.step()
        ref.step()
        opt.zero_grad(set_to_none=False)
        assert all(float(p.grad.to_local().abs().sum()) == 0 for p in ours)
    out = {"params": [(p.full_tensor(), q.full_tensor()) for p, q in zip(ours, theirs)], "state": []}
    for p, q in zip(ours, theirs):
        mine, want = opt.state[p], ref.state[q]
        assert isinstance(mine["exp_avg"], DTensor) and mine["exp_avg"].placements == p.placements
        out["state"].append([(mine[k].full_tensor(), want[k].full_tensor()) for k in ("exp_avg", "exp_avg_sq")]
                            + [(mine["step"], want["step"])])
    return out


def test_fused_adamw_on_dtensor_shards_matches_torch_adamw(tmp_path):
    """3 processes, uneven and empty shards, two groups, a skipped step: the Triton
    FusedAdamW on each process's shards gives torch AdamW's weights and state
    (as DTensors laid out like the parameters)."""
    (out, *_) = run_in_group(_sharded_fused_adamw_vs_torch, 3, tmp_path)
    # The tolerance of FusedAdamW against torch's AdamW in one process (test_adamw).
    for i, (ours, theirs) in enumerate(out["params"]):
        assert_close(ours, theirs, 1e-6, f"param {i}")
    for i, (exp_avg, exp_avg_sq, (step, want_step)) in enumerate(out["state"]):
        assert_close(*exp_avg, 1e-6, f"exp_avg {i}")
        assert_close(*exp_avg_sq, 1e-6, f"exp_avg_sq {i}")
        assert float(step) == float(want_step) == 3


# ------------------------------------------------------------ async save

def _async_save_is_a_snapshot(rank, world_size, run_dir):
    import contextlib

    from torch.distributed.fsdp import fully_shard

    from engine import sharded_checkpoint as sharded
    from engine.config import GPTConfig
    from engine.model import GPT
    from engine.optim import param_groups
    from engine.step import train_step
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=32, backend="torch"))
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)
    gen = torch.Generator().manual_seed(1)

    def step():
        xs = torch.randint(0, 64, (2, 2, 16), generator=gen)
        train_step(model, optimizer, xs, xs.roll(1, -1), grad_clip=1.0, autocast=contextlib.nullcontext)

    step()
    at_save = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
    job = sharded.SaveJob(run_dir, 1, rank, world_size, "token", {"step": 1} if rank == 0 else None,
                          group=sharded.checkpoint_group())
    pending = sharded.AsyncSave(job, sharded.cpu_snapshot(sharded.tensors_state(model, optimizer)))
    for _ in range(3):  # training and its collectives go on meanwhile
        step()
    path = pending.wait()
    after = {k: v.full_tensor() for k, v in model.state_dict().items()}
    return str(path), at_save, after


def test_async_sharded_save_equals_a_snapshot_at_save_time(tmp_path):
    from engine import sharded_checkpoint as sharded
    from engine.config import GPTConfig
    (path, at_save, after), _ = run_in_group(_async_save_is_a_snapshot, 2, tmp_path, tmp_path / "run")
    assert path == str(tmp_path / "run" / "ckpt_000001")
    config = GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=32).to_dict()
    saved = sharded.full_model_state(path, config)
    for name, tensor in at_save.items():
        assert torch.equal(saved[name], tensor), name
    assert not torch.equal(saved["transformer.wpe.weight"], after["transformer.wpe.weight"])
    assert not list((tmp_path / "run").glob(".ckpt_*"))  # no temp folder left


# ------------------------------------------------------------ damaged, foreign, malicious

@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory, corpus) -> Path:
    """A run of FSDP in one process (a one-process group): sharded ckpt_000001/ and ckpt_000002/."""
    assert "RANK" not in os.environ
    run = tmp_path_factory.mktemp("sharded") / "run"
    train(TrainConfig(**dict(COMMON, data=str(corpus), run_dir=str(run), max_steps=2, checkpoint_interval=1,
                             parallel="fsdp")), **QUIET)
    return run


@pytest.fixture
def run_copy(sharded_run, tmp_path) -> Path:
    import shutil
    dest = tmp_path / "run"
    shutil.copytree(sharded_run, dest)
    return dest


def remanifest(folder: Path) -> None:
    """What someone who changed a checkpoint's files could do: list them anew."""
    from engine import sharded_checkpoint as sharded
    names = [p.name for p in folder.iterdir() if p.name != sharded.MANIFEST]
    sharded.write_manifest(folder, 2, 1, sharded.hash_files(folder, names))


def flip_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_shard_is_named_and_resume_falls_back(run_copy):
    flip_byte(run_copy / "ckpt_000002" / "__0_0.distcp")
    with pytest.raises(ckpt_lib.CheckpointError) as info:
        ckpt_lib.load_checkpoint(run_copy / "ckpt_000002")
    message = str(info.value)
    assert "\n" not in message and "damaged checkpoint" in message and "__0_0.distcp: sha256 mismatch" in message
    lines = []
    path, state = ckpt_lib.load_for_resume(run_copy, log=lines.append)
    assert path == run_copy / "ckpt_000001" and state["step"] == 1 and state["sharded"] == str(path)
    assert lines[0].startswith(f"resume: skipping {run_copy / 'ckpt_000002'}: damaged checkpoint")


def _no_manifest(folder):
    (folder / "manifest.json").unlink()


def _other_manifest(folder):
    (folder / "manifest.json").write_text('{"format": "someone else\'s", "files": {}}')


def _edited_manifest(folder):
    text = (folder / "manifest.json").read_text()
    (folder / "manifest.json").write_text(text.replace('"step": 2', '"step": 3'))


def _missing_file(folder):
    (folder / "train_state.pt").unlink()


def _truncated_shard(folder):
    data = (folder / "__0_0.distcp").read_bytes()
    (folder / "__0_0.distcp").write_bytes(data[:-10])


def _damaged_train_state(folder):
    flip_byte(folder / "train_state.pt")
    remanifest(folder)  # the manifest agrees; the file's own trailer does not


@pytest.mark.parametrize("spoil, damaged, reason", [
    (_no_manifest, False, "no manifest.json: not written by this engine, or its save did not finish"),
    (_other_manifest, False, "its manifest.json is not this engine's"),
    (_edited_manifest, True, "manifest.json: sha256 mismatch"),
    (_missing_file, True, "train_state.pt is missing"),
    (_truncated_shard, True, "__0_0.distcp has"),
    (_damaged_train_state, True, "train_state.pt: sha256 mismatch"),
])
def test_damaged_and_foreign_sharded_checkpoints_get_one_line(run_copy, spoil, damaged, reason):
    folder = run_copy / "ckpt_000002"
    spoil(folder)
    with pytest.raises(ckpt_lib.CheckpointError) as info:
        ckpt_lib.load_checkpoint(folder)
    assert info.value.damaged == damaged and "\n" not in str(info.value)
    assert str(info.value).startswith(f"{folder}: " + ("damaged checkpoint" if damaged else
                                                        "not a training checkpoint of this engine"))
    assert reason in str(info.value)


class _Marker:
    """Unpickled, it would create a file: proof that something ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_malicious_metadata_is_refused_before_it_runs(run_copy, tmp_path):
    """.metadata is a pickle: one that calls anything beyond DCP's metadata classes
    is refused, even with a manifest that lists its true checksum."""
    import pickle

    from engine.sources import read_checkpoint
    folder, marker = run_copy / "ckpt_000002", tmp_path / "ran"
    (folder / ".metadata").write_bytes(pickle.dumps(_Marker(marker)))
    remanifest(folder)
    with pytest.raises(ckpt_lib.CheckpointError, match="its contents cannot be loaded safely: .*never holds"):
        read_checkpoint(folder)
    assert not marker.exists()


def test_metadata_may_name_only_files_of_the_manifest(run_copy):
    import pickle

    from engine import sharded_checkpoint as sharded
    from engine.sources import read_checkpoint
    folder = run_copy / "ckpt_000002"
    with open(folder / ".metadata", "rb") as f:
        metadata = sharded._MetadataUnpickler(f).load()
    info = next(iter(metadata.storage_data.values()))
    info.relative_path = "../../elsewhere.distcp"
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    remanifest(folder)
    with pytest.raises(ckpt_lib.CheckpointError, match="points at '../../elsewhere.distcp', which the manifest"):
        read_checkpoint(folder)


def test_non_tensor_entries_are_read_with_weights_only(tmp_path):
    """DCP's default planner unpickles the state dict's non-tensor entries freely;
    ours reads them with torch.load(weights_only=True)."""
    import torch.distributed.checkpoint as dcp

    from engine import sharded_checkpoint as sharded
    folder, marker = tmp_path / "ckpt_000002", tmp_path / "ran"
    with pytest.warns(UserWarning, match="single process"):
        dcp.save({"weights": torch.ones(3), "extra": _Marker(marker)},
                 storage_writer=dcp.FileSystemWriter(folder))
    (folder / "train_state.pt").write_bytes(b"")
    remanifest(folder)
    with pytest.raises(ckpt_lib.CheckpointError, match="cannot be loaded safely"):
        sharded.load_into(folder, {"weights": torch.zeros(3), "extra": None})
    assert not marker.exists()


def test_sample_loads_a_sharded_run_and_export_writes_one_file(sharded_run, tmp_path):
    """sample.py / the evaluation take the run as it is; export gives the single file."""
    from engine.sources import load_engine_model
    from engine.model import GPT
    from engine.sharded_checkpoint import _MetadataUnpickler
    with open(sharded_run / "ckpt_000002" / ".metadata", "rb") as f:
        saved = _MetadataUnpickler(f).load().state_dict_metadata
    assert "model.transformer.wte.weight" in saved and "model.lm_head.weight" not in saved  # tied: saved once
    model, tokenizer, what = load_engine_model(GPT, sharded_run)
    assert tokenizer == "bytes" and what.startswith(f"checkpoint {sharded_run / 'ckpt_000002'} (step 2)")
    out = ckpt_lib.export(sharded_run, tmp_path / "one.pt")
    state = ckpt_lib.load_checkpoint(out)
    assert state["step"] == 2 and "sharded" not in state
    for name, tensor in model.state_dict().items():
        assert torch.equal(state["model"][name], tensor), name
    again, _, _ = load_engine_model(GPT, out)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


# ------------------------------------------------------------ --resume auto

def test_resume_auto_starts_the_run_then_continues_it(corpus, tmp_path, single_process):
    """What torchrun --max-restarts replays: the first attempt starts the run in
    --run-dir (replacing what an attempt that wrote no checkpoint left there), a
    later one continues its newest checkpoint."""
    from engine.errors import UserInputError
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("step,loss\n0,9.0\n")  # an earlier attempt died before its checkpoint
    values = dict(COMMON, data=str(corpus), run_dir=str(run), resume="auto", max_steps=2)
    lines = []
    first = train(TrainConfig(**values), log=lines.append)
    assert f"resume auto: no checkpoint in {run} yet: starting the run there" in lines
    assert [r["step"] for r in first.history] == [0, 1]
    second = train(TrainConfig(**dict(values, max_steps=3)), **QUIET)
    assert [r["step"] for r in second.history] == [0, 1, 2]
    assert [r["step"] for r in read_rows(run)] == ["0", "1", "2"]
    with pytest.raises(UserInputError, match="--resume auto needs --run-dir"):
        TrainConfig(resume="auto")


def test_a_killed_save_leaves_a_temp_folder_that_the_next_run_removes(run_copy):
    """The next run of the folder removes it once its inputs are checked (start_writing)."""
    from engine.run_dir import RunFolder
    stale = run_copy / ".ckpt_000003.1234-dead.tmp"
    (stale / "sub").mkdir(parents=True)
    (stale / "__0_0.distcp").write_bytes(b"half")
    assert [p.name for p in ckpt_lib.list_checkpoints(run_copy)] == ["ckpt_000001", "ckpt_000002"]
    folder = RunFolder(run_copy, "5678-live")
    folder.claim()
    try:
        assert stale.exists()  # nothing changes before the run's inputs are checked
        folder.start_writing(log=lambda line: None)
        assert not stale.exists() and (run_copy / "ckpt_000002").is_dir()
    finally:
        folder.release()


@pytest.mark.gpu
def test_gpu_fsdp_bf16_with_the_kernels_trains_like_one_process(corpus, tmp_path, single_process):
    """On a GPU: FSDP (one process, NCCL) with bf16 mixed precision, the triton
    backend and FusedAdamW on the shards follows the unsharded bf16 run (autocast
    over fp32 weights) within bf16's noise, and its sharded checkpoint exports."""
    values = dict(COMMON, data=str(corpus), device="cuda", dtype="bf16", backend="triton", optimizer="triton",
                  cuda_graphs="off", max_steps=4, checkpoint_interval=4)
    ref = train(TrainConfig(**values, run_dir=str(tmp_path / "ref")), **QUIET)
    lines = []
    sharded = train(TrainConfig(**values, run_dir=str(tmp_path / "run"), parallel="fsdp"), log=lines.append)
    assert any("(FSDP, world size 1)" in line and "triton FusedAdamW on each process's shards" in "".join(lines)
               for line in lines)
    for a, b in zip(ref.history, sharded.history):
        assert abs(a["loss"] - b["loss"]) <= 2e-2 * abs(a["loss"]), (a, b)
    assert ckpt_lib.load_checkpoint(ckpt_lib.export(tmp_path / "run"))["step"] == 4

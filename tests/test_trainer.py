"""The training loop: schedule, accumulation, loss falling, resume, divergence,
--init-from, config validation, CUDA-graph decisions (GPU tests for the graphs)."""
import csv
import math
import re

import pytest
import torch

from engine import checkpoint as ckpt_lib
from engine.config import GPTConfig
from engine.cuda_graph import graph_decision
from engine.errors import UserInputError
from engine.model import GPT
from engine.optim import configure_optimizer, lr_at, param_groups
from engine.step import train_step
from engine.train_config import AUTO_DEFAULTS, TrainConfig
from engine.run_errors import RunFinished
from engine.trainer import Trainer, TrainingDiverged, train
from tests.helpers import DEVICE, ON_GPU, rel_err

LOG_LINE = re.compile(r"^step +\d+/40 \| loss \d+\.\d{6} \| lr \d\.\d{4}e[-+]\d+ \| norm \d+\.\d{4} \| "
                      r"dt \d+\.\d{2}ms \| tok/sec \d+\.\d{2} \| elapsed \d+:\d\d:\d\d \| eta \d+:\d\d:\d\d$")



def tiny_cfg(corpus, run_dir, **kw) -> TrainConfig:
    """The tiny preset shrunk further, byte tokenizer: a step takes milliseconds."""
    base = dict(data=str(corpus), tokenizer="bytes", model="tiny", n_layer=2, n_embd=64, n_head=4,
                batch_size=4, seq_len=32, max_steps=4, warmup_steps=2, max_lr=1e-3,
                eval_interval=0, sample_interval=0, checkpoint_interval=0, device="cpu",
                run_dir=str(run_dir), seed=1234)
    base.update(kw)
    return TrainConfig(**base)


def quiet(*args, **kwargs):
    pass


def get_lr(step, cfg):
    return lr_at(step, max_lr=cfg.max_lr, min_lr=cfg.min_lr if cfg.min_lr is not None else cfg.max_lr * 0.1,
                 warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps)


# --------------------------------------------------------------------- schedule

def test_lr_schedule_warmup_peak_and_end():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, max_lr=6e-4, min_lr=6e-5)
    assert get_lr(0, cfg) == pytest.approx(6e-4 / 10)  # warm-up starts at max_lr / warmup
    assert get_lr(4, cfg) == pytest.approx(6e-4 * 5 / 10)
    assert get_lr(9, cfg) == pytest.approx(6e-4)  # peak at the end of warm-up
    assert get_lr(10, cfg) == pytest.approx(6e-4)  # cosine starts at the peak
    assert get_lr(55, cfg) == pytest.approx((6e-4 + 6e-5) / 2)  # half-way down the cosine
    assert get_lr(100, cfg) == pytest.approx(6e-5)
    assert get_lr(10_000, cfg) == pytest.approx(6e-5)  # after max_steps: min_lr
    decay = [get_lr(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_lr_schedule_min_lr_defaults_to_a_tenth():
    cfg = TrainConfig(max_steps=20, warmup_steps=0, max_lr=1e-3).resolved("cpu")
    assert cfg.min_lr == pytest.approx(1e-4)
    assert get_lr(0, cfg) == pytest.approx(1e-3)
    assert get_lr(20, cfg) == pytest.approx(1e-4)


# --------------------------------------------------------------------- config

@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), r"batch_size \(--batch-size\) must be >= 1"),
    (dict(dtype="fp16"), r"dtype \(--dtype\) must be one of"),
    (dict(device="tpu"), r"device \(--device\) must be one of"),
    (dict(cuda_graphs="maybe"), r"cuda_graphs \(--cuda-graphs\) must be one of"),
    (dict(max_lr=-1.0), r"max_lr \(--max-lr\) must be >= 0"),
    (dict(max_lr=1e-3, min_lr=1e-2), r"min_lr \(--min-lr\) .* must be <= max_lr"),
    (dict(betas=(0.9, 1.5)), r"betas \(--betas\) must be two numbers"),
    (dict(model="gpt5"), r"model \(--model\) must be one of auto, gpt2"),
    (dict(batch_size=4, seq_len=32, total_batch_size=1000),
     r"total_batch_size \(--total-batch-size\) 1000 is not divisible by .* = 128"),
    (dict(max_steps=5, warmup_steps=6), r"warmup_steps \(--warmup-steps\) \(6\) must be <= max_steps"),
    (dict(resume="x", init_from="y"), r"--init-from and --resume exclude each other"),
])
def test_config_validation_names_the_field(kwargs, message):
    with pytest.raises(UserInputError, match=message):
        TrainConfig(**kwargs)


def test_total_batch_divisibility_includes_world_size():
    cfg = TrainConfig(batch_size=4, seq_len=32, total_batch_size=128)
    assert cfg.resolved("cpu", world_size=1).accumulation(1) == 1
    with pytest.raises(UserInputError, match=r"4 \* 32 \* 2 = 256"):
        cfg.resolved("cpu", world_size=2).accumulation(2)


def test_auto_defaults_follow_the_device():
    cpu = TrainConfig().resolved("cpu")
    cuda = TrainConfig().resolved("cuda")
    assert (cpu.model, cpu.batch_size, cpu.seq_len) == ("tiny", 16, 64)
    assert cpu.total_batch_size == 16 * 64  # one micro-step per step on CPU
    assert (cuda.model, cuda.seq_len, cuda.total_batch_size, cuda.max_steps, cuda.warmup_steps,
            cuda.max_lr) == ("gpt2", 1024, 524288, 19073, 715, 6e-4)
    assert cuda.total_batch_size % (cuda.batch_size * cuda.seq_len) == 0
    assert set(AUTO_DEFAULTS["cpu"]) == set(AUTO_DEFAULTS["cuda"])
    # explicit values win over auto
    assert TrainConfig(batch_size=2).resolved("cuda").batch_size == 2


# --------------------------------------------------------------------- optimizer

def test_weight_decay_only_on_matrices():
    model = GPT(GPTConfig.from_preset("tiny", n_layer=1, vocab_size=256, backend="torch"))
    groups = param_groups(model, 0.1)
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in groups[0]["params"])
    assert all(p.dim() < 2 for p in groups[1]["params"])
    n = sum(p.numel() for g in groups for p in g["params"])
    assert n == model.num_parameters()  # the tied embedding counted once
    lines = []
    opt = configure_optimizer(model, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, device="cpu",
                              kind="torch", log=lines.append)
    assert isinstance(opt, torch.optim.AdamW)
    assert any("num decayed parameter tensors" in ln for ln in lines)


# --------------------------------------------------------------------- accumulation

def test_gradient_accumulation_equals_the_big_batch():
    """train_step over 2 micro-batches of 4 gives the loss and gradients of one batch of 8."""
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("tiny", n_layer=2, n_embd=64, vocab_size=256, backend="torch")
    model = GPT(cfg)
    x = torch.randint(0, 256, (8, 32))
    y = torch.randint(0, 256, (8, 32))
    frozen = torch.optim.SGD(model.parameters(), lr=0.0)  # the step leaves the weights as they are
    import contextlib

    def grads(xs, ys):
        loss, _ = train_step(model, frozen, xs, ys, grad_clip=0.0, autocast=contextlib.nullcontext)
        return loss, {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_big, g_big = grads(x[None], y[None])
    loss_acc, g_acc = grads(x.view(2, 4, 32), y.view(2, 4, 32))
    assert abs(loss_big.item() - loss_acc.item()) <= 1e-6 * abs(loss_big.item())
    for name in g_big:
        err = rel_err(g_acc[name], g_big[name])
        assert err <= 1e-6, f"{name}: relative error {err:.2e}"
    # and the check can fail: micro-batches of different sizes weigh tokens differently
    loss_one, _ = grads(x[:4][None], y[:4][None])
    assert abs(loss_one.item() - loss_big.item()) > 1e-4


@pytest.mark.parametrize("kind", ["torch", "torch-fused", "triton"],
                         ids=["host-check", "found_inf-torch-fused", "found_inf-FusedAdamW"])
def test_a_non_finite_step_never_reaches_the_weights(kind):
    """A NaN loss: train_step reports it and the optimizer leaves weights, moments and
    step counts as they were (the fused optimizers through the device-side found_inf
    flag, no host sync)."""
    import contextlib
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=67, n_layer=1, n_head=2, n_embd=16, backend="torch"))
    if kind == "triton":
        pytest.importorskip("triton")
        from gpt2_kernels import FusedAdamW
        opt = FusedAdamW(model.parameters(), lr=1e-2)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=kind == "torch-fused")
    xs = torch.randint(0, 67, (1, 2, 16))
    train_step(model, opt, xs, xs, grad_clip=1.0, autocast=contextlib.nullcontext)  # a good step
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    moments = {n: opt.state[p]["exp_avg"].clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.transformer.wpe.weight[3, 0] = float("nan")
    loss, norm = train_step(model, opt, xs, xs, grad_clip=1.0, autocast=contextlib.nullcontext)
    assert not math.isfinite(loss.item())
    for name, p in model.named_parameters():
        if name != "transformer.wpe.weight":
            assert torch.equal(p, before[name]), name
        assert torch.equal(opt.state[p]["exp_avg"], moments[name]), name
        assert float(opt.state[p]["step"]) == 1.0, name


@pytest.mark.smoke
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_an_all_ignored_batch_is_a_zero_loss_step_on_every_backend(backend):
    """Targets all -100 (nothing to predict): the step's loss and gradient norm are 0
    on both backends (not NaN on one of them), so the step counts as finite and is
    taken, not skipped as a divergence. On CPU the triton backend runs in the interpreter."""
    import contextlib
    if backend == "triton":
        pytest.importorskip("triton")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=32, backend=backend))
    model.to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    before = model.lm_head.weight.detach().clone()
    xs = torch.randint(0, 64, (1, 2, 16), device=DEVICE)
    ys = torch.full((1, 2, 16), -100, dtype=torch.long, device=DEVICE)
    loss, norm = train_step(model, opt, xs, ys, grad_clip=1.0, autocast=contextlib.nullcontext)
    assert loss.item() == 0.0 and norm.item() == 0.0
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
    assert not torch.equal(model.lm_head.weight, before)  # taken: weight decay moved the weights


# --------------------------------------------------------------------- the loop

def test_loss_falls_on_real_text(corpus, tmp_path):
    """English prose that every machine has (the corpus fixture); the default run on
    tiny-shakespeare is tests/test_defaults.py."""
    lines = []
    # the tiny preset as it is (4 layers, 128 wide), byte-level vocabulary
    cfg = tiny_cfg(corpus, tmp_path / "run", n_layer=None, n_embd=None, n_head=None,
                   batch_size=16, seq_len=64,
                   max_steps=40, warmup_steps=10, max_lr=2e-3, eval_interval=20, eval_batches=2,
                   sample_interval=39, checkpoint_interval=40)
    trainer = train(cfg, log=lines.append)
    losses = [h["loss"] for h in trainer.history]
    assert len(losses) == 40
    first, last = losses[0], sum(losses[-5:]) / 5
    assert first > 5.0  # about ln(256) for a fresh byte-level model
    assert last < first - 2.0, f"loss went from {first:.3f} to {last:.3f}"
    # the log: device/dtype/backend/optimizer/corpus/tokenizer/params, then one line per step
    assert lines[0].startswith("device: cpu")  # the header comes first
    text = "\n".join(lines)
    for word in ("device: cpu", "dtype: fp32", "backend: torch", "optimizer: torch AdamW",
                 "tokenizer: bytes", "parameters", "corpus:", "cuda graphs: off"):
        assert word in text, word
    step_lines = [ln for ln in lines if ln.startswith("step ")]
    assert len(step_lines) == 40 and all(LOG_LINE.match(ln) for ln in step_lines), step_lines[:2]
    assert sum("validation loss" in ln for ln in lines) == 3  # steps 0, 20, 39
    assert any(ln.startswith("sample 0:") for ln in lines)
    # the CSV matches the history; val loss where evaluated
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(40))
    assert [float(r["loss"]) for r in rows] == pytest.approx(losses)
    assert [r["step"] for r in rows if r["val_loss"]] == ["0", "20", "39"]
    assert (tmp_path / "run" / "ckpt_000040.pt").is_file()
    assert (tmp_path / "run" / "loss.png").is_file()


@pytest.mark.smoke
def test_resume_continues_exactly(corpus, tmp_path):
    full = train(tiny_cfg(corpus, tmp_path / "a", checkpoint_interval=2, keep_checkpoints=0), log=quiet)
    assert [p.name for p in ckpt_lib.list_checkpoints(tmp_path / "a")] == ["ckpt_000002.pt", "ckpt_000004.pt"]
    resumed = train(tiny_cfg(corpus, tmp_path / "b", resume=str(tmp_path / "a" / "ckpt_000002.pt")),
                    log=quiet)
    a = [h["loss"] for h in full.history]
    b = [h["loss"] for h in resumed.history if h["step"] >= 2]
    # the history (and so the plot) of a run resumed into another folder starts at step 0
    assert [h["step"] for h in resumed.history] == [0, 1, 2, 3]
    assert [r.split(",")[0] for r in (tmp_path / "b" / "metrics.csv").read_text().splitlines()] == \
        ["step", "0", "1", "2", "3"]
    assert b == pytest.approx(a[2:], rel=1e-6, abs=0)
    # the resumed model ends where the uninterrupted one ended
    for (name, p), q in zip(full.raw_model.named_parameters(), resumed.raw_model.parameters()):
        assert rel_err(q, p) <= 1e-6, name
    # a run folder resumes from its latest checkpoint: step 4 = max_steps, nothing to do
    with pytest.raises(RunFinished, match=r"this run is finished \(step 4 of max_steps 4\)"):
        Trainer(tiny_cfg(corpus, tmp_path / "c", resume=str(tmp_path / "a")), log=quiet)


def test_resume_rejects_a_different_batch_geometry(corpus, tmp_path):
    train(tiny_cfg(corpus, tmp_path / "a", max_steps=1, warmup_steps=0, checkpoint_interval=1), log=quiet)
    with pytest.raises(UserInputError, match=r"resume: --batch-size 2 would change the run in .*ckpt_000001.pt, "
                                             r"which has batch_size = 4"):
        Trainer(tiny_cfg(corpus, tmp_path / "b", batch_size=2, max_steps=2, warmup_steps=0,
                         resume=str(tmp_path / "a")), log=quiet)


def poison_steps(trainer, bad_steps):
    """Make the loss NaN at the given steps (one forward per step: accum 1)."""
    ops = trainer.raw_model.ops
    original = ops.linear_cross_entropy
    calls = {"step": -1}

    def poisoned(*args, **kwargs):
        calls["step"] += 1
        loss = original(*args, **kwargs)
        return loss * float("nan") if calls["step"] in bad_steps else loss

    ops.linear_cross_entropy = poisoned


def test_a_non_finite_step_is_skipped_and_the_run_goes_on(corpus, tmp_path):
    trainer = Trainer(tiny_cfg(corpus, tmp_path / "run", max_steps=5), log=quiet)
    poison_steps(trainer, {2})
    trainer.run()
    assert [h["skipped"] for h in trainer.history] == [False, False, True, False, False]
    assert trainer.bad_streak == 0
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert rows[3].startswith("2,nan,") and rows[3].endswith(",1")  # the CSV's skipped column


@pytest.mark.parametrize("keep", [0, 1])
def test_max_bad_steps_in_a_row_stop_and_keep_the_last_good_checkpoint(corpus, tmp_path, keep):
    """Steps 2, 3, 4 non-finite: skipped (the weights stay as they were), checkpoints of
    those unchanged weights still written, the third in a row stops the run; with
    --keep-checkpoints 1 rotation has kept the last good checkpoint, which the message names."""
    trainer = Trainer(tiny_cfg(corpus, tmp_path / "run", max_steps=8, checkpoint_interval=1,
                               keep_checkpoints=keep, max_bad_steps=3), log=quiet)
    poison_steps(trainer, {2, 3, 4})
    with pytest.raises(TrainingDiverged, match=r"step 4 has loss nan .* 3 non-finite step\(s\) in a row "
                                               r"\(--max-bad-steps 3\).*Last good checkpoint: .*ckpt_000004.pt"):
        trainer.run()
    names = [p.name for p in ckpt_lib.list_checkpoints(tmp_path / "run")]
    assert names == (["ckpt_000001.pt", "ckpt_000002.pt", "ckpt_000003.pt", "ckpt_000004.pt"] if keep == 0
                     else ["ckpt_000004.pt"])
    states = [ckpt_lib.load_checkpoint(tmp_path / "run" / n) for n in names]
    assert all(torch.isfinite(t).all() for s in states for t in s["model"].values())
    if keep == 0:  # the skipped steps 2 and 3 left the weights of step 2 untouched
        for k, w in states[1]["model"].items():
            assert torch.equal(states[3]["model"][k], w), k
    assert (tmp_path / "run" / "loss.png").is_file()  # the plot up to the divergence


def test_a_non_finite_last_step_stops_without_a_final_checkpoint(corpus, tmp_path):
    trainer = Trainer(tiny_cfg(corpus, tmp_path / "run", max_steps=4, checkpoint_interval=2), log=quiet)
    poison_steps(trainer, {3})
    with pytest.raises(TrainingDiverged, match=r"step 3 .* 1 non-finite step\(s\) in a row \(the last step\)"):
        trainer.run()
    assert [p.name for p in ckpt_lib.list_checkpoints(tmp_path / "run")] == ["ckpt_000002.pt"]


def test_a_bad_streak_survives_a_resume(corpus, tmp_path):
    """The count of non-finite steps in a row is part of the checkpoint."""
    trainer = Trainer(tiny_cfg(corpus, tmp_path / "run", max_steps=4, checkpoint_interval=3), log=quiet)
    poison_steps(trainer, {1, 2})
    trainer.run()
    assert ckpt_lib.load_checkpoint(tmp_path / "run" / "ckpt_000003.pt")["bad_streak"] == 2
    resumed = Trainer(tiny_cfg(corpus, tmp_path / "run", max_steps=4, resume=str(tmp_path / "run" /
                                                                                 "ckpt_000003.pt")), log=quiet)
    assert resumed.bad_streak == 2


def test_resume_takes_the_checkpoints_configuration(corpus, tmp_path):
    """Only --resume given: every value comes from the checkpoint, also ones that
    differ from the defaults (data, tokenizer, batch, schedule, seed)."""
    train(tiny_cfg(corpus, tmp_path / "a", max_steps=2, checkpoint_interval=2, max_lr=2e-3, seed=5), log=quiet)
    cfg = TrainConfig(resume=str(tmp_path / "a"), max_steps=3)
    trainer = Trainer(cfg, log=quiet, explicit={"resume", "max_steps"})
    c = trainer.cfg
    assert (c.data, c.tokenizer, c.batch_size, c.seq_len, c.max_lr, c.seed, c.n_layer, c.max_steps) == \
        (str(corpus), "bytes", 4, 32, 2e-3, 5, 2, 3)
    assert trainer.run_dir == tmp_path / "a"
    import json
    assert json.loads((tmp_path / "a" / "config.json").read_text())["train"]["max_lr"] == 2e-3
    trainer.close()  # built but not run: hand the run folder back
    # the same values given explicitly are accepted; "auto" for a fixed field means the run's
    Trainer(TrainConfig(resume=str(tmp_path / "a"), max_steps=3, max_lr=2e-3, batch_size=None),
            log=quiet, explicit={"resume", "max_steps", "max_lr", "batch_size"})


def test_init_from_hugging_face(tmp_path, corpus):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(vocab_size=256, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    cfg = tiny_cfg(corpus, tmp_path / "run", init_from=str(tmp_path / "hf"), max_steps=1,
                   warmup_steps=0)
    trainer = Trainer(cfg, log=quiet)
    assert trainer.model_config.n_embd == 32 and trainer.model_config.block_size == 64
    x, y = trainer.train_loader.next_batch()
    trainer.train_loader.reset()
    with torch.no_grad():
        logits = hf(input_ids=x).logits
        expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), y.reshape(-1)).item()
    trainer.run()
    assert trainer.history[0]["loss"] == pytest.approx(expected, rel=1e-5)


def test_init_from_rejects_a_too_short_context(tmp_path, corpus):
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=256, n_positions=16, n_embd=32,
                                                              n_layer=1, n_head=2))
    hf.save_pretrained(tmp_path / "hf")
    with pytest.raises(UserInputError, match="seq_len .* exceeds the model's block_size 16"):
        Trainer(tiny_cfg(corpus, tmp_path / "run", init_from=str(tmp_path / "hf")), log=quiet)


# --------------------------------------------------------------------- CUDA graphs

@pytest.mark.parametrize("args, reason", [
    (("auto", "cpu", "triton", False, False), "the device is cpu"),
    (("auto", "mps", "torch", False, False), "the device is mps"),
    (("auto", "cuda", "torch", False, False), "the backend is torch"),
    (("auto", "cuda", "triton", True, False), "compile is on"),
    (("auto", "cuda", "triton", False, True), "DDP is on"),
    (("off", "cuda", "triton", False, False), "cuda_graphs=off"),
    (("auto", "cuda", "triton", False, False, True), "--profile traces eager steps"),
    (("auto", "cuda", "triton", False, True, False, True), "FSDP is on"),
    (("auto", "cuda", "triton", False, False, False, True), "FSDP is on"),  # FSDP in one process
])
def test_graph_fallback_reasons(args, reason):
    use, why = graph_decision(*args)
    assert not use and reason in why


def test_graphs_used_where_possible():
    assert graph_decision("auto", "cuda", "triton", False, False) == (True, "capturing the training step "
                                                                            "in a CUDA graph")
    assert graph_decision("on", "cuda", "triton", False, False)[0]


@pytest.mark.parametrize("args", [("on", "cpu", "torch", False, False), ("on", "cuda", "triton", True, False),
                                  ("on", "cuda", "triton", False, True)])
def test_graphs_on_errors_where_impossible(args):
    with pytest.raises(UserInputError, match="cuda_graphs=on but"):
        graph_decision(*args)


def test_graphs_on_with_the_cpu_trainer_errors(corpus, tmp_path):
    with pytest.raises(UserInputError, match="cuda_graphs=on but the device is cpu"):
        Trainer(tiny_cfg(corpus, tmp_path / "run", cuda_graphs="on"), log=quiet)


def _gpu_cfg(corpus, run_dir, graphs, **kw):
    # head dim 64: a size every attention kernel configuration supports
    return tiny_cfg(corpus, run_dir, **{**dict(device="cuda", backend="triton", cuda_graphs=graphs, dtype="bf16",
                                               n_embd=128, n_head=2, max_steps=8, batch_size=4, seq_len=64,
                                               total_batch_size=512), **kw})


@pytest.mark.gpu
def test_gpu_graph_replay_matches_eager_steps(corpus, tmp_path):
    eager = train(_gpu_cfg(corpus, tmp_path / "eager", "off"), log=quiet)
    lines = []
    graphed = train(_gpu_cfg(corpus, tmp_path / "graph", "on"), log=lines.append)
    assert graphed.graphed is not None and graphed.graphed.captured, lines
    a = [h["loss"] for h in eager.history]
    b = [h["loss"] for h in graphed.history]
    assert len(a) == len(b) == 8
    # The same kernels on the same batches: the replayed graph computes what the
    # eager steps compute, up to the order of a reduction at most.
    assert b == pytest.approx(a, rel=1e-5)
    na = [h["grad_norm"] for h in eager.history]
    nb = [h["grad_norm"] for h in graphed.history]
    assert nb == pytest.approx(na, rel=1e-5)


@pytest.mark.gpu
def test_gpu_resume_with_the_fusions_and_weight_copies_continues_exactly(corpus, tmp_path):
    """The CUDA default (bf16 residual stream, every fusion, FusedAdamW writing the
    matmuls' bf16 weight copies): a run resumed from its step-4 checkpoint takes
    the same steps bit for bit. The checkpoint holds the fp32 masters only; the
    resumed run makes its copies from them."""
    full = train(_gpu_cfg(corpus, tmp_path / "a", "off", checkpoint_interval=4, keep_checkpoints=0), log=quiet)
    assert full.raw_model.weight_copies is not None and full.model_config.residual_dtype == "bf16"
    resumed = train(_gpu_cfg(corpus, tmp_path / "b", "off", resume=str(tmp_path / "a" / "ckpt_000004.pt")),
                    log=quiet)
    assert [h["loss"] for h in resumed.history if h["step"] >= 4] == [h["loss"] for h in full.history][4:]
    for (name, p), q in zip(full.raw_model.named_parameters(), resumed.raw_model.parameters()):
        assert torch.equal(p, q), name
    state = ckpt_lib.load_checkpoint(tmp_path / "a" / "ckpt_000004.pt")
    assert {v.dtype for v in state["model"].values() if v.is_floating_point()} == {torch.float32}


@pytest.mark.gpu
def test_gpu_graph_replay_has_no_host_sync(corpus, tmp_path):
    from engine.optim import set_lr
    trainer = Trainer(_gpu_cfg(corpus, tmp_path / "run", "on"), log=quiet)
    for step in range(4):  # warm-up steps, then the capture
        trainer.take_step(step)
    assert trainer.graphed.captured
    x, y = trainer.train_loader.next_batch()
    xs = torch.stack([x] * trainer.accum)
    ys = torch.stack([y] * trainer.accum)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        set_lr(trainer.optimizer, 1e-4)
        loss, norm = trainer.graphed.step(xs, ys)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert math.isfinite(loss.item()) and math.isfinite(norm.item())


@pytest.mark.gpu
@pytest.mark.parametrize("optimizer", ["torch", "triton"])
def test_gpu_graph_replays_skip_non_finite_steps_on_the_device(corpus, tmp_path, optimizer):
    """Steps 5-7 non-finite while the captured graph replays: the optimizer skips them
    on the device (found_inf), the weights and step counts stay those of step 4, and the
    third stops the run before any checkpoint of a later state. The poison is a device
    scalar the graph reads, set before each replay from the step's data loading."""
    if optimizer == "triton":
        from gpt2_kernels import FusedAdamW
        if not getattr(FusedAdamW, "supports_found_inf", False):
            pytest.skip("FusedAdamW does not honour found_inf yet: its step syncs the host, which a capture refuses")
    trainer = Trainer(_gpu_cfg(corpus, tmp_path / "run", "on", optimizer=optimizer, max_steps=12,
                               checkpoint_interval=1, keep_checkpoints=0, max_bad_steps=3), log=quiet)
    scale = torch.ones((), device="cuda")
    ops, loader = trainer.raw_model.ops, trainer.train_loader
    original_loss, original_next = ops.linear_cross_entropy, loader.next_batch
    calls = {"n": 0}

    def next_batch():
        step = calls["n"] // trainer.accum
        calls["n"] += 1
        scale.fill_(float("nan") if step in (5, 6, 7) else 1.0)
        return original_next()

    ops.linear_cross_entropy = lambda *a, **k: original_loss(*a, **k) * scale
    loader.next_batch = next_batch
    with pytest.raises(TrainingDiverged, match="step 7 has loss nan"):
        trainer.run()
    assert trainer.graphed is not None and trainer.graphed.captured
    names = [p.name for p in ckpt_lib.list_checkpoints(tmp_path / "run")]
    assert names == [ckpt_lib.checkpoint_name(s) for s in range(1, 8)]
    c4, c5, c6, c7 = (ckpt_lib.load_checkpoint(tmp_path / "run" / ckpt_lib.checkpoint_name(s)) for s in (4, 5, 6, 7))
    assert any(not torch.equal(c4["model"][k], c5["model"][k]) for k in c5["model"])  # step 4 was taken
    for later in (c6, c7):  # steps 5 and 6 were not: weights, moments and step counts as after step 4
        for k, w in c5["model"].items():
            assert torch.equal(later["model"][k], w), k
        a, b = list(_tensors(later["optimizer"]["state"])), list(_tensors(c5["optimizer"]["state"]))
        assert len(a) == len(b) > 0 and all(torch.equal(x, y) for x, y in zip(a, b))


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for k in sorted(tree, key=str):
            yield from _tensors(tree[k])
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _tensors(v)


# --------------------------------------------------------------------- other modes

def test_profile_writes_a_trace(corpus, tmp_path):
    lines = []
    trainer = train(tiny_cfg(corpus, tmp_path / "run", profile=True, max_steps=10), log=lines.append)
    assert (tmp_path / "run" / "trace.json").is_file()
    assert len(trainer.history) == 5  # wait + warmup + active steps
    trace = (tmp_path / "run" / "trace.json").read_text()
    for phase in ("forward", "backward", "optimizer_step", "data_loading"):
        assert f'"{phase}"' in trace, phase


def test_cpu_run_on_a_machine_with_a_gpu_uses_the_torch_backend(corpus, tmp_path, monkeypatch):
    """`--device cpu` on a CUDA machine: backend auto must resolve for the CPU, and
    TF32 (a CUDA-only switch the trainer flips process-wide) stays untouched."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    tf32 = torch.backends.cuda.matmul.allow_tf32
    lines = []
    trainer = train(tiny_cfg(corpus, tmp_path / "run", max_steps=1, warmup_steps=0, backend="auto"),
                    log=lines.append)
    assert trainer.backend == "torch" and trainer.raw_model.backend == "torch"
    assert any("backend: torch" in line for line in lines), lines[:5]
    assert torch.backends.cuda.matmul.allow_tf32 == tf32


@pytest.mark.skipif(ON_GPU, reason="runs FusedAdamW on CPU tensors through the interpreter; on a GPU "
                                   "test_adamw.py and the gpu-marked trainer tests cover it")
def test_triton_optimizer_in_the_interpreter(corpus, tmp_path):
    """The FusedAdamW path (set_lr into its device lr, zero_grad keeping grads) gives
    the same losses as torch's AdamW."""
    pytest.importorskip("triton")
    kw = dict(max_steps=3, warmup_steps=1, n_layer=1, n_embd=32, batch_size=2, seq_len=16)
    ref = train(tiny_cfg(corpus, tmp_path / "torch", optimizer="torch", **kw), log=quiet)
    ours = train(tiny_cfg(corpus, tmp_path / "triton", optimizer="triton", **kw), log=quiet)
    assert ours.optimizer_kind == "triton"
    a = [h["loss"] for h in ref.history]
    b = [h["loss"] for h in ours.history]
    assert b == pytest.approx(a, rel=1e-5)


def test_bf16_params_mode_trains(corpus, tmp_path):
    lines = []
    trainer = train(tiny_cfg(corpus, tmp_path / "run", dtype="bf16-params", max_steps=3, warmup_steps=1),
                    log=lines.append)
    assert trainer.raw_model.lm_head.weight.dtype == torch.bfloat16
    assert all(math.isfinite(h["loss"]) for h in trainer.history)
    assert any("torch's AdamW keeps its moments in bf16" in ln for ln in lines)


def test_logging_can_lag_one_step_behind_the_queued_step(corpus, tmp_path):
    """On CUDA the log reads step N's loss after step N+1 is queued (no idle GPU):
    _flush(keep_newest=True) logs all but the newest pending step."""
    lines = []
    trainer = Trainer(tiny_cfg(corpus, tmp_path / "run"), log=lines.append)
    trainer._reset_clock()
    for step in range(3):
        trainer._pending.append((step, 1e-3, torch.tensor(2.0 + step), torch.tensor(0.5)))
    trainer._flush(keep_newest=True)
    logged = [ln for ln in lines if ln.startswith("step ")]
    assert [ln.split("|")[0].strip() for ln in logged] == ["step     0/4", "step     1/4"]
    assert [p[0] for p in trainer._pending] == [2]
    trainer._flush()
    assert not trainer._pending and sum(ln.startswith("step ") for ln in lines) == 3


def test_the_run_folder_keeps_the_log_and_a_resume_appends_to_it(corpus, tmp_path):
    run = tmp_path / "run"
    lines = []
    train(tiny_cfg(corpus, run, max_steps=3, warmup_steps=1, sample_interval=2, checkpoint_interval=3),
          log=lines.append)
    assert (run / "log.txt").read_text().splitlines() == lines
    assert lines[1].startswith("cpu threads: ") and any(ln.startswith("sample 0:") for ln in lines)
    step_lines = [ln for ln in lines if ln.startswith("step ")]
    assert step_lines[-1].startswith("step     2/3 |") and step_lines[-1].endswith("eta 0:00:00")
    more = []
    train(tiny_cfg(corpus, run, max_steps=4, resume=str(run)), log=more.append, explicit={"max_steps", "resume"})
    assert (run / "log.txt").read_text().splitlines() == lines + more
    assert any(ln.startswith("resume: using") or ln.startswith("resume: max_steps") for ln in more)


def test_extending_a_finished_run_keeps_its_schedule_unless_asked_to_replan(corpus, tmp_path):
    """The added steps run at the old schedule's floor (the promise that a resumed
    run keeps its schedule); --lr-decay-steps re-plans the cosine over the new length."""
    base = dict(max_steps=6, warmup_steps=2, checkpoint_interval=6, keep_checkpoints=0)
    run = tmp_path / "a"
    first = train(tiny_cfg(corpus, run, **base), log=quiet)
    floor = first.cfg.min_lr
    kept_log = []
    kept = train(tiny_cfg(corpus, run, **{**base, "max_steps": 9}, resume=str(run)), log=kept_log.append,
                 explicit={"max_steps", "resume"})
    assert [h["lr"] for h in kept.history[:6]] == [h["lr"] for h in first.history]
    assert [h["lr"] for h in kept.history[6:]] == [floor] * 3
    assert any("max_steps 6 -> 9: the learning rate keeps its schedule, so steps 6..8 run at its floor" in ln
               and "--lr-decay-steps 9" in ln for ln in kept_log)

    replan_log = []
    replanned = train(tiny_cfg(corpus, tmp_path / "b", **{**base, "max_steps": 9}, resume=str(run / "ckpt_000006.pt"),
                               lr_decay_steps=9), log=replan_log.append,
                      explicit={"max_steps", "resume", "lr_decay_steps", "run_dir"})
    expected = [get_lr(step, replanned.cfg) for step in range(6, 9)]
    assert [h["lr"] for h in replanned.history[6:]] == pytest.approx(expected)
    assert replanned.history[6]["lr"] > floor
    assert any("re-plans the cosine over 9 steps" in ln for ln in replan_log)


def test_resuming_an_earlier_checkpoint_sets_the_later_ones_aside(corpus, tmp_path):
    run = tmp_path / "a"
    train(tiny_cfg(corpus, run, checkpoint_interval=2, keep_checkpoints=0), log=quiet)
    lines = []
    train(tiny_cfg(corpus, run, checkpoint_interval=2, keep_checkpoints=0, max_steps=3,
                   resume=str(run / "ckpt_000002.pt")), log=lines.append)
    assert any("moved 1 later checkpoint" in ln for ln in lines)
    assert [p.name for p in ckpt_lib.list_checkpoints(run)] == ["ckpt_000002.pt", "ckpt_000003.pt"]
    aside = list((run / "superseded").glob("*/ckpt_000004.pt"))
    assert len(aside) == 1  # kept, not deleted
    with pytest.raises(RunFinished, match="step 3 of max_steps 3"):
        Trainer(tiny_cfg(corpus, run, max_steps=3, resume=str(run)), log=quiet)

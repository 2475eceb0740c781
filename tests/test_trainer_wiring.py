"""What the trainer takes from the rest of the engine: HellaSwag at its eval
intervals (log line, metrics.csv, the plot), and the tokenizer a trained model
needs (never the byte fallback for a GPT-2 BPE model: it fails at once instead)."""
import csv

import pytest
import torch

from engine.errors import UserInputError
from engine.eval import evaluate_hellaswag, load_hellaswag
from engine.tokenizer import ByteTokenizer
from tests.test_eval import make_items, write_jsonl
from tests.test_trainer import quiet, tiny_cfg


def test_hellaswag_at_every_eval_interval(corpus, tmp_path):
    from engine.trainer import Trainer, train
    data = write_jsonl(tmp_path / "hs.jsonl", make_items(6))
    # The step-0 figure is what engine.eval computes for the initial model on those items.
    fresh = Trainer(tiny_cfg(corpus, tmp_path / "fresh"), log=quiet)
    expected = evaluate_hellaswag(fresh.raw_model.eval(), load_hellaswag(data), ByteTokenizer(), "cpu")
    fresh.close()
    lines = []
    train(tiny_cfg(corpus, tmp_path / "run", hellaswag=str(data), max_steps=3, warmup_steps=1, eval_interval=2),
          log=lines.append)
    scored = [ln for ln in lines if "hellaswag acc" in ln]
    assert len(scored) == 2, lines  # steps 0 and 2 (the last)
    assert scored[0].startswith("validation loss: ") and "(6 items)" in scored[0]
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    marked = [r for r in rows if r["hellaswag_acc_norm"]]
    assert [r["step"] for r in marked] == ["0", "2"]
    assert float(marked[0]["hellaswag_acc"]) == pytest.approx(expected["acc"])
    assert float(marked[0]["hellaswag_acc_norm"]) == pytest.approx(expected["acc_norm"])
    assert (tmp_path / "run" / "loss.png").is_file()


def test_a_bad_hellaswag_file_fails_before_training(corpus, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    from engine.trainer import Trainer
    with pytest.raises(UserInputError, match="bad.jsonl"):
        Trainer(tiny_cfg(corpus, tmp_path / "run", hellaswag=str(bad)), log=quiet)
    assert not (tmp_path / "run" / "metrics.csv").exists()


def _without_gpt2_bpe(monkeypatch, tmp_path):
    """No network and an empty tiktoken cache: the GPT-2 BPE files cannot be had."""
    import tiktoken.load
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))

    def offline(*args, **kwargs):
        raise ConnectionError("no network")
    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    import tiktoken.registry
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})


def test_init_from_a_gpt2_vocabulary_model_without_its_bpe_fails_at_once(corpus, tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32,
                                                              n_layer=1, n_head=2))
    hf.save_pretrained(tmp_path / "hf")
    _without_gpt2_bpe(monkeypatch, tmp_path)
    from engine.trainer import Trainer
    with pytest.raises(UserInputError) as e:
        Trainer(tiny_cfg(corpus, tmp_path / "run", init_from=str(tmp_path / "hf"), tokenizer="auto"), log=quiet)
    message = str(e.value)
    assert "--init-from" in message and "gpt2 tokenizer" in message and "TIKTOKEN_CACHE_DIR" in message
    assert "\n" not in message and len(message) < 400
    assert not (tmp_path / "run" / "metrics.csv").exists()  # nothing trained


def test_resuming_a_gpt2_run_without_its_bpe_fails_at_once(corpus, gpt2, tmp_path, monkeypatch):
    from engine.trainer import Trainer, train
    run = tmp_path / "run"
    kw = dict(tokenizer="gpt2", n_embd=32, warmup_steps=0, checkpoint_interval=1)
    train(tiny_cfg(corpus, run, max_steps=1, **kw), log=quiet)
    _without_gpt2_bpe(monkeypatch, tmp_path)
    with pytest.raises(UserInputError) as e:
        Trainer(tiny_cfg(corpus, run, max_steps=2, resume=str(run), **kw), log=quiet)
    message = str(e.value)
    assert message.startswith(f"--resume {run} was trained with the gpt2 tokenizer") and "TIKTOKEN_CACHE_DIR" in message


def test_deterministic_reaches_the_model_and_a_resume_may_change_it(corpus, tmp_path):
    """--deterministic (default on) is the model's attention backward; it is
    resume-safe: a resumed run takes the value given (the math is the same,
    only the bits of dq's rounding can differ)."""
    from engine.trainer import Trainer, train
    run = tmp_path / "run"
    trainer = train(tiny_cfg(corpus, run, max_steps=1, warmup_steps=0, checkpoint_interval=1), log=quiet)
    assert trainer.cfg.deterministic and trainer.raw_model.config.deterministic
    resumed = Trainer(tiny_cfg(corpus, run, max_steps=2, warmup_steps=0, checkpoint_interval=1,
                               resume=str(run), deterministic=False), log=quiet)
    assert resumed.raw_model.config.deterministic is False
    resumed.close()

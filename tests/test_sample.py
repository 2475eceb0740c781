"""sample.py and engine.load: a run folder, a checkpoint file and a Hugging Face
folder load the same model; tokens stream as generated and are generate()'s
tokens; bad input is one `error:` line with exit status 2."""
import re
import subprocess
import sys

import pytest
import torch

import sample
from engine import GPT, GPTConfig
from engine import checkpoint as ckpt_lib
from engine.errors import UserInputError
from engine.generate import generate
from engine.load import load_model
from engine.sources import source_tokenizer_name
from engine.tokenizer import TokenizerUnavailableError, get_tokenizer
from tests.helpers import REPO_ROOT, child_env, rel_err

SPEED_LINE = re.compile(r"^\d+ tokens in [\d.]+ s: [\d.]+ tokens/s \| time to first token [\d.]+ ms")


def tiny_model(vocab=256, seed=0, n_head=2):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=64, vocab_size=vocab, n_layer=2, n_head=n_head, n_embd=32,
                         backend="torch")).eval()


def write_run(run_dir, model, step, tokenizer="bytes"):
    """A checkpoint in the trainer's format (Trainer.save_checkpoint)."""
    state = {"version": ckpt_lib.FORMAT_VERSION, "step": step, "model": model.state_dict(), "optimizer": {},
             "train_loader": {}, "val_loader": {}, "rng": {}, "train_config": {"tokenizer": tokenizer},
             "model_config": model.config.to_dict(), "tokenizer": tokenizer, "world_size": 1}
    return ckpt_lib.save_checkpoint(run_dir, step, state)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same byte-level model as a run folder (whose newest checkpoint is
    damaged), a checkpoint file and a Hugging Face folder."""
    root = tmp_path_factory.mktemp("sources")
    model = tiny_model()
    run = root / "run"
    write_run(run, tiny_model(seed=1), step=2)
    good = write_run(run, model, step=4)
    damaged = write_run(run, tiny_model(seed=2), step=6)
    damaged.write_bytes(damaged.read_bytes()[:500])
    model.save_pretrained(root / "hf")
    return dict(model=model, run=run, checkpoint=good, hf=root / "hf", damaged=damaged)


def sample_main(argv, capsys):
    rc = sample.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_three_kinds_of_source_load_the_same_model(sources):
    idx = torch.randint(0, 256, (2, 30))
    expected = sources["model"](idx)[0]
    for kind in ("run", "checkpoint", "hf"):
        model, tok, what = load_model(sources[kind], device="cpu", backend="torch")
        assert tok == "bytes" and not model.training
        with torch.no_grad():
            assert rel_err(model(idx)[0], expected) <= 1e-6, kind
    _, _, what = load_model(sources["run"], device="cpu", backend="torch")
    assert "ckpt_000004.pt (step 4)" in what and "skipped ckpt_000006.pt" in what


def test_from_pretrained_reads_engine_checkpoints(sources):
    """GPT.from_pretrained takes this engine's run folders and checkpoint files,
    with GPTConfig overrides (a padded vocabulary here)."""
    idx = torch.randint(0, 256, (1, 20))
    expected = sources["model"](idx)[0]
    for kind in ("run", "checkpoint"):
        model = GPT.from_pretrained(sources[kind], backend="torch", vocab_multiple=64).eval()
        assert model.config.padded_vocab_size == 256 and model.config.vocab_multiple == 64
        with torch.no_grad():
            assert rel_err(model(idx)[0], expected) <= 1e-6
    model = GPT.from_pretrained(sources["run"], backend="torch", vocab_multiple=96)
    assert model.lm_head.weight.shape[0] == 288
    with pytest.raises(UserInputError, match=r"ckpt_000006.pt: not a training checkpoint of this engine "
                                             r"\(no checksum trailer: truncated"):
        GPT.from_pretrained(sources["damaged"])
    assert source_tokenizer_name(sources["run"]) == "bytes" and source_tokenizer_name(sources["hf"]) == "bytes"


class Recorder:
    def __init__(self):
        self.writes = []

    def write(self, s):
        self.writes.append(s)

    def flush(self):
        pass

    @property
    def text(self):
        return "".join(self.writes)


def run_sample(argv):
    out, err = Recorder(), Recorder()
    sample.run(sample.build_parser().parse_args(argv), out=out, err=err)
    return out, err


def test_streams_generate_tokens_one_at_a_time(sources):
    model = sources["model"]
    prompt = "Hello"
    out, err = run_sample([str(sources["checkpoint"]), "--prompt", prompt, "--num-samples", "2",
                           "--max-new-tokens", "15", "--seed", "5", "--device", "cpu", "--temperature", "1.0",
                           "--top-k", "50"])
    tok = get_tokenizer("bytes")
    idx = torch.tensor([tok.encode(prompt)])
    rows = [generate(model, idx, 15, temperature=1.0, top_k=50, seed=5 + i)[0, len(prompt):].tolist()
            for i in range(2)]
    expected = sample.SEPARATOR.join(prompt + tok.decode(r) for r in rows) + "\n"
    assert out.text == expected
    # one write per generated token (plus the prompts, separator, decoder flushes and final newline)
    assert 30 <= len(out.writes) <= 30 + 6
    lines = err.text.strip().splitlines()
    assert lines[0].startswith("model: checkpoint ") and "bytes" in lines[1]
    assert SPEED_LINE.match(lines[-1]) and lines[-1].startswith("30 tokens") and "mean of 2" in lines[-1]


def test_batch_mode_is_one_batched_generate(sources):
    model = sources["model"]
    out, err = run_sample([str(sources["hf"]), "--prompt", "ab", "--num-samples", "3", "--max-new-tokens", "10",
                           "--seed", "9", "--batch", "--device", "cpu"])
    tok = get_tokenizer("bytes")
    rows = generate(model, torch.tensor([tok.encode("ab")] * 3), 10, temperature=0.8, top_k=200, seed=9)
    assert out.text == sample.SEPARATOR.join("ab" + tok.decode(r[2:].tolist()) for r in rows) + "\n"
    assert SPEED_LINE.match(err.text.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["bytes", "gpt2"])
def test_printer_keeps_characters_whole_and_stops_at_eot(name):
    """A character split across tokens prints whole, never as U+FFFD pieces."""
    try:
        tok = get_tokenizer(name)
    except TokenizerUnavailableError as e:
        pytest.skip(f"GPT-2 BPE files unavailable here (set TIKTOKEN_CACHE_DIR): {e}")
    text = "naïve café 日本語 🎉"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some tokens hold part of a character
    out = Recorder()
    printer = sample.RowPrinter(tok, out)
    for i in ids + ([tok.eot_token] if tok.eot_token is not None else []) + ids:
        printer.push(i)
    printer.close()
    assert out.text == (text if tok.eot_token is not None else text + text)
    assert all("\ufffd" not in w for w in out.writes)
    assert printer.count == len(ids) + (1 if tok.eot_token is not None else len(ids))


def test_gpt2_model_samples_with_gpt2_tokens(tmp_path):
    try:
        tok = get_tokenizer("gpt2")
    except TokenizerUnavailableError as e:
        pytest.skip(f"GPT-2 BPE files unavailable here (set TIKTOKEN_CACHE_DIR): {e}")
    model = tiny_model(vocab=50257)
    model.save_pretrained(tmp_path)
    prompt = "naïve café 日本"
    out, err = run_sample([str(tmp_path), "--prompt", prompt, "--num-samples", "1", "--max-new-tokens", "20",
                           "--temperature", "0", "--device", "cpu"])
    ids = generate(model, torch.tensor([tok.encode(prompt)]), 20, temperature=0, eos_token=50256)[0]
    new = ids[len(tok.encode(prompt)):].tolist()
    if 50256 in new:
        new = new[:new.index(50256)]
    assert out.text == prompt + tok.decode(new) + "\n"
    assert "tokenizer: gpt2" in err.text and source_tokenizer_name(tmp_path) == "gpt2"


def test_bad_input_is_one_line(sources, tmp_path, capsys):
    run, ckpt = str(sources["run"]), str(sources["checkpoint"])
    empty = tmp_path / "empty"
    empty.mkdir()
    unstarted = tmp_path / "unstarted"
    unstarted.mkdir()
    (unstarted / "config.json").write_text('{"train": {}, "model": {}}')
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    not_utf8 = tmp_path / "latin1.txt"
    not_utf8.write_bytes("café".encode("latin-1"))
    all_damaged = tmp_path / "all_damaged"
    all_damaged.mkdir()
    (all_damaged / "ckpt_000001.pt").write_bytes(b"garbage")
    planted = tmp_path / "planted"  # a run's folder whose newest checkpoint is another run's
    planted.mkdir()
    (planted / "config.json").write_text('{"run_id": "00aa", "train": {}, "model": {}}')
    write_run(planted, tiny_model(seed=3), step=8)
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    (renamed / "ckpt_000009.pt").write_bytes(sources["checkpoint"].read_bytes())
    cases = [
        ([str(planted)], f"{planted / 'ckpt_000008.pt'}: a checkpoint of another run (no run id; this folder's "
                         "config.json is run 00aa): refused"),
        ([str(renamed)], "ckpt_000009.pt: its name says step 9 but it holds step 4"),
        ([str(renamed / "ckpt_000009.pt")], "ckpt_000009.pt: its name says step 9 but it holds step 4"),
        ([str(tmp_path / "nope")], "nope: no such file or directory"),
        ([str(empty)], "neither a run folder"),
        ([str(unstarted)], "holds no checkpoint (ckpt_NNNNNN.pt) yet"),
        ([str(foreign)], "not a training checkpoint of this engine"),
        ([str(all_damaged)], "none of its 1 checkpoints loads"),
        ([str(sources["hf"] / "model.safetensors")], "give the folder"),
        ([run, "--prompt", "x" * 65], "the prompt is 65 bytes tokens; the model's block size is 64"),
        ([run, "--prompt", "ab\udcffcd"], "--prompt: character '\\udcff' at position 2 is not valid Unicode"),
        ([run, "--prompt-file", str(tmp_path / "missing.txt")], "missing.txt: no such file"),
        ([run, "--prompt-file", str(not_utf8)], "byte 3 is not UTF-8 text (0xe9)"),
        ([ckpt, "--num-samples", "0"], "--num-samples 0: must be at least 1"),
        ([ckpt, "--top-p", "0"], "--top-p 0.0: must be in (0, 1]"),
        ([ckpt, "--temperature", "-1"], "--temperature -1.0"),
        ([ckpt, "--max-new-tokens", "-3"], "--max-new-tokens -3"),
        ([ckpt, "--seed", "-1"], "--seed -1"),
        ([ckpt, "--device", "cuda:7" if torch.cuda.is_available() else "cuda"], "--device cuda"),
        ([ckpt, "--device", "tpu"], "--device tpu"),
    ]
    for argv, needle in cases:
        rc, out, err = sample_main(argv, capsys)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (argv, err)


def test_triton_backend_refusal_is_one_line(tmp_path, capsys):
    """Kernels that refuse the model's shapes (head dim 8): named, with the fix;
    backend auto falls back to torch instead."""
    write_run(tmp_path, tiny_model(n_head=4), step=1)
    rc, out, err = sample_main([str(tmp_path), "--backend", "triton", "--device", "cpu"], capsys)
    assert rc == 2 and "--backend torch" in err
    assert "--backend triton: flash_attention_qkvpacked: qkv has head dim 8" in err
    model, _, what = load_model(tmp_path, device="cpu", backend="torch")
    assert model.backend == "torch"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run folder written by train.py itself."""
    root = tmp_path_factory.mktemp("trained")
    from pydoc_data.topics import topics
    (root / "corpus.txt").write_text("\n".join(topics[k] for k in sorted(topics))[:20000], encoding="utf-8")
    cmd = [sys.executable, str(REPO_ROOT / "train.py"), "--model", "tiny", "--n-layer", "1", "--n-embd", "32",
           "--n-head", "2", "--batch-size", "2", "--seq-len", "16", "--max-steps", "2", "--tokenizer", "bytes",
           "--data", str(root / "corpus.txt"), "--run-dir", str(root / "run"), "--device", "cpu",
           "--sample-interval", "0", "--eval-interval", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root / "run"


def test_sample_py_on_a_trained_run(trained_run):
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "sample.py"), str(trained_run), "--prompt", "The ",
                           "--num-samples", "2", "--max-new-tokens", "8", "--device", "cpu"],
                          capture_output=True, text=True, env=child_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("The ") and proc.stdout.count(sample.SEPARATOR) == 1
    lines = proc.stderr.strip().splitlines()
    assert "ckpt_000002.pt (step 2)" in lines[0] and SPEED_LINE.match(lines[-1]), proc.stderr
    assert lines[-1].startswith("16 tokens")

    proc = subprocess.run([sys.executable, str(REPO_ROOT / "sample.py"), str(trained_run / "nope")],
                          capture_output=True, text=True, env=child_env(), timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.gpu
def test_gpu_sampling_with_triton_bf16(sources):
    out, err = run_sample([str(sources["run"]), "--prompt", "Hi", "--num-samples", "2", "--max-new-tokens", "12",
                           "--device", "cuda", "--backend", "triton", "--dtype", "bf16"])
    lines = err.text.strip().splitlines()
    assert "backend: triton" in lines[1] and "dtype: bf16" in lines[1]
    assert SPEED_LINE.match(lines[-1]) and out.text.startswith("Hi") and out.text.count(sample.SEPARATOR) == 1


def test_backend_auto_falls_back_to_torch_where_the_kernels_refuse(tmp_path, monkeypatch):
    """Where auto means triton (CUDA) but the kernels refuse the model's head dim."""
    import engine.load as load_mod
    model = tiny_model(n_head=4)
    write_run(tmp_path, model, step=1)
    monkeypatch.setattr(load_mod, "resolve_backend_for", lambda name, device: "triton")
    loaded, _, what = load_model(tmp_path, device="cpu", backend="auto")
    assert loaded.backend == "torch" and "the triton kernels refuse this model" in what and "head dim 8" in what
    idx = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        assert rel_err(loaded(idx)[0], model(idx)[0]) <= 1e-6


def test_prompt_file_and_empty_prompt(sources, tmp_path):
    model, tok = sources["model"], get_tokenizer("bytes")
    (tmp_path / "p.txt").write_text("Ünïcode\n", encoding="utf-8")
    out, _ = run_sample([str(sources["checkpoint"]), "--prompt-file", str(tmp_path / "p.txt"), "--num-samples",
                         "1", "--max-new-tokens", "6", "--temperature", "0", "--device", "cpu"])
    ids = tok.encode("Ünïcode\n")
    new = generate(model, torch.tensor([ids]), 6, temperature=0)[0, len(ids):].tolist()
    assert out.text == "Ünïcode\n" + tok.decode(new) + "\n"
    # no prompt: a byte-level model (no end-of-text token) starts at a newline
    out, err = run_sample([str(sources["checkpoint"]), "--num-samples", "1", "--max-new-tokens", "6",
                           "--temperature", "0", "--device", "cpu"])
    new = generate(model, torch.tensor([[10]]), 6, temperature=0)[0, 1:].tolist()
    assert out.text == tok.decode(new) + "\n" and "prompt: 1 token" in err.text


def test_tiny_temperature_and_cpu_allocator_failure(sources, capsys, monkeypatch):
    """--temperature 1e-40 samples (greedily, its limit) instead of dying on a NaN
    distribution; the CPU allocator's failure (a RuntimeError, not
    torch.OutOfMemoryError) is the one out-of-memory line, as on a GPU."""
    ckpt = str(sources["checkpoint"])
    common = [ckpt, "--prompt", "To be", "--max-new-tokens", "8", "--num-samples", "1"]
    rc, greedy, err = sample_main([*common, "--temperature", "0"], capsys)
    assert rc == 0, err
    rc, tiny, err = sample_main([*common, "--temperature", "1e-40"], capsys)
    assert rc == 0 and tiny == greedy, err

    def cannot_allocate(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 629145600000 bytes. Error code 12")
    monkeypatch.setattr(sys.modules["engine.generate"], "generate", cannot_allocate)
    rc, out, err = sample_main([ckpt, "--batch", "--num-samples", "200000"], capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and lines[-1] == "error: out of memory; use fewer --num-samples, no --batch, or a smaller model"
    assert "Traceback" not in err

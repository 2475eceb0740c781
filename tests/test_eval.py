"""HellaSwag: the engine's scores against an independent computation with
transformers' GPT2LMHeadModel on the same tiny random weights (build-nanogpt's
way: context + " " + ending, loss over the ending's tokens); the accuracy
arithmetic, --limit, --json, sharding under torchrun, and bad files."""
import json
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from engine import GPT, GPTConfig
from engine.distributed import DistInfo
from engine.errors import UserInputError
from engine.eval import (HELLASWAG_VAL_FILE, evaluate_hellaswag, fetch_hellaswag, load_hellaswag, main,
                         score_items)
from engine.load import load_model
from engine.tokenizer import TokenizerUnavailableError, get_tokenizer
from tests.helpers import child_env

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

LOSS_RTOL = 1e-4  # fp32 on both sides; the engine pads rows to the batch's longest
WORDS = ("the a man woman dog cat runs jumps into water slowly quickly then holds ball car "
         "ladder paint brush over under café naïve").split()


def make_items(n: int, seed: int = 0) -> list[dict]:
    """Items in the official file's format: every key, `ind` not the line number."""
    g = torch.Generator().manual_seed(seed)

    def phrase(lo, hi):
        k = int(torch.randint(lo, hi + 1, (1,), generator=g))
        return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g))

    items = []
    for i in range(n):
        ctx_a, ctx_b = phrase(3, 14).capitalize() + ".", phrase(1, 2)
        items.append({"ind": 1000 + 7 * i, "activity_label": "Test activity", "ctx_a": ctx_a, "ctx_b": ctx_b,
                      "ctx": f"{ctx_a} {ctx_b}", "split": "val", "split_type": "indomain",
                      "label": int(torch.randint(0, 4, (1,), generator=g)),
                      "endings": [phrase(1, 9) + "." for _ in range(4)],
                      "source_id": f"test~{i}"})
    return items


def write_jsonl(path, items, extra_lines=()):
    with open(path, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return path


def reference_scores(hf_model, items, encode):
    """build-nanogpt's hellaswag.py, one item at a time, on transformers' model."""
    out = []
    for item in items:
        ctx = encode(item["ctx"])
        rows = [ctx + encode(" " + e) for e in item["endings"]]
        width = max(len(r) for r in rows)
        tokens = torch.zeros((4, width), dtype=torch.long)
        mask = torch.zeros((4, width), dtype=torch.long)
        for i, row in enumerate(rows):
            tokens[i, :len(row)] = torch.tensor(row)
            mask[i, len(ctx):len(row)] = 1
        with torch.no_grad():
            logits = hf_model(tokens).logits
        losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1),
                                 reduction="none").view(4, -1)
        shift_mask = mask[:, 1:]
        sums = (losses * shift_mask).sum(dim=1)
        avgs = sums / shift_mask.sum(dim=1)
        out.append(dict(sum=sums, avg=avgs, pred=int(sums.argmin()), pred_norm=int(avgs.argmin())))
    return out


def tiktoken_or_skip():
    try:
        return get_tokenizer("gpt2")
    except TokenizerUnavailableError as e:
        pytest.skip(f"GPT-2 BPE files unavailable here (set TIKTOKEN_CACHE_DIR): {e}")


def build_setup(name, tmp_path_factory):
    """(engine model folder saved with save_pretrained, transformers' model of it,
    the tokenizer, an independent encode function)."""
    if name == "gpt2":
        tok = tiktoken_or_skip()
        import tiktoken
        enc = tiktoken.get_encoding("gpt2")
        encode, vocab = enc.encode_ordinary, 50257
    else:
        tok = get_tokenizer("bytes")
        encode, vocab = (lambda s: list(s.encode("utf-8"))), 256
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=256, vocab_size=vocab, n_layer=2, n_head=2, n_embd=32, backend="torch"))
    with torch.no_grad():  # random LayerNorms and larger weights: losses that differ between endings
        for pname, p in model.named_parameters():
            if "ln" in pname:
                p.normal_(1.0 if pname.endswith("weight") else 0.0, 0.2)
            elif p.dim() == 2:
                p.mul_(5)
    path = tmp_path_factory.mktemp(f"hf_{name}")
    model.save_pretrained(path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(path).eval()
    return path, hf, tok, encode


@pytest.fixture(scope="module", params=["bytes", "gpt2"])
def setup(request, tmp_path_factory):
    return build_setup(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def bytes_setup(tmp_path_factory):
    """For the tests of plumbing, where one vocabulary is enough."""
    return build_setup("bytes", tmp_path_factory)


def test_scores_match_transformers(setup, tmp_path):
    path, hf, tok, encode = setup
    items = make_items(10)
    loaded = load_hellaswag(write_jsonl(tmp_path / "hs.jsonl", items))
    model, tokenizer_name, _ = load_model(path, device="cpu", backend="torch")
    assert tokenizer_name == tok.name
    ref = reference_scores(hf, items, encode)
    scores = score_items(model, loaded, tok, "cpu", batch_items=3)  # batches of 12 rows, padded
    assert [s.ind for s in scores] == [it["ind"] for it in items]
    for s, r in zip(scores, ref):
        torch.testing.assert_close(torch.tensor(s.sum_losses), r["sum"], rtol=LOSS_RTOL, atol=0)
        torch.testing.assert_close(torch.tensor(s.avg_losses), r["avg"], rtol=LOSS_RTOL, atol=0)
        assert (s.pred, s.pred_norm) == (r["pred"], r["pred_norm"])
        assert not s.truncated
    # the random model must not be indifferent: otherwise equal predictions prove nothing
    assert len({r["pred"] for r in ref}) > 1 and any(r["pred"] != r["pred_norm"] for r in ref)


def test_acc_arithmetic_limit_and_json(bytes_setup, tmp_path, capsys):
    path, hf, tok, encode = bytes_setup
    items = make_items(12, seed=1)
    ref = reference_scores(hf, items, encode)
    # Labels chosen so that acc = 5/12 exactly: the first five are the predicted endings.
    for i, (item, r) in enumerate(zip(items, ref)):
        item["label"] = r["pred"] if i < 5 else (r["pred"] + 1 + i % 3) % 4
    expected_acc = 5 / 12
    expected_norm = sum(it["label"] == r["pred_norm"] for it, r in zip(items, ref)) / 12
    data = write_jsonl(tmp_path / "hs.jsonl", items)

    out = tmp_path / "out.json"
    assert main(["hellaswag", "--model", str(path), "--data", str(data), "--json", str(out),
                 "--device", "cpu", "--backend", "torch", "--batch-items", "5"]) == 0
    doc = json.loads(out.read_text())
    assert set(doc) == {"acc", "acc_norm", "n", "predictions"}
    assert doc["n"] == 12 and doc["acc"] == expected_acc and doc["acc_norm"] == expected_norm
    assert doc["predictions"] == [dict(ind=it["ind"], label=it["label"], pred=r["pred"],
                                       pred_norm=r["pred_norm"]) for it, r in zip(items, ref)]
    stdout = capsys.readouterr().out
    assert f"acc {expected_acc:.4f}" in stdout and f"acc_norm {expected_norm:.4f}" in stdout

    assert main(["hellaswag", "--model", str(path), "--data", str(data), "--json", str(out),
                 "--device", "cpu", "--limit", "4"]) == 0
    doc = json.loads(out.read_text())
    assert doc["n"] == 4 and [p["ind"] for p in doc["predictions"]] == [it["ind"] for it in items[:4]]
    assert doc["acc"] == sum(it["label"] == r["pred"] for it, r in zip(items[:4], ref)) / 4


def test_shards_agree_with_one_process(bytes_setup, tmp_path, monkeypatch):
    """Each rank scores items i % world == rank; the gathered result is one process's."""
    path, hf, tok, _ = bytes_setup
    items = load_hellaswag(write_jsonl(tmp_path / "hs.jsonl", make_items(7, seed=2)))
    model, _, _ = load_model(path, device="cpu", backend="torch")
    whole = evaluate_hellaswag(model, items, tok, "cpu", batch_items=2, return_predictions=True)
    import engine.distributed as dist_lib
    parts = {}

    def gather(obj, info):  # ranks run one after another; the last sees every part
        parts[info.rank] = obj
        return [parts[r] for r in sorted(parts)]

    monkeypatch.setattr(dist_lib, "all_gather_objects", gather)
    forwards = []
    for rank in (0, 1, 2):
        count = []
        hook = model.register_forward_pre_hook(lambda *args: count.append(1))
        last = evaluate_hellaswag(model, items, tok, "cpu", dist_info=DistInfo(True, rank, rank, 3),
                                  batch_items=2, return_predictions=True)
        hook.remove()
        forwards.append(len(count))
    assert [len(parts[r]) for r in (0, 1, 2)] == [3, 2, 2]
    assert last == whole
    assert forwards == [2, 2, 2]  # the same forwards on every rank (an FSDP model all-gathers in each)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes(bytes_setup, tmp_path):
    path, hf, tok, encode = bytes_setup
    items = make_items(5, seed=3)
    ref = reference_scores(hf, items, encode)
    data = write_jsonl(tmp_path / "hs.jsonl", items)
    out = tmp_path / "out.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "--master_addr=127.0.0.1", "-m", "engine.eval", "hellaswag", "--model", str(path), "--data",
           str(data), "--json", str(out), "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env=child_env(OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.count("hellaswag: 5 items") == 1  # rank 0 alone reports
    assert "2 processes" in proc.stderr
    doc = json.loads(out.read_text())
    assert [(p["pred"], p["pred_norm"]) for p in doc["predictions"]] == [(r["pred"], r["pred_norm"]) for r in ref]


def test_triton_backend_agrees(bytes_setup, tmp_path):
    path, hf, tok, encode = bytes_setup
    items = make_items(2, seed=4)
    for item in items:  # short rows: the interpreter's cost grows with the sequence
        item["ctx"], item["endings"] = item["ctx"][:12], [e[:10] for e in item["endings"]]
    ref = reference_scores(hf, items, encode)
    loaded = load_hellaswag(write_jsonl(tmp_path / "hs.jsonl", items))
    model, _, _ = load_model(path, device="cpu", backend="triton")
    scores = score_items(model, loaded, tok, "cpu", batch_items=2)
    for s, r in zip(scores, ref):
        torch.testing.assert_close(torch.tensor(s.sum_losses), r["sum"], rtol=1e-3, atol=0)
        assert (s.pred, s.pred_norm) == (r["pred"], r["pred_norm"])


def test_context_cut_to_the_block_size(bytes_setup, tmp_path):
    """A row longer than the block keeps its ending and the end of its context."""
    path, hf, tok, encode = bytes_setup
    item = make_items(1, seed=5)[0]
    item["ctx"] = " ".join(["the dog runs into the water"] * 80)
    model, _, _ = load_model(path, device="cpu", backend="torch")
    [score] = score_items(model, load_hellaswag(write_jsonl(tmp_path / "hs.jsonl", [item])), tok, "cpu")
    assert score.truncated
    ends = [encode(" " + e) for e in item["endings"]]
    keep = model.config.block_size - max(len(e) for e in ends)
    ctx = encode(item["ctx"])[-keep:]
    tokens = [ctx + e for e in ends]
    with torch.no_grad():
        for k, row in enumerate(tokens):
            logits = hf(torch.tensor([row])).logits[0, :-1]
            losses = F.cross_entropy(logits, torch.tensor(row[1:]), reduction="none")[len(ctx) - 1:]
            assert abs(score.sum_losses[k] - float(losses.sum())) <= LOSS_RTOL * float(losses.sum())


BAD_LINES = [
    ("{not json", "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"ctx": "x", "endings": ["a", "b", "c"], "label": 0}', "'endings' must be a list of 4 strings"),
    ('{"ctx": "x", "endings": ["a", "b", "c", "d"], "label": 4}', "'label' must be an integer 0..3"),
    ('{"ctx": "x", "endings": ["a", "b", "c", "d"], "label": ""}', "the test split has no labels"),
    ('{"ctx": "", "endings": ["a", "b", "c", "d"], "label": 1}', "'ctx' must be a non-empty string"),
    ('{"ctx": "x", "endings": ["a", "b", "c", "d"], "label": 1, "ind": "7"}', "'ind' must be an integer"),
]


@pytest.mark.parametrize("line,needle", BAD_LINES)
def test_malformed_line_names_file_and_line(tmp_path, line, needle):
    data = write_jsonl(tmp_path / "hs.jsonl", make_items(2), extra_lines=["", line])
    with pytest.raises(UserInputError) as info:
        load_hellaswag(data)
    assert str(info.value).startswith(f"{data}:4: ") and needle in str(info.value)
    assert len(load_hellaswag(data, limit=2)) == 2  # the bad line is never read


def test_cli_bad_input_is_one_line(bytes_setup, tmp_path, capsys):
    path, *_ = bytes_setup
    bad = write_jsonl(tmp_path / "bad.jsonl", make_items(1), extra_lines=["{oops"])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    cases = [
        (["--data", str(tmp_path / "missing.jsonl")], "missing.jsonl: no such file"),
        (["--data", str(bad)], f"{bad}:2: not valid JSON"),
        (["--data", str(empty)], "holds no HellaSwag items"),
        (["--data", str(bad), "--limit", "0"], "--limit 0: must be at least 1"),
        (["--data", str(bad), "--json", str(tmp_path / "no" / "out.json")], "does not exist"),
        (["--data", str(bad), "--batch-items", "0"], "--batch-items 0"),
    ]
    for extra, needle in cases:
        assert main(["hellaswag", "--model", str(path), "--device", "cpu", *extra]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and needle in err[-1], (extra, err)
    good = write_jsonl(tmp_path / "good.jsonl", make_items(1))
    assert main(["hellaswag", "--model", str(tmp_path / "nope"), "--data", str(good)]) == 2
    assert "nope: no such file or directory" in capsys.readouterr().err


def test_fetch_once_and_offline_message(tmp_path):
    calls = []

    def offline(url, timeout):
        calls.append(url)
        import urllib.error
        raise urllib.error.URLError("no network")

    with pytest.raises(UserInputError) as info:
        fetch_hellaswag(tmp_path / "cache", fetch=offline)
    msg = str(info.value)
    assert str(tmp_path / "cache" / HELLASWAG_VAL_FILE) in msg and "--data" in msg and "\n" not in msg
    with pytest.raises(UserInputError, match="did not return HellaSwag items"):
        fetch_hellaswag(tmp_path / "cache", fetch=lambda url, timeout: b"<html>rate limited</html>")
    assert not (tmp_path / "cache" / HELLASWAG_VAL_FILE).exists()

    body = "".join(json.dumps(it) + "\n" for it in make_items(3)).encode()
    got = fetch_hellaswag(tmp_path / "cache", fetch=lambda url, timeout: calls.append(url) or body)
    assert got.read_bytes() == body and len(calls) == 2
    assert fetch_hellaswag(tmp_path / "cache", fetch=offline) == got and len(calls) == 2  # cached
    assert [it.ind for it in load_hellaswag(got)] == [1000, 1007, 1014]


def test_cli_downloads_into_the_cache_folder(bytes_setup, tmp_path, monkeypatch, capsys):
    path, *_ = bytes_setup
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    import engine.eval as eval_mod
    body = "".join(json.dumps(it) + "\n" for it in make_items(2)).encode()
    monkeypatch.setattr(eval_mod, "_urlopen", lambda url, timeout: body)
    assert main(["hellaswag", "--model", str(path), "--device", "cpu"]) == 0
    assert (tmp_path / "xdg" / "gpt2-engine" / HELLASWAG_VAL_FILE).read_bytes() == body
    assert "hellaswag: 2 items" in capsys.readouterr().out


@pytest.mark.gpu
def test_gpu_triton_bf16_close_to_fp32(bytes_setup, tmp_path):
    """The GPU path: triton kernels under bf16 autocast score as fp32 PyTorch does,
    within bf16's precision."""
    from engine.load import autocast_context
    path, hf, tok, encode = bytes_setup
    items = load_hellaswag(write_jsonl(tmp_path / "hs.jsonl", make_items(8, seed=6)))
    reference, _, _ = load_model(path, device="cuda", backend="torch")
    expected = score_items(reference, items, tok, "cuda", batch_items=3)
    model, _, _ = load_model(path, device="cuda", backend="triton")
    assert model.backend == "triton"
    got = score_items(model, items, tok, "cuda", autocast_context("bf16", torch.device("cuda")), batch_items=3)
    for g, e in zip(got, expected):
        torch.testing.assert_close(torch.tensor(g.sum_losses), torch.tensor(e.sum_losses), rtol=3e-2, atol=0)


def test_render_never_fails_on_a_tiny_block():
    """An ending that fills the block alone keeps one context token and its start."""
    from engine.eval import HellaSwagItem, render_item
    tok = get_tokenizer("bytes")
    item = HellaSwagItem(ind=0, ctx="context", endings=("a", "bb", "c" * 30, "d"), label=0)
    rows, ctx_len, truncated = render_item(item, tok, block_size=8)
    assert truncated and ctx_len == 1 and all(len(r) <= 8 for r in rows)
    assert rows[0] == list(b"t a") and rows[2] == list(b"t " + b"c" * 6)
    rows, ctx_len, truncated = render_item(item, tok, block_size=64)
    assert not truncated and rows[1] == list(b"context bb")


def test_tokenizer_larger_than_the_vocabulary_is_refused(bytes_setup, tmp_path):
    path, hf, tok, encode = bytes_setup
    model, _, _ = load_model(path, device="cpu", backend="torch")

    class Wide:
        name, vocab_size = "gpt2", 50257

    items = load_hellaswag(write_jsonl(tmp_path / "hs.jsonl", make_items(1)))
    with pytest.raises(UserInputError, match="the gpt2 tokenizer has 50,257 ids, the model's vocabulary 256"):
        evaluate_hellaswag(model, items, Wide(), "cpu")


def test_json_destination_is_checked_before_scoring_and_the_result_printed_first(bytes_setup, tmp_path, capsys,
                                                                                  monkeypatch):
    """--json never replaces what is not its own (a read-only file, the --data
    file, any other file); and a write that fails after scoring costs the file,
    not the result: the result line is printed first, then one error line (exit 4)."""
    path, *_ = bytes_setup
    data = write_jsonl(tmp_path / "hs.jsonl", make_items(3))
    data_bytes = data.read_bytes()
    args = ["hellaswag", "--model", str(path), "--data", str(data), "--device", "cpu"]
    out = tmp_path / "out.json"
    assert main([*args, "--json", str(out)]) == 0  # a predictions file of this command
    capsys.readouterr()
    assert main([*args, "--json", str(out)]) == 0  # replaces it
    capsys.readouterr()
    out.chmod(0o444)
    other = tmp_path / "notes.txt"
    other.write_text("mine")
    for dest, needle in [(out, "is read-only; not replaced"),
                         (data, "is the --data file; writing the predictions would replace the dataset"),
                         (other, "exists and is not a predictions file of this command; not replaced "
                                 "(give a new file name)")]:
        before = dest.read_bytes()
        assert main([*args, "--json", str(dest)]) == 2, dest
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert lines[-1] == f"error: --json {dest}: {needle}" and not captured.out, captured
        assert dest.read_bytes() == before
    assert data.read_bytes() == data_bytes

    def failing_write(dest, write, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr("engine.eval.atomic_write", failing_write)
    fresh = tmp_path / "fresh.json"
    assert main([*args, "--json", str(fresh)]) == 4
    captured = capsys.readouterr()
    assert captured.out.startswith("hellaswag: 3 items | acc ")
    lines = captured.err.strip().splitlines()
    assert lines[-1] == (f"error: --json {fresh}: could not write the predictions (Permission denied); "
                         "the result above stands") and "Traceback" not in captured.err

"""No traceback reaches a user for any input: a table of bad inputs, each run as
its own train.py process (exit status 2, one `error:` line naming the culprit,
and nothing changed on disk: no input file, and no run folder left behind).

To keep this cheap, one driver process imports train.py's modules once and forks
a child per case; each child runs train.py as `python train.py ...` would
(`runpy` with __name__ == "__main__", an uncaught exception printed as a
traceback by the same code path the interpreter uses), with its own stdout,
stderr, environment and exit status."""
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.helpers import REPO_ROOT, child_env

DRIVER = textwrap.dedent("""
    import json, os, runpy, sys, traceback
    import engine.trainer, engine.cli  # imported once, before the forks
    cases = json.load(open(sys.argv[1]))
    results = []
    for case in cases:
        out_path, err_path = case["out"], case["err"]
        pid = os.fork()
        if pid == 0:
            with open(out_path, "w") as o, open(err_path, "w") as e:
                os.dup2(o.fileno(), 1)
                os.dup2(e.fileno(), 2)
            os.environ.update(case["env"])
            sys.argv = ["train.py", *case["argv"]]
            code = 1
            try:
                runpy.run_path(case["train_py"], run_name="__main__")
                code = 0
            except SystemExit as ex:
                code = ex.code if isinstance(ex.code, int) else (0 if ex.code is None else 1)
            except BaseException:
                traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        results.append(os.waitstatus_to_exitcode(status))
    json.dump(results, sys.stdout)
""")


@pytest.fixture(scope="module")
def files(tmp_path_factory, corpus):
    d = tmp_path_factory.mktemp("bad_inputs")
    (d / "a_file").write_text("not a folder")
    (d / "empty_dir").mkdir()
    (d / "binary.txt").write_bytes(b"\xff\xfe\x00\x01" * 100)
    (d / "bad.toml").write_text("max_lr = true\n")
    (d / "foreign.pt").write_bytes(b"")
    buf = io.BytesIO()
    torch.save({"model": {"w": torch.zeros(2)}}, buf)
    (d / "ckpt_000001.pt").write_bytes(buf.getvalue())  # a plain torch file where a checkpoint should be
    shards = d / "shards"
    shards.mkdir()
    from engine.data import write_shard
    from engine.data.shards import write_manifest
    paths = [write_shard(shards / f"t_{s}_000000.bin", list(range(200)), 256) for s in ("train", "val")]
    write_manifest(shards, paths, "bytes", 256)
    paths[0].unlink()  # as an interrupted prepare leaves it
    # a real run whose checkpoint a later case tries to resume with a changed value
    run = d / "run"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), *base_args(corpus, run),
                           "--max-steps", "1", "--checkpoint-interval", "1"],
                          env=child_env(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (d / "damaged").mkdir()
    damaged = d / "damaged" / "ckpt_000001.pt"
    data = bytearray((run / "ckpt_000001.pt").read_bytes())
    data[len(data) // 2] ^= 1
    damaged.write_bytes(bytes(data))
    _planted_runs(d, run, corpus)
    # shards of the GPT-2 tokenizer, which a --tokenizer bytes run must refuse
    gpt2_shards = d / "gpt2_shards"
    gpt2_shards.mkdir()
    paths = [write_shard(gpt2_shards / f"g_{s}_000000.bin", list(range(300)), 50257) for s in ("train", "val")]
    write_manifest(gpt2_shards, paths, "gpt2", 50257)
    # a Hugging Face folder whose pytorch_model.bin carries a pickled object
    pickled = d / "hf_pickle"
    pickled.mkdir()
    from engine.config import GPTConfig
    from engine.hf import hf_config_dict
    hf_config = hf_config_dict(GPTConfig(block_size=32, vocab_size=256, n_layer=1, n_head=2, n_embd=32))
    (pickled / "config.json").write_text(json.dumps(hf_config))
    torch.save({"payload": pathlib.PurePosixPath("x")}, pickled / "pytorch_model.bin")
    return d


def _planted_runs(d, run, corpus):
    """Folders that hold the real run's files plus what an attacker or an accident
    put there: another run's checkpoint (valid checksum) as the newest file, a
    checkpoint renamed to another step, and a run whose data has moved away."""
    from engine import checkpoint as ckpt_lib
    state = ckpt_lib.load_checkpoint(run / "ckpt_000001.pt")
    for name in ("planted", "renamed", "moved"):
        (d / name).mkdir()
        for f in ("config.json", "metrics.csv"):
            shutil.copy2(run / f, d / name / f)
    shutil.copy2(run / "ckpt_000001.pt", d / "planted" / "ckpt_000001.pt")
    ckpt_lib.save_checkpoint(d / "planted", 2, {**state, "step": 2, "run_id": "0123456789abcdef"})
    shutil.copy2(run / "ckpt_000001.pt", d / "renamed" / "ckpt_000005.pt")
    gone = {**state["train_config"], "data": str(d / "gone.txt"), "max_steps": 5}
    ckpt_lib.save_checkpoint(d / "moved", 1, {**state, "train_config": gone})


def base_args(corpus, run_dir):
    return ["--data", str(corpus), "--tokenizer", "bytes", "--device", "cpu", "--n-layer", "1", "--n-embd", "32",
            "--batch-size", "2", "--seq-len", "16", "--max-steps", "2", "--eval-interval", "0",
            "--sample-interval", "0", "--checkpoint-interval", "0", "--run-dir", str(run_dir)]


# (case id, argv built from (files, corpus, base args), extra environment, what the line must name)
CASES = [
    ("run-dir is a file", lambda f, c, b: b + ["--run-dir", str(f / "a_file")], {},
     ["run_dir (--run-dir)", "a_file: is a file"]),
    ("run-dir cannot be created", lambda f, c, b: b + ["--run-dir", str(f / "a_file" / "sub")], {},
     ["run_dir (--run-dir)", "cannot use this folder"]),
    ("negative seed", lambda f, c, b: b + ["--seed", "-1"], {}, ["seed (--seed) must be >= 0"]),
    ("seed too large", lambda f, c, b: b + ["--seed", str(2 ** 63)], {}, ["seed (--seed) must be < 2**63"]),
    ("negative lr", lambda f, c, b: b + ["--max-lr", "-1e-3"], {}, ["max_lr (--max-lr) must be >= 0"]),
    ("nan lr", lambda f, c, b: b + ["--max-lr", "nan"], {}, ["max_lr (--max-lr) must be a finite number"]),
    ("zero batch", lambda f, c, b: b + ["--batch-size", "0"], {}, ["batch_size (--batch-size) must be >= 1"]),
    ("max-bad-steps 0", lambda f, c, b: b + ["--max-bad-steps", "0"], {}, ["max_bad_steps (--max-bad-steps)"]),
    ("ddp timeout 0", lambda f, c, b: b + ["--ddp-timeout-s", "0"], {}, ["ddp_timeout_s (--ddp-timeout-s) must be > 0"]),
    ("unknown tokenizer", lambda f, c, b: b + ["--tokenizer", "gpt3"], {}, ["tokenizer (--tokenizer) must be one of"]),
    ("bad toml value", lambda f, c, b: b + ["--config", str(f / "bad.toml")], {}, ["bad.toml", "key max_lr"]),
    ("toml is a folder", lambda f, c, b: b + ["--config", str(f / "empty_dir")], {}, ["--config", "is a folder"]),
    ("data missing", lambda f, c, b: b + ["--data", str(f / "nope.txt")], {}, ["nope.txt: no such file"]),
    ("data not utf-8", lambda f, c, b: b + ["--data", str(f / "binary.txt")], {}, ["binary.txt: not valid UTF-8"]),
    ("data folder without text", lambda f, c, b: b + ["--data", str(f / "empty_dir")], {}, ["empty_dir: no token shards"]),
    ("interrupted prepare", lambda f, c, b: b + ["--data", str(f / "shards")], {}, ["shards: incomplete"]),
    ("seq-len over block size", lambda f, c, b: b + ["--seq-len", "256"], {}, ["seq_len (--seq-len) 256 exceeds"]),
    ("heads do not divide", lambda f, c, b: b + ["--n-head", "3"], {}, ["model:"]),
    ("warmup over steps", lambda f, c, b: b + ["--warmup-steps", "9"], {}, ["warmup_steps (--warmup-steps) (9)"]),
    ("batch not divisible", lambda f, c, b: b + ["--total-batch-size", "100"], {}, ["total_batch_size"]),
    ("no cuda", lambda f, c, b: b + ["--device", "cuda"], {}, ["--device cuda: no CUDA GPU"]),
    ("init-from missing", lambda f, c, b: b + ["--init-from", str(f / "nope")], {}, ["nope"]),
    ("init-from a file", lambda f, c, b: b + ["--init-from", str(f / "a_file")], {}, ["a_file"]),
    ("resume missing", lambda f, c, b: ["--resume", str(f / "nope")], {}, ["resume:", "does not exist"]),
    ("resume empty folder", lambda f, c, b: ["--resume", str(f / "empty_dir")], {}, ["holds no checkpoint"]),
    ("resume empty file", lambda f, c, b: ["--resume", str(f / "foreign.pt")], {},
     ["foreign.pt: not a training checkpoint of this engine"]),
    ("resume foreign torch file", lambda f, c, b: ["--resume", str(f / "ckpt_000001.pt")], {},
     ["ckpt_000001.pt: not a training checkpoint of this engine"]),
    ("resume damaged", lambda f, c, b: ["--resume", str(f / "damaged")], {}, ["no valid checkpoint", "damaged"]),
    ("resume with a changed value", lambda f, c, b: ["--resume", str(f / "run"), "--max-steps", "3",
                                                    "--seed", "5"], {},
     ["resume: --seed 5 would change the run", "seed = 1337"]),
    ("resume and init-from", lambda f, c, b: b + ["--resume", str(f / "run"), "--init-from", "x"], {},
     ["--init-from and --resume exclude each other"]),
    ("bad torchrun environment", lambda f, c, b: b, {"RANK": "3", "WORLD_SIZE": "2"}, ["inconsistent"]),
    # --overwrite onto a finished run: every input is checked before anything is deleted
    *[(f"overwrite, then {what}", (lambda extra: lambda f, c, b: b + ["--run-dir", str(f / "run"), "--overwrite",
                                                                      *extra(f)])(extra), {}, needles)
      for what, extra, needles in [
          ("missing data", lambda f: ["--data", str(f / "nope.txt")], ["nope.txt: no such file"]),
          ("seq-len over block size", lambda f: ["--seq-len", "256"], ["seq_len (--seq-len) 256 exceeds"]),
          ("missing hellaswag", lambda f: ["--hellaswag", str(f / "nope.jsonl")], ["nope.jsonl: no such file"]),
          ("missing init-from", lambda f: ["--init-from", str(f / "nowhere")], ["nowhere"]),
          ("bytes on gpt2 shards", lambda f: ["--data", str(f / "gpt2_shards")], ["gpt2_shards"]),
          ("pickled init-from", lambda f: ["--init-from", str(f / "hf_pickle")],
           ["pytorch_model.bin: refused as unsafe"]),
      ]],
    ("resume another run's checkpoint", lambda f, c, b: ["--resume", str(f / "planted")], {},
     ["resume:", "planted/ckpt_000002.pt: a checkpoint of another run (run 0123456789abcdef"]),
    ("resume a renamed checkpoint", lambda f, c, b: ["--resume", str(f / "renamed")], {},
     ["resume:", "renamed/ckpt_000005.pt: its name says step 5 but it holds step 1"]),
    ("resume with the data gone", lambda f, c, b: ["--resume", str(f / "moved")], {},
     ["resume: the run's data", "gone.txt is no longer there", "give --data NEWPATH"]),
    ("resume with other data", lambda f, c, b: ["--resume", str(f / "moved"), "--data", str(f / "binary.txt")], {},
     ["resume: --data", "binary.txt: not the run's data (its content hash differs"]),
]


def _tree(folder) -> dict:
    """Every file under `folder`: its size and modification time."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            st = os.stat(os.path.join(root, name))
            out[os.path.relpath(os.path.join(root, name), folder)] = (st.st_size, st.st_mtime_ns)
    return out


def test_bad_inputs_get_one_line_and_exit_2(files, corpus, tmp_path):
    cases = []
    for i, (name, argv, extra_env, _) in enumerate(CASES):
        cases.append({"argv": argv(files, corpus, base_args(corpus, tmp_path / f"run{i}")), "env": extra_env,
                      "out": str(tmp_path / f"{i}.out"), "err": str(tmp_path / f"{i}.err"),
                      "train_py": str(REPO_ROOT / "train.py")})
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    before = _tree(files)
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path / "cases.json")], cwd=tmp_path,
                          env=child_env(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    statuses = json.loads(proc.stdout)
    failures = []
    for i, ((name, _, _, needles), status) in enumerate(zip(CASES, statuses)):
        err = (tmp_path / f"{i}.err").read_text()
        lines = [ln for ln in err.splitlines() if ln.strip()]
        ok = (status == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err
              and all(n in lines[0] for n in needles))
        if not ok:
            failures.append(f"{name}: exit {status}, stderr: {err[-800:]!r}")
    # Exit 2 means nothing changed: not a file of the inputs (the finished run an
    # --overwrite named, the folders with planted checkpoints), and no folder left behind.
    after = _tree(files)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if changed:
        failures.append(f"refused runs changed these files: {changed}")
    left = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    if left:
        failures.append(f"refused runs left these folders: {left}")
    assert not failures, "\n".join(failures)

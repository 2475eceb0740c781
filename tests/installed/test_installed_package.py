"""The installed package, as a user's environment holds it: `pip install .` (not
editable) beside transformers and Hugging Face's `kernels`, imported from a folder
outside the checkout.

`.ci/run` copies this file into an empty folder and runs it there with the
installed environment's pytest, so nothing of the checkout is importable: every
import below comes from site-packages. The plain `pytest` of a checkout does not
collect it (tests/conftest.py ignores tests/installed/).

It fails, with one line naming the package, where another installed distribution
provides one of our import names: the next collision (as `kernels` was) breaks
CI instead of a user's environment.
"""
import importlib.metadata
import os
import pathlib

import torch

if not torch.cuda.is_available():  # before any kernel module is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DISTRIBUTION = "gpt2-triton-engine"
IMPORT_NAMES = {"engine", "gpt2_kernels"}


def _top_level_names(dist) -> set[str]:
    """The top-level import names a distribution's files provide."""
    names = set()
    for file in dist.files or ():
        top = file.parts[0]
        if top.endswith((".dist-info", ".egg-info", ".pth")) or top in ("..", "__pycache__"):
            continue
        names.add(top.removesuffix(".py"))
    return names


def test_the_distribution_installs_only_our_import_names():
    dist = importlib.metadata.distribution(DISTRIBUTION)
    assert _top_level_names(dist) == IMPORT_NAMES, (
        f"{DISTRIBUTION} installs the import names {sorted(_top_level_names(dist))}; expected only "
        f"{sorted(IMPORT_NAMES)} (tests/ and bench/ stay in the checkout)")


@pytest.mark.parametrize("name", sorted(IMPORT_NAMES))
def test_no_other_distribution_provides_our_import_names(name):
    owners = importlib.metadata.packages_distributions().get(name, [])
    others = sorted(set(owners) - {DISTRIBUTION})
    assert not others, (f"import name {name!r} is also provided by {', '.join(others)}: "
                        f"one package would overwrite the other; rename ours")


@pytest.mark.parametrize("name", sorted(IMPORT_NAMES))
def test_imported_from_the_installed_distribution(name):
    module = __import__(name)
    site = pathlib.Path(importlib.metadata.distribution(DISTRIBUTION).locate_file("")).resolve()
    assert pathlib.Path(module.__file__).resolve().is_relative_to(site), (
        f"{name} was imported from {module.__file__}, not from the installed {site}")


def test_hugging_face_kernels_and_ours_are_both_importable():
    kernels = pytest.importorskip("kernels", reason="Hugging Face's kernels package is not installed")
    import gpt2_kernels
    assert not hasattr(kernels, "FusedAdamW") and hasattr(gpt2_kernels, "FusedAdamW")


def test_transformers_gpt2_and_the_triton_backend_in_one_process(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from engine import GPT

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_positions=32, n_embd=32, n_layer=2, n_head=2, vocab_size=101)).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = GPT.from_pretrained(tmp_path / "hf", backend="triton").eval()
    idx = torch.randint(0, 101, (2, 16))
    with torch.no_grad():
        expected = hf(idx).logits
        logits, _ = ours(idx)
    assert ours.backend == "triton"
    assert torch.allclose(logits[..., :101], expected, rtol=1e-4, atol=1e-4), \
        f"max |difference| {(logits[..., :101] - expected).abs().max().item():.2e}"

    ours.save_pretrained(tmp_path / "back")
    again = GPT2LMHeadModel.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert torch.allclose(again(idx).logits, expected, rtol=1e-5, atol=1e-5)


def test_fused_adamw_steps_like_torch_adamw():
    from gpt2_kernels import FusedAdamW

    torch.manual_seed(0)
    ours = torch.randn(64, 8, requires_grad=True)
    theirs = ours.detach().clone().requires_grad_()
    grad = torch.randn(64, 8)
    opt_ours = FusedAdamW([ours], lr=1e-2, weight_decay=0.1)
    opt_theirs = torch.optim.AdamW([theirs], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        opt_ours.step()
        opt_theirs.step()
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_trains_a_tiny_model_from_outside_the_checkout(tmp_path):
    import csv

    from engine.train_config import TrainConfig
    from engine.trainer import train

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 400)
    lines = []
    cfg = TrainConfig(data=str(corpus), tokenizer="bytes", model="tiny", n_layer=2, n_embd=64, n_head=4,
                      batch_size=4, seq_len=32, max_steps=6, warmup_steps=2, max_lr=1e-3, eval_interval=0,
                      sample_interval=0, checkpoint_interval=6, device="cpu", run_dir=str(tmp_path / "run"))
    trainer = train(cfg, log=lines.append)
    losses = [h["loss"] for h in trainer.history]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    with open(tmp_path / "run" / "metrics.csv") as f:
        assert len(list(csv.DictReader(f))) == 6
    assert (tmp_path / "run" / "ckpt_000006.pt").is_file()

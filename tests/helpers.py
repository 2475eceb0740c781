"""Shared test utilities: one place for devices, tolerances, poisoning and the
environment of child processes."""
import os
import pathlib

import torch

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"

# Relative error allowed against the PyTorch oracle, per dtype. bf16 is judged
# by comparison with PyTorch's own bf16 error (see `assert_bf16_comparable`),
# and only on a GPU: Triton's interpreter computes bf16 arithmetic wrongly.
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3}

# Dtypes a kernel test can run here: the interpreter handles fp32 and fp16.
TEST_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64; NaN anywhere gives inf."""
    a = actual.detach().double()
    e = expected.detach().double()
    if a.shape != e.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    if not torch.isfinite(a).all():
        return float("inf")
    scale = e.abs().max().item() if e.numel() else 0.0
    diff = (a - e).abs().max().item() if e.numel() else 0.0
    return diff / max(scale, 1e-30) if scale > 0 else diff


def assert_close(actual, expected, rtol, name="output"):
    err = rel_err(actual, expected)
    assert err <= rtol, f"{name}: relative error {err:.3e} > {rtol:.1e}"


def assert_bf16_comparable(ours, torch_bf16, reference_fp64, name="output", factor=2.0):
    """bf16 is judged by comparison: our error against a float64 reference must be
    at most `factor` times PyTorch's own bf16 error on the same inputs."""
    ours_err = rel_err(ours, reference_fp64)
    torch_err = rel_err(torch_bf16, reference_fp64)
    assert ours_err <= factor * max(torch_err, 1e-6), (
        f"{name}: bf16 error {ours_err:.3e} > {factor}x PyTorch's {torch_err:.3e}")


def check_outputs(names, ours, same_dtype, float64, sources, rtol, peer="PyTorch"):
    """Each of our outputs (None where the reference has None) in its source's
    dtype, within rtol of the float64 reference, and, where its source has the
    compute dtype (sources[0]'s), of PyTorch's result in that dtype."""
    compute = sources[0].dtype
    for name, o, s, r, src in zip(names, ours, same_dtype, float64, sources):
        if r is None:
            assert o is None, f"{name} should be None"
            continue
        assert o.dtype == src.dtype, f"{name} has dtype {o.dtype}, expected {src.dtype}"
        assert_close(o, r, rtol, name=f"{name} vs float64")
        if src.dtype == compute:
            assert_close(o, s, rtol, name=f"{name} vs {peer}")


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (or the max value for integers) so an unwritten element fails a test."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(torch.iinfo(t.dtype).max)


class poisoned_allocations:
    """Within this context, torch.empty / empty_like / empty_strided return tensors
    filled with NaN (floats) or the dtype's max (integers), so a kernel that leaves
    any element of its outputs or gradients unwritten fails its test.

    Kernel launchers allocate with these functions, so tests poison every output
    and gradient buffer without the kernels offering an `out=` argument.
    """

    _names = ("empty", "empty_like", "empty_strided")

    def __enter__(self):
        self._saved = {n: getattr(torch, n) for n in self._names}
        for name, original in self._saved.items():
            def poisoned(*args, _original=original, **kwargs):
                t = _original(*args, **kwargs)
                if t.numel():
                    poison_(t)
                return t
            setattr(torch, name, poisoned)
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch, name, original)
        return False


def has_module(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


# matplotlib is an optional extra: without it the trainer writes no loss.png.
HAS_MATPLOTLIB = has_module("matplotlib")
PLOT_FILES = ["loss.png"] if HAS_MATPLOTLIB else []


def child_env(*extra_paths, **extra) -> dict:
    """os.environ for a child Python process: the repo (and `extra_paths`) first on
    PYTHONPATH, plus `extra`. A child pytest must not think it is an xdist worker of
    this run (pytest-benchmark then refuses --benchmark-only), so PYTEST_XDIST_* go."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env["PYTHONPATH"] = os.pathsep.join([*map(str, extra_paths), str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def _inside_triton_interpreter() -> bool:
    # The interpreter copies every tensor argument back after a launch on its own
    # account; those copies do not exist on the GPU.
    import sys
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code.co_filename.endswith(os.path.join("triton", "runtime", "interpreter.py")):
            return True
        frame = frame.f_back
    return False


def _make_aten_recorder():
    from torch.utils._pytree import tree_leaves
    from torch.utils._python_dispatch import TorchDispatchMode

    class AtenRecorder(TorchDispatchMode):
        """Every aten op run outside a Triton launch, as (name, numel of the largest
        tensor it reads or writes): what a kernel leaves for PyTorch to do."""

        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not _inside_triton_interpreter():
                tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
                self.ops.append((func.overloadpacket.__name__, max((t.numel() for t in tensors), default=0)))
            return out

        @property
        def names(self) -> list[str]:
            return [name for name, _ in self.ops]

    return AtenRecorder


AtenRecorder = _make_aten_recorder()


def run_in_group(fn, world_size: int, folder, *args, timeout: float = 180.0) -> list:
    """fn(rank, world_size, *args) in `world_size` forked processes joined in one
    gloo process group (rendezvous through a FileStore in `folder`: no ports to
    collide with other jobs on the machine). Each process sees torchrun's
    RANK / LOCAL_RANK / WORLD_SIZE. Returns their results in rank order (plain
    picklable values); a process that fails or hangs fails the caller with its
    traceback."""
    import multiprocessing
    import pickle
    import queue as queue_lib
    import secrets

    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    store = os.path.join(str(folder), f"store-{secrets.token_hex(4)}")
    procs = [ctx.Process(target=_group_member, args=(fn, rank, world_size, store, results, args))
             for rank in range(world_size)]
    for p in procs:
        p.start()
    outcome, failures = {}, []
    try:
        import time
        deadline = time.monotonic() + timeout
        while len(outcome) + len(failures) < world_size:
            try:
                rank, ok, value = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue_lib.Empty:
                failures.append(f"ranks {sorted(set(range(world_size)) - set(outcome))} gave no result within "
                                f"{timeout:g} s")
                break
            if ok:
                outcome[rank] = pickle.loads(value)
            else:
                failures.append(f"rank {rank} failed:\n{value}")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    if failures:
        raise AssertionError("\n".join(sorted(failures)))
    return [outcome[r] for r in range(world_size)]


def _group_member(fn, rank, world_size, store, results, args):
    import datetime
    import pickle
    import traceback

    import torch.distributed as dist
    try:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
        torch.set_num_threads(1)
        dist.init_process_group("gloo", store=dist.FileStore(store, world_size), rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=60))
        # Pickled here by plain pickle: the queue's pickler would hand tensors over
        # as shared memory, which dies with this process.
        value = pickle.dumps(fn(rank, world_size, *args))
        results.put((rank, True, value))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        finally:
            results.close()
            results.join_thread()
            os._exit(0)  # never back into the parent's pytest

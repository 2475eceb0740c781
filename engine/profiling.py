"""Profile a few training steps with torch.profiler: a Chrome trace and the top ops.

`profile_training(run_step, out_dir, device_type)` runs `run_step(i)` for
wait + warmup + active steps under `torch.profiler.profile` with that schedule
(the first steps compile and autotune, so only the `active` ones are recorded),
writes `trace.json` (Chrome trace format: open it in https://ui.perfetto.dev or
chrome://tracing) and `top_ops.txt`, and prints the 15 ops with the most device
time (self CUDA time on a GPU, CPU time otherwise).

The trainer wraps its phases in `torch.profiler.record_function("forward")`,
("backward"), ("optimizer_step") and ("data_loading"); those ranges appear in
the trace as named spans.
"""
from __future__ import annotations

import pathlib

import torch
from torch.profiler import ProfilerActivity, profile, schedule

TOP_OPS = 15


def profile_training(run_step, out_dir, device_type: str, wait: int = 1, warmup: int = 1,
                     active: int = 3, log=print) -> pathlib.Path:
    """Run `run_step(i)` for i in range(wait + warmup + active) under the profiler and
    return the path of the Chrome trace written in `out_dir` (`trace.json`).

    device_type: "cuda" records CUDA kernels as well as CPU ops; anything else, CPU only.
    """
    if not callable(run_step):
        raise TypeError(f"profile_training: run_step must be callable, got {type(run_step).__name__}")
    for name, value, low in (("wait", wait, 0), ("warmup", warmup, 0), ("active", active, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"profile_training: {name} must be an integer >= {low}, got {value!r}")
    cuda = device_type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise ValueError("profile_training: device_type is 'cuda' but no CUDA device is available")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trace_path = out / "trace.json"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

    tables = []

    def on_trace_ready(prof):
        # Read the events here, inside the active cycle: some torch releases clear
        # them once the cycle ends (and warn when asked afterwards).
        prof.export_chrome_trace(str(trace_path))
        events = prof.key_averages()
        sort_by = "self_device_time_total" if cuda else "cpu_time_total"
        tables.append(events.table(sort_by=sort_by, row_limit=TOP_OPS))

    with profile(activities=activities, schedule=schedule(wait=wait, warmup=warmup, active=active),
                 on_trace_ready=on_trace_ready, record_shapes=True, with_stack=False) as prof:
        for i in range(wait + warmup + active):
            run_step(i)
            if cuda:
                torch.cuda.synchronize()  # the step's kernels belong to the step's window
            prof.step()

    table = tables[-1]
    (out / "top_ops.txt").write_text(table + "\n")
    log(f"profile: top {TOP_OPS} ops by {'self CUDA' if cuda else 'CPU'} time over {active} steps")
    log(table)
    log(f"profile: Chrome trace written to {trace_path} (open in https://ui.perfetto.dev)")
    return trace_path

"""What a run leaves to read: log.txt, the log line per step, metrics.csv and loss.png.

`RunLog.line` prints a line and appends it to the run folder's log.txt (flushed
line by line, so a crash loses nothing printed; a resumed run appends). Each
step's line says where the run is: `step i/N`, the wall time since this
invocation started and the time left at its mean pace so far.

`RunLog` keeps the history of the whole run (on resume, the rows of the earlier
steps are read back from metrics.csv, so the plot shows the run from step 0),
writes one CSV row per logged step, and draws the loss curve. A run resumed
into another folder copies the earlier rows from the checkpoint's folder. Rewrites
of the CSV (on resume, dropping rows of abandoned steps) and of the plot are
atomic, with temp files named by the run's token; a row cut short by a kill is
dropped when the CSV is read back. A failed write raises RunFileError. Only the
master rank writes; the others keep the history and stay silent.
"""
from __future__ import annotations

import csv
import io
import math
import pathlib
import time

from engine.fileio import atomic_write, os_reason
from engine.run_errors import RunFileError

CSV_FIELDS = ("step", "loss", "lr", "grad_norm", "dt_ms", "tokens_per_sec", "val_loss", "hellaswag_acc",
              "hellaswag_acc_norm", "skipped")


def clock(seconds: float) -> str:
    """h:mm:ss."""
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def format_step_line(row: dict, max_steps: int, elapsed_s: float, eta_s: float) -> str:
    line = (f"step {row['step']:5d}/{max_steps} | loss {row['loss']:.6f} | lr {row['lr']:.4e} | "
            f"norm {row['grad_norm']:.4f} | dt {row['dt_ms']:.2f}ms | tok/sec {row['tokens_per_sec']:.2f} | "
            f"elapsed {clock(elapsed_s)} | eta {clock(eta_s)}")
    if row.get("skipped"):
        line += " | skipped (non-finite: the weights did not change)"
    return line


def _number(text: str):
    if text in ("", None):
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def _write_failed(path, e: OSError) -> RunFileError:
    return RunFileError(f"{path}: could not write ({os_reason(e)}); the checkpoints are intact")


class RunLog:
    def __init__(self, run_dir, *, master: bool, max_steps: int, log=print, token: str = ""):
        self.run_dir = pathlib.Path(run_dir)
        self.master = master
        self.max_steps = max_steps
        self.log = log if master else (lambda *a, **k: None)
        self.token = token
        self.history: list[dict] = []
        self._started = time.perf_counter()
        self._first_step = 0

    @property
    def log_path(self) -> pathlib.Path:
        return self.run_dir / "log.txt"

    def line(self, text: str, echo: bool = True) -> None:
        """Print `text` (unless echo is False: already printed) and append it to log.txt."""
        if not self.master:
            return
        if echo:
            self.log(text)
        try:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(text + "\n")
        except OSError as e:
            raise _write_failed(self.log_path, e) from None

    def _atomic(self, path: pathlib.Path, data: bytes) -> None:
        try:
            atomic_write(path, lambda f: f.write(data), tmp_prefix=f".{path.name}.{self.token}.")
        except OSError as e:
            raise _write_failed(path, e) from None

    @property
    def csv_path(self) -> pathlib.Path:
        return self.run_dir / "metrics.csv"

    def start(self, first_step: int, earlier_csv=None) -> None:
        """Keep the rows of steps before `first_step` (a resumed run), read from
        `earlier_csv` (the checkpoint's folder's metrics.csv) or this folder's; drop the rest."""
        self._started, self._first_step = time.perf_counter(), first_step
        source = pathlib.Path(earlier_csv) if earlier_csv is not None else self.csv_path
        kept = []
        if first_step > 0 and source.is_file():
            with open(source, newline="") as f:
                for r in csv.DictReader(f):
                    row = {k: _number(r.get(k)) for k in CSV_FIELDS}
                    if (r.get("step") or "").isdigit() and int(r["step"]) < first_step and row["loss"] is not None:
                        kept.append(row)
        self.history = [dict(r, skipped=bool(r.get("skipped"))) for r in kept]
        if not self.master:
            return
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(self._csv_row(r) for r in kept)
        self._atomic(self.csv_path, buf.getvalue().encode())

    @staticmethod
    def _csv_row(row: dict) -> dict:
        out = {k: ("" if row.get(k) is None else row[k]) for k in CSV_FIELDS}
        out["skipped"] = 1 if row.get("skipped") else ""
        return out

    def record(self, row: dict) -> None:
        """One step: the history, the log line and the CSV row."""
        self.history.append(row)
        if not self.master:
            return
        elapsed = time.perf_counter() - self._started
        done = row["step"] + 1 - self._first_step
        eta = elapsed / done * (self.max_steps - row["step"] - 1) if done > 0 else 0.0
        self.line(format_step_line(row, self.max_steps, elapsed, eta))
        try:
            with open(self.csv_path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=CSV_FIELDS).writerow(self._csv_row(row))
        except OSError as e:
            raise _write_failed(self.csv_path, e) from None

    def plot(self) -> pathlib.Path | None:
        """loss.png: the train loss of every step, the val loss where evaluated, and
        HellaSwag's acc_norm (right axis) where scored."""
        finite = [h for h in self.history if h["loss"] is not None and math.isfinite(h["loss"])]
        if not self.master or not finite:
            return None
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 5))
        ax.plot([h["step"] for h in finite], [h["loss"] for h in finite], label="train")
        val = [(h["step"], h["val_loss"]) for h in self.history if h.get("val_loss") is not None]
        if val:
            ax.plot(*zip(*val), "o-", label="val")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        hella = [(h["step"], h["hellaswag_acc_norm"]) for h in self.history
                 if h.get("hellaswag_acc_norm") is not None]
        if hella:
            right = ax.twinx()
            right.plot(*zip(*hella), "s-", color="tab:green", label="HellaSwag acc_norm")
            right.set_ylabel("HellaSwag acc_norm")
            more_handles, more_labels = right.get_legend_handles_labels()
            handles, labels = handles + more_handles, labels + more_labels
        ax.legend(handles, labels)
        path = self.run_dir / "loss.png"
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        self._atomic(path, buf.getvalue())
        self.line(f"loss curve: {path}")
        return path

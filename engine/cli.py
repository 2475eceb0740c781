"""The command lines: train.py's flags and TOML files, generated from TrainConfig,
and the model flags sample.py and the evaluation share. Nothing here imports torch,
so every tool answers --help and refuses a bad flag at once.

Every field is a flag with the same name (`batch_size` -> `--batch-size`) and a
TOML key with the same name; flags override the file. A flag's text and a TOML
value go through the same converter, so `max_lr = true` or `seq_len = 32.9` are
refused as `--max-lr true` or `--seq-len 32.9` are. Every problem is one
UserInputError naming the flag (train.py prints it as one line, exit 2).
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import tomllib

from engine.config import BACKENDS, INFERENCE_DTYPES
from engine.errors import UserInputError
from engine.train_config import TrainConfig, resume_safe_fields

# argparse takes "-1e-3" for an option; a value that parses as a number is a value.
_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _kind(f: dataclasses.Field) -> str:
    """The field's value kind, from its annotation (a string under PEP 563)."""
    ann = str(f.type).replace(" ", "")
    return {"int|None": "int?", "float|None": "float?", "int": "int", "float": "float",
            "bool": "bool", "str": "str", "tuple": "pair"}[ann]


def _as_number(value, auto: bool, kind: type):
    """An int (kind=int, from an int or its text) or a float (kind=float, from any
    real number or its text); "auto" is None where allowed. Booleans are refused."""
    if auto and value == "auto":
        return None
    accepted = (int,) if kind is int else (int, float)
    if isinstance(value, accepted) and not isinstance(value, bool):
        return kind(value)
    if isinstance(value, str):
        try:
            return kind(value)
        except ValueError:
            pass
    what = "an integer" if kind is int else "a number"
    raise ValueError(f"expected {what}{' or auto' if auto else ''}, got {value!r}")


def _as_bool(value):
    if isinstance(value, bool):
        return value
    raise ValueError(f"expected true or false, got {value!r}")


def _as_str(value):
    if isinstance(value, str):
        return value
    raise ValueError(f"expected a string, got {value!r}")


def _as_pair(value):
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return tuple(_as_number(v, False, float) for v in value)
    raise ValueError(f"expected two numbers, got {value!r}")


def convert(name: str, value):
    """A flag's text or a TOML value for field `name`, as the field's type."""
    f = {f.name: f for f in dataclasses.fields(TrainConfig)}[name]
    kind = _kind(f)
    converters = {"int?": lambda v: _as_number(v, True, int), "float?": lambda v: _as_number(v, True, float),
                  "int": lambda v: _as_number(v, False, int), "float": lambda v: _as_number(v, False, float),
                  "bool": _as_bool, "str": _as_str, "pair": _as_pair}
    return converters[kind](value)  # allowed values are TrainConfig's to check, once


def add_model_flags(parser) -> None:
    """--device, --dtype and --backend, as sample.py and the evaluation take them."""
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu) | cpu | cuda | cuda:N | mps")
    parser.add_argument("--dtype", default="auto", choices=("auto", *INFERENCE_DTYPES),
                        help="autocast dtype over fp32 weights; auto: bf16 on CUDA, fp32 elsewhere")
    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="op backend; auto: triton on CUDA, torch elsewhere")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line, the flag named, no usage block: train.py prints it and exits 2.
        raise UserInputError(message)


def build_parser() -> argparse.ArgumentParser:
    """The command line, one flag per TrainConfig field. Values are kept as given
    (strings) and converted by `convert`, like TOML values; flags not given are absent
    from the namespace, so they can be layered over --config."""
    safe = ", ".join("--" + n.replace("_", "-") for n in resume_safe_fields() if n != "resume")
    parser = _Parser(
        prog="train.py",
        description="Train GPT-2 with the Triton-kernel engine (build-nanogpt's loop).",
        allow_abbrev=False, argument_default=argparse.SUPPRESS,
        epilog="'auto' values are resolved at startup from the device (CPU/MPS vs CUDA) as "
               "noted per option. TOML keys are the option names with underscores "
               "(batch_size = 8); 'auto' is accepted there too. "
               f"With --resume the run continues as its checkpoint was configured; only {safe} "
               "may be given to change it. Exit status: 0 done (or the resumed run was already "
               "finished), 2 bad input, 3 the loss diverged (max_bad_steps non-finite steps in a row), "
               "4 a run file could not be written (disk full), 5 a DDP process stalled or died, "
               "130/143 stopped by SIGINT/SIGTERM after writing a checkpoint.")
    parser.add_argument("--config", metavar="FILE.toml",
                        help="read options from a TOML file; flags given here override it")
    for f in dataclasses.fields(TrainConfig):
        kind = _kind(f)
        text = f.metadata["help"]
        default = f.default if f.default not in (None, "") else ("auto" if kind in ("int?", "float?") else '""')
        if kind == "pair":
            default = " ".join(map(str, f.default))
        text += f" (default: {default}"
        text += f"; auto: {f.metadata['auto']})" if f.metadata.get("auto") else ")"
        flag = "--" + f.name.replace("_", "-")
        if kind == "bool":
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, help=text)
        elif kind == "pair":
            parser.add_argument(flag, dest=f.name, nargs=2, metavar=("B1", "B2"), help=text)
        else:
            parser.add_argument(flag, dest=f.name, metavar=f.name.upper(), help=text)
    return parser


def _join_negative_numbers(argv: list[str]) -> list[str]:
    """['--max-lr', '-1e-3'] -> ['--max-lr=-1e-3'], so the value reaches the check
    that names the flag instead of argparse's 'expected one argument'."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and "=" not in arg and i + 1 < len(argv) and _NUMBER.match(argv[i + 1]):
            out.append(f"{arg}={argv[i + 1]}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


def load_toml(path) -> dict:
    """The options in a TOML file, converted like their flags; unknown keys are an error."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise UserInputError(f"--config {path}: no such file") from None
    except IsADirectoryError:
        raise UserInputError(f"--config {path}: is a folder, expected a TOML file") from None
    except OSError as e:
        raise UserInputError(f"--config {path}: cannot read ({e.strerror or e})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserInputError(f"--config {path}: not valid TOML ({e})") from None
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(k for k in data if k not in names)
    if unknown:
        dashed = [k for k in unknown if k.replace("-", "_") in names]
        hint = f" (keys use underscores, e.g. {dashed[0].replace('-', '_')})" if dashed else ""
        raise UserInputError(f"--config {path}: unknown key(s) {', '.join(unknown)}{hint}")
    values = {}
    for key, value in data.items():
        try:
            values[key] = convert(key, value)
        except ValueError as e:
            raise UserInputError(f"--config {path}: key {key}: {e}") from None
    return values


def parse(argv=None) -> tuple[dict, dict, str | None]:
    """(values from --config, values from flags, the --config path) as given, each
    value converted to its field's type; flags win when they are layered."""
    argv = sys.argv[1:] if argv is None else list(argv)
    given = vars(build_parser().parse_args(_join_negative_numbers(argv)))
    config_path = given.pop("config", None)
    from_file = load_toml(config_path) if config_path else {}
    from_flags = {}
    for name, value in given.items():
        try:
            from_flags[name] = convert(name, value)
        except ValueError as e:
            raise UserInputError(f"--{name.replace('_', '-')}: {e}") from None
    return from_file, from_flags, config_path


def parse_train_args(argv=None) -> tuple[TrainConfig, frozenset[str]]:
    """Parse the command line (and --config file): (the TrainConfig, the names of the
    fields the user gave, in the file or as flags). A resumed run takes every field
    not given from its checkpoint."""
    from_file, from_flags, config_path = parse(argv)
    try:
        cfg = TrainConfig(**{**from_file, **from_flags})
    except UserInputError as e:
        # A value only the file gave: say which file.
        field = str(e).split(" ", 1)[0]
        if field in from_file and field not in from_flags:
            raise UserInputError(f"--config {config_path}: {e}") from None
        raise
    return cfg, frozenset(from_file) | frozenset(from_flags)


def config_from_args(argv=None) -> TrainConfig:
    """Parse the command line (and --config file) into a TrainConfig."""
    return parse_train_args(argv)[0]

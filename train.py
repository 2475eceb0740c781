"""Train GPT-2: `python train.py [--flag value ...] [--config FILE.toml]`.

Every TrainConfig field (engine/trainer.py) is a flag with the same name
(`batch_size` -> `--batch-size`) and a key of the same name in the TOML file;
flags override the file. With no arguments it trains: the tiny preset with a
one-minute schedule on CPU, GPT-2 124M with build-nanogpt's schedule on CUDA.
Multi-GPU: `torchrun --nproc_per_node=8 train.py ...`.

Exit status: 0 done, 2 bad input (one `error: ...` line, no traceback),
3 the loss diverged.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from engine.errors import UserInputError
from engine.trainer import (DEVICES, DTYPES, TOKENIZERS, TrainConfig, TrainingDiverged)

CHOICES = {
    "device": DEVICES,
    "dtype": DTYPES,
    "backend": ("auto", "torch", "triton"),
    "optimizer": ("auto", "triton", "torch"),
    "cuda_graphs": ("auto", "on", "off"),
    "tokenizer": TOKENIZERS,
}


def _int_or_auto(text):
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    if text == "auto":
        return None
    try:
        return int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


def _float_or_auto(text):
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    if text == "auto":
        return None
    try:
        return float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def _float(text):
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    try:
        return float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _int(text):
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    try:
        return int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _str(text):
    if not isinstance(text, str):
        raise argparse.ArgumentTypeError(f"expected a string, got {text!r}")
    return text


def _kind(f: dataclasses.Field) -> str:
    """The field's value kind, from its annotation (a string under PEP 563)."""
    ann = str(f.type).replace(" ", "")
    return {"int|None": "int?", "float|None": "float?", "int": "int", "float": "float",
            "bool": "bool", "str": "str", "tuple": "pair"}[ann]


CONVERT = {"int?": _int_or_auto, "float?": _float_or_auto, "int": _int, "float": _float, "str": _str}


def fields():
    return [f for f in dataclasses.fields(TrainConfig)]


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """The command line, one flag per TrainConfig field. With suppress_defaults the
    parsed namespace holds only the flags actually given (to layer over --config)."""
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train GPT-2 with the Triton-kernel engine (build-nanogpt's loop).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
        epilog="'auto' values are resolved at startup from the device (CPU/MPS vs CUDA) as "
               "noted per option. TOML keys are the option names with underscores "
               "(batch_size = 8); 'auto' is accepted there too.")
    parser.add_argument("--config", metavar="FILE.toml", default=None if not suppress_defaults
                        else argparse.SUPPRESS,
                        help="read options from a TOML file; flags given here override it")
    for f in fields():
        kind = _kind(f)
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        auto = f.metadata.get("auto")
        if auto:
            help_text += f" [auto: {auto}]"
        kw = dict(dest=f.name, help=help_text)
        if kind == "bool":
            kw.update(action=argparse.BooleanOptionalAction, default=f.default)
        elif kind == "pair":
            kw.update(nargs=2, type=_float, default=list(f.default), metavar=("B1", "B2"))
        else:
            default = f.default
            if kind in ("int?", "float?") and default is None:
                default = "auto"
            kw.update(type=CONVERT[kind], default=default)
            if f.name in CHOICES:
                kw.update(choices=CHOICES[f.name])
            if kind == "str" and default == "":
                kw["default"] = ""
        if suppress_defaults:
            kw["default"] = argparse.SUPPRESS
        parser.add_argument(flag, **kw)
    return parser


def load_toml(path) -> dict:
    """The options in a TOML file, converted like their flags; unknown keys are an error."""
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        try:
            import tomli as tomllib
        except ImportError:
            raise UserInputError(f"{path}: reading TOML needs Python >= 3.11 or `pip install tomli`") from None
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise UserInputError(f"--config {path}: no such file") from None
    except OSError as e:
        raise UserInputError(f"--config {path}: cannot read ({e.strerror or e})") from None
    except tomllib.TOMLDecodeError as e:
        raise UserInputError(f"--config {path}: not valid TOML ({e})") from None
    by_name = {f.name: f for f in fields()}
    unknown = sorted(k for k in data if k not in by_name)
    if unknown:
        hint = ""
        dashed = [k for k in unknown if k.replace("-", "_") in by_name]
        if dashed:
            hint = " (keys use underscores, e.g. " + dashed[0].replace("-", "_") + ")"
        raise UserInputError(f"--config {path}: unknown key(s) {', '.join(unknown)}{hint}")
    values = {}
    for key, value in data.items():
        kind = _kind(by_name[key])
        try:
            if kind == "bool":
                if not isinstance(value, bool):
                    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
                values[key] = value
            elif kind == "pair":
                if not isinstance(value, list) or len(value) != 2:
                    raise argparse.ArgumentTypeError(f"expected two numbers, got {value!r}")
                values[key] = tuple(_float(v) for v in value)
            else:
                values[key] = CONVERT[kind](value)
                if key in CHOICES and values[key] not in CHOICES[key]:
                    raise argparse.ArgumentTypeError(
                        f"expected one of {', '.join(CHOICES[key])}, got {value!r}")
        except argparse.ArgumentTypeError as e:
            raise UserInputError(f"--config {path}: key {key}: {e}") from None
    return values


def config_from_args(argv=None) -> TrainConfig:
    """Parse the command line (and --config file) into a TrainConfig.
    argparse exits with status 2 on unknown or malformed flags."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    given = vars(build_parser(suppress_defaults=True).parse_args(argv))
    values = load_toml(args.config) if args.config else {}
    values.update({k: v for k, v in given.items() if k != "config"})
    if "betas" in values:
        values["betas"] = tuple(values["betas"])
    return TrainConfig(**values)


def main(argv=None) -> int:
    try:
        cfg = config_from_args(argv)
        from engine.trainer import train
        train(cfg)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (UserInputError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

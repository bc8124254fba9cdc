"""Command line: `python -m dynbatch_core train [flags]`; every flag is a RunConfig field.

    python -m dynbatch_core train --dataset mnist --data-dir DIR --model resnet20 --world-size 2 \
        --epochs 2 --train-samples 8192
    torchrun --standalone --nproc-per-node 2 -m dynbatch_core train --dataset mnist --epochs 1

Bad input exits with code 2 and one line on stderr, before any process is spawned.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from .config import RunConfig, flag

EXIT_BAD_INPUT = 2


class _OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def _comma_list(item_type):
    def parse(text: str):
        try:
            return tuple(item_type(part) for part in text.split(",") if part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 1,3, got {text!r}") from None
    return parse


def _scalar_type(annotation: str):
    for name, kind in (("int", int), ("float", float), ("str", str)):
        if annotation.startswith(name):
            return kind
    raise TypeError(f"no CLI type for annotation {annotation!r}")


def _names_epilog() -> str:
    from .batching.balancers import BALANCERS
    from .data import DATASET_NAMES
    from .models import MODEL_NAMES
    from .batching.schedules import SCHEDULES
    return (f"models: {', '.join(MODEL_NAMES)}\ndatasets: {', '.join(DATASET_NAMES)}\n"
            f"schedules: {', '.join(SCHEDULES)}\nbalancers: {', '.join(BALANCERS)}\n"
            "data: --data-dir DIR or $DYNBATCH_DATA (a folder with mnist.npz / cifar10.npz), else the embedded "
            "subset; --download fetches with torchvision")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per RunConfig field, its default shown in --help."""
    for field in dataclasses.fields(RunConfig):
        names = dict(dest=field.name, default=field.default, help=field.metadata["help"])
        if field.type == "bool":
            parser.add_argument(flag(field.name), action=argparse.BooleanOptionalAction, **names)
        elif "list_of" in field.metadata:
            parser.add_argument(flag(field.name), type=_comma_list(field.metadata["list_of"]), metavar="K0,K1,...",
                                **names)
        else:
            parser.add_argument(flag(field.name), type=_scalar_type(field.type), metavar=flag(field.name)[2:].upper()
                                .replace("-", "_"), **names)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrorParser(prog="python -m dynbatch_core",
                                 description="Dynamic batch sizing for data-parallel PyTorch training.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineErrorParser)
    train = commands.add_parser("train", help="train one run (spawns --world-size ranks, or joins torchrun's)",
                                formatter_class=_DefaultsFormatter, epilog=_names_epilog())
    add_config_flags(train)
    from .study.report import add_report_parser
    add_report_parser(commands)
    return parser


class _DefaultsFormatter(argparse.RawDescriptionHelpFormatter):
    """States every flag's default (unless its help already does), lists as 1,3."""

    def __init__(self, prog):
        super().__init__(prog, width=110, max_help_position=32)

    def _get_help_string(self, action):
        if action.default is argparse.SUPPRESS or action.option_strings == ["-h", "--help"]:
            return action.help
        if "default:" in action.help:
            return action.help
        default = action.default
        if isinstance(default, tuple):
            default = ",".join(str(v) for v in default) or "none"
        return f"{action.help} (default: {default})"


def _explicit_flags(argv: list[str] | None) -> dict:
    """The flags the user actually typed (a resumed run takes every other value from its own config.json)."""
    parser = _OneLineErrorParser(add_help=False)
    add_config_flags(parser)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    known, _ = parser.parse_known_args((argv if argv is not None else sys.argv[1:])[1:])
    return vars(known)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "report":
        from .study.report import main_report
        return main_report(args)
    from .config import stored_config
    from .engine.distributed import exit_without_teardown, launched_by_torchrun
    from .engine.launch import RunFailed, RunInterrupted, run, train_under_torchrun
    try:
        if args.resume is not None:
            config = dataclasses.replace(stored_config(args.resume), **_explicit_flags(argv))
        else:
            config = RunConfig(**{k: v for k, v in vars(args).items() if k != "command"})
        if launched_by_torchrun():
            train_under_torchrun(config)
            exit_without_teardown(0)  # see distributed.exit_without_teardown
        else:
            print(run(config).run_dir)
    except ValueError as error:
        print(f"python -m dynbatch_core train: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RunFailed as error:
        print(f"python -m dynbatch_core train: {error}", file=sys.stderr)
        return 1
    except RunInterrupted as stopped:
        print(f"python -m dynbatch_core train: {stopped}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("python -m dynbatch_core train: interrupted; every rank stopped", file=sys.stderr)
        return 130
    return 0

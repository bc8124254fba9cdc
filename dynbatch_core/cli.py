"""Command line: `python -m dynbatch_core train [flags]`; every flag is a RunConfig field.

    python -m dynbatch_core train --dataset mnist --data-dir DIR --model resnet20 --world-size 2 \
        --epochs 2 --train-samples 8192
    torchrun --standalone --nproc-per-node 2 -m dynbatch_core train --dataset mnist --epochs 1
    python -m dynbatch_core simulate --world-size 1024 --devices "A100 80GB SXM4:512,V100 16GB:512" \
        --balancer pid --batch-size 65536 --train-samples 1280000 --epochs 1 --out runs/sim

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
    commands.add_parser("simulate", add_help=False, help="simulate a run on a modelled cluster, no torch (see "
                        "simulate --help)")
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
    given = sys.argv[1:] if argv is None else argv
    if given[:1] == ["simulate"]:   # its own parser: the train parser's help lists models, which imports torch
        return main_simulate(given[1:])
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


def build_simulate_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrorParser(prog="python -m dynbatch_core simulate", formatter_class=_DefaultsFormatter,
                                 description="Simulate a run: the real schedule and balancer decide every step, "
                                 "a cost model of each rank replaces its compute (dynbatch_core/simulation/). "
                                 "Writes steps.csv, steps_summary.csv, epochs.csv and config.json.")
    ranks = parser.add_argument_group("the cluster (one of --devices, --calibrate, --emulated-sample-ms)")
    ranks.add_argument("--devices", default=None, metavar="NAME:COUNT,...",
                       help="ranks of profiled cards in order, e.g. 'A100 80GB SXM4:4,V100 16GB:4' (names: "
                            "simulation/profiles.py)")
    ranks.add_argument("--calibrate", default=None, metavar="RUN_DIR",
                       help="ranks fitted to a real run's steps.csv (world size: that run's)")
    ranks.add_argument("--reference-sample-ms", type=float, default=2.0,
                       help="with --devices: a V100's milliseconds per sample of your model")
    ranks.add_argument("--step-ms", type=float, default=10.0, help="with --devices: fixed ms per step (assumed)")
    ranks.add_argument("--cv", type=float, default=0.03, help="with --devices: step-time noise (log-normal CV)")
    ranks.add_argument("--spike-prob", type=float, default=0.0, help="with --devices: chance of a spike per step")
    ranks.add_argument("--spike-factor", type=float, default=3.0, help="with --devices: a spike's slowdown")
    network = parser.add_argument_group("the gradient reduction (ring all-reduce, alpha-beta)")
    network.add_argument("--gradient-mb", type=float, default=0.0, help="MB of gradients per step")
    network.add_argument("--bandwidth-gbps", type=float, default=100.0, help="link bandwidth, Gb/s")
    network.add_argument("--latency-us", type=float, default=5.0, help="per-message latency, microseconds")
    network.add_argument("--overlap", type=float, default=0.0, help="fraction hidden behind the backward pass")
    learning = parser.add_argument_group("progress (McCandlish: a step at B is 1 / (1 + B_crit / B) optimal steps)")
    learning.add_argument("--critical-batch", type=float, default=1024.0, help="B_crit, samples")
    learning.add_argument("--min-steps", type=float, default=2000.0, help="S_min, optimal steps to the target")
    parser.add_argument("--rank-rows", default=None, metavar="all|R0,R1,...",
                        help="ranks with rows in steps.csv (default: all up to 64 ranks, else a subsample)")
    add_config_flags(parser.add_argument_group("the run (the train command's flags; model and data ones are "
                                               "ignored)"))
    return parser


def main_simulate(argv: list[str]) -> int:
    from .simulation import calibration, profiles
    from .simulation.cluster import Cluster, Network
    from .simulation.learning import LearningCurve
    from .simulation.simulator import simulate
    args = build_simulate_parser().parse_args(argv)
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    try:
        given = [name for name in ("devices", "calibrate") if getattr(args, name)]
        if len(given) > 1:
            raise ValueError("give one of --devices and --calibrate")
        network = Network(gradient_bytes=args.gradient_mb * 1e6, bandwidth_Bps=args.bandwidth_gbps * 1e9 / 8,
                          latency_s=args.latency_us * 1e-6, overlap=args.overlap)
        values = {name: value for name, value in vars(args).items() if name in fields}
        cluster = None
        if args.devices:
            counts = {}
            for part in args.devices.split(","):
                name, _, count = part.rpartition(":")
                if not name or not count.strip().isdigit():
                    raise ValueError(f"--devices {args.devices!r}: expected NAME:COUNT,... like 'A10:2,RTX 3090:2'")
                counts[name.strip()] = counts.get(name.strip(), 0) + int(count)
            ranks = profiles.mix(counts, reference_sample_s=args.reference_sample_ms / 1000,
                                 step_s=args.step_ms / 1000, cv=args.cv, spike_prob=args.spike_prob,
                                 spike_factor=args.spike_factor)
            cluster = Cluster(ranks, network=network)
        elif args.calibrate:
            cluster = calibration.cluster_from_run(args.calibrate, network=network)
        elif args.emulated_sample_ms is None:
            raise ValueError("say what the ranks cost: --devices, --calibrate or --emulated-sample-ms")
        world_size_given = any(arg == "--world-size" or arg.startswith("--world-size=") for arg in argv)
        if cluster is not None and not world_size_given:
            values["world_size"] = cluster.world_size
        config = RunConfig(**values)
        rank_rows = None
        if args.rank_rows == "all":
            rank_rows = range(config.world_size)
        elif args.rank_rows is not None:
            rank_rows = _comma_list(int)(args.rank_rows)
        result = simulate(config, cluster, out=args.out, overwrite=args.overwrite, rank_rows=rank_rows,
                          curve=LearningCurve(critical_batch=args.critical_batch, min_steps=args.min_steps))
    except (ValueError, argparse.ArgumentTypeError) as error:
        print(f"python -m dynbatch_core simulate: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RuntimeError as error:   # a simulated out-of-memory
        print(f"python -m dynbatch_core simulate: {error}", file=sys.stderr)
        return 1
    print(result.run_dir)
    return 0


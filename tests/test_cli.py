"""The command line: every command has a --help a newcomer can read, and lists parse."""

import json
import subprocess
import sys

import pytest

from diffkit.cli import _commands, build_parser, main

COMMANDS = ["train", "organism build", "organism eval", "attribute", "grid", "report", "presets"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command.split(), "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--json" in text
    assert text.count("--") >= 2


def test_train_help_explains_the_main_flags(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--preset", "--base", "--finetuned", "--layers", "--k", "--expansion", "--tokens", "--out",
                 "--device", "--dtype", "--seed", "--resume"):
        assert flag in text
    assert "(default: toy)" in " ".join(text.split())  # argparse wraps lines


def test_lists_parse_from_commas():
    args = build_parser(_commands()).parse_args(["train", "--layers", "9,16", "--k", "32, 64"])
    assert args.layers == [9, 16] and args.k == [32, 64]


def test_bad_list_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--layers", "nine"])
    assert exit_info.value.code == 2
    assert "comma-separated list of int" in capsys.readouterr().err


def test_presets_json_lists_the_grid():
    out = subprocess.run([sys.executable, "-m", "diffkit", "presets", "--json"], capture_output=True, text=True, check=True)
    presets = json.loads(out.stdout)
    pairs = presets["cbd-4pair"]["pairs"]
    assert {(p["related"], p["charged"]) for p in pairs} == {(False, False), (False, True), (True, False), (True, True)}
    assert presets["cbd-4pair"]["layers"] == [13, 24]

"""The command line: every command has a --help a newcomer can read, and lists parse."""

import json
import subprocess
import sys

import pytest

from diffkit.cli import build_parser, main

COMMANDS = ["train", "organism build", "organism eval", "attribute", "grid", "report", "latent", "presets"]


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
    cfg = build_parser().parse_args(["train", "--layers", "9,16", "--k", "32, 64"]).config
    assert cfg.layers == [9, 16] and cfg.k == [32, 64]


def test_flags_keep_their_names_and_negations():
    cfg = build_parser().parse_args(["train", "--batch-size", "512", "--resume", "--no-json", "--max-len", "64"]).config
    assert (cfg.batch_size, cfg.resume, cfg.json, cfg.max_len) == (512, True, False, 64)
    cfg = build_parser().parse_args(["organism", "eval", "organisms/toy", "--n", "8", "--json"]).config
    assert (cfg.source, cfg.n, cfg.json) == ("organisms/toy", 8, True)


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("--seed int seed for prompts, shuffling and SAE init (default: 0)", "(default: 300000)",
                  "--layers A,B decoder layers whose output to diff, e.g. 9,16 (default: the preset's)"):
        assert shown in text


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["organism", "build", "--help"], ["report", "--help"]])
def test_help_imports_no_heavy_library(argv):
    """`--help` parses without torch, transformers or nnsight: only the light config modules load."""
    code = ("import sys\nfrom diffkit.cli import build_parser\ntry:\n    build_parser().parse_args(sys.argv[1:])\n"
            "except SystemExit:\n    pass\nprint(sorted(m for m in ('torch', 'transformers', 'nnsight') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_bad_list_is_a_one_line_usage_error(capsys):
    assert main(["train", "--layers", "nine"]) == 2
    err = capsys.readouterr().err.strip()
    assert "comma-separated list of int" in err and "--help" in err and "\n" not in err


def test_presets_json_lists_the_grid():
    out = subprocess.run([sys.executable, "-m", "diffkit", "presets", "--json"], capture_output=True, text=True, check=True)
    presets = json.loads(out.stdout)
    pairs = presets["cbd-4pair"]["pairs"]
    assert {(p["related"], p["charged"]) for p in pairs} == {(False, False), (False, True), (True, False), (True, True)}
    assert presets["cbd-4pair"]["layers"] == [13, 24]

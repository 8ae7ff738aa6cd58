import json
import subprocess
import sys

import pytest

import fusedset
from fusedset.cli import main


def test_backends_json_matches_the_api(capsys):
    assert main(["backends", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == fusedset.backends()


def test_python_dash_m_runs_the_cli():
    result = subprocess.run(
        [sys.executable, "-m", "fusedset", "backends"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "cpp_cpu" in result.stdout


def test_unknown_command_is_a_usage_error():
    result = subprocess.run(
        [sys.executable, "-m", "fusedset", "frobnicate"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "invalid choice: 'frobnicate'" in result.stderr


def test_facecoresetnet_is_an_alias_of_the_coreset_method():
    from fusedset.cli import build_parser

    parser = build_parser()
    common = ["--features", "f.npy", "--out", "o.npz"]
    assert parser.parse_args(["fuse", "--method", "facecoresetnet", *common]).method == "coreset"
    train = ["train", "--method", "facecoresetnet", "--meta", "m", *common]
    assert parser.parse_args(train).method == "coreset"
    evaluate = ["eval", "--meta", "m", "--features", "f.npy", "--method", "facecoresetnet"]
    assert parser.parse_args(evaluate).method == ["coreset"]


def test_help_shows_the_defaults(capsys):
    from fusedset.training import TrainConfig

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"(default: {TrainConfig().epochs})" in out
    assert "(default: None)" not in out
    assert "(default: False)" not in out

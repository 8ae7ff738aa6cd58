import json
import subprocess
import sys

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

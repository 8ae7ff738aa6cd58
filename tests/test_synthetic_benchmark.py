"""``fusedset synthetic-benchmark``: the accuracy run end to end, in its tiny mode."""

from __future__ import annotations

import json
import shlex

import pytest

from fusedset.cli import main
from fusedset.methods import method_names

from .helpers import torch_threads


@pytest.fixture
def restore_threads():
    """The train and eval steps set the process-wide thread count."""
    with torch_threads():
        yield


def test_tiny_run_generates_trains_evaluates_every_method(tmp_path, capsys, restore_threads):
    out = tmp_path / "synthetic"
    assert main(["synthetic-benchmark", "--tiny", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    steps = [line[2:] for line in printed.splitlines() if line.startswith("$ fusedset ")]
    assert [shlex.split(s)[1:3] for s in steps] == [
        ["data", "synth"],
        ["data", "synth"],
        ["train", "--method"],
        ["train", "--method"],
        ["eval", "--meta"],
    ]
    assert "--split train" in steps[1]
    assert "trained caface on 28 templates" in printed
    assert "trained coreset on 28 templates" in printed

    results = json.loads((out / "report" / "results.json").read_text())
    assert [r["method"] for r in results] == method_names()
    assert all(0 <= r["identification"]["rank"]["1"] <= 1 for r in results)
    assert (out / "report" / "roc.png").is_file()

    # The printed eval command, run again, reproduces the report: the run is its own recipe.
    assert main([*shlex.split(steps[-1])[1:-2], "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    strip = lambda rs: [{k: v for k, v in r.items() if k != "fuse_seconds"} for r in rs]  # noqa: E731
    assert strip(again) == strip(results)

"""The benchmark suite itself, in its seconds-long smoke mode: every op and module runs, and
the JSON it writes holds sane numbers."""

import json

import pytest

from fusedset.bench import suite
from fusedset.cli import main


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert main(["bench", "--smoke", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_every_benchmark_module_reports(smoke_results):
    _, payload = smoke_results
    assert {r["op"] for r in payload["results"]} == set(suite.benchmark_modules())
    assert payload["mode"] == "smoke"
    for key in ("device", "cores", "torch", "triton", "git_revision"):
        assert key in payload["machine"]


@pytest.mark.slow
def test_times_are_positive_and_speedups_follow_from_them(smoke_results):
    _, payload = smoke_results
    rows = payload["results"]
    by_key = {(r["op"], r["case"], r["pass_"], r["impl"]): r for r in rows}
    checked = 0
    for r in rows:
        assert r["median_s"] > 0
        if r["bytes_moved"]:
            assert r["gb_per_s"] == pytest.approx(r["bytes_moved"] / r["median_s"] / 1e9)
        for baseline, ratio in r["speedups"].items():
            base = by_key[(r["op"], r["case"], r["pass_"], baseline)]
            assert ratio == pytest.approx(base["median_s"] / r["median_s"])
            checked += 1
    assert checked > 0


@pytest.mark.slow
def test_report_and_plots_are_written(smoke_results):
    out, payload = smoke_results
    report = (out / "report.md").read_text()
    for op in {r["op"] for r in payload["results"]}:
        assert f"## {op}" in report
        assert (out / f"{op}.png").stat().st_size > 0
    assert (out / "speedups.png").stat().st_size > 0


def test_unknown_benchmark_is_refused(capsys):
    assert main(["bench", "--smoke", "--only", "no_such_op"]) == 2
    assert "unknown benchmark ['no_such_op']" in capsys.readouterr().err


def test_measured_table_takes_medians_and_ranges_over_runs(tmp_path, capsys):
    def run(fast, base):
        return {
            "results": [
                {
                    "op": "cluster_accumulate",
                    "case": "N=65536",
                    "pass_": "forward",
                    "impl": "fusedset",
                    "median_s": fast,
                    "speedups": {"eager": base / fast},
                },
                {
                    "op": "cluster_accumulate",
                    "case": "N=65536",
                    "pass_": "forward",
                    "impl": "eager",
                    "median_s": base,
                    "speedups": {},
                },
            ]
        }

    paths = []
    for i, (fast, base) in enumerate([(0.007, 0.021), (0.008, 0.020), (0.0072, 0.0216)]):
        paths.append(tmp_path / f"results{i}.json")
        paths[-1].write_text(json.dumps(run(fast, base)))
    assert main(["bench", "--table", *map(str, paths)]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].startswith("| op | case | pass | fusedset (3 runs) |")
    assert table[2] == (
        "| cluster_accumulate | N=65536 | forward | fusedset 7.2 ms | "
        "3.00x vs eager (2.50x to 3.00x) |"
    )

"""``fusedset synthetic-benchmark``: the accuracy run end to end, as the commands a user types.

Each step is a ``fusedset`` command, printed before it runs, so the run is its own recipe:
generate the evaluation benchmark and a training set of other identities, train CAFace and
FaceCoresetNet on the training set, evaluate every method on the benchmark.
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path

from fusedset.cli import UsageError, add_command, positive_int
from fusedset.training import METHODS, TrainConfig

# A benchmark of a few seconds end to end, for tests and smoke runs.
TINY_SYNTH = [
    "--enrolled",
    "12",
    "--unenrolled",
    "4",
    "--frames-median",
    "10",
    "--frames-max",
    "40",
]
TINY_EPOCHS = 1
FEATURES = "synth_features.npy"  # what `fusedset data synth` writes


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers,
        "synthetic-benchmark",
        help="generate, train both modules, evaluate all methods on the synthetic benchmark",
        description="Run the synthetic accuracy benchmark end to end, printing each command "
        "as it runs: `fusedset data synth` (evaluation benchmark in OUT/eval, training set of "
        "other identities in OUT/train), `fusedset train` for caface and coreset "
        "(OUT/caface.pt, OUT/coreset.pt), and `fusedset eval` of every method (table, "
        "OUT/report/results.json and roc.png). About a minute on 2 CPU cores.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench-results/synthetic"),
        help="output directory",
    )
    parser.add_argument("--seed", type=int, default=0, help="benchmark seed")
    parser.add_argument(
        "--epochs",
        type=positive_int,
        help=f"training epochs of each module (default: {TrainConfig().epochs}; "
        f"{TINY_EPOCHS} with --tiny)",
    )
    parser.add_argument(
        "--tiny", action="store_true", help="a benchmark of 16 identities: seconds, for smoke tests"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def commands(args: argparse.Namespace) -> list[list[str]]:
    """The argv of every step."""
    out: Path = args.out
    synth = ["--seed", str(args.seed), *(TINY_SYNTH if args.tiny else [])]
    epochs = args.epochs or (TINY_EPOCHS if args.tiny else None)
    train_options = ["--epochs", str(epochs)] if epochs else []
    train_options += ["--no-progress"] if args.no_progress else []
    train_set = ["--features", str(out / "train" / FEATURES), "--meta", str(out / "train" / "meta")]
    checkpoints = [f"{method}={out / f'{method}.pt'}" for method in METHODS]
    return [
        ["data", "synth", "--out", str(out / "eval"), *synth],
        ["data", "synth", "--split", "train", "--out", str(out / "train"), *synth],
        *(
            ["train", "--method", m, *train_set, "--out", str(out / f"{m}.pt"), *train_options]
            for m in METHODS
        ),
        [
            "eval",
            *("--meta", str(out / "eval" / "meta"), "--features", str(out / "eval" / FEATURES)),
            *("--checkpoint", *checkpoints, "--out", str(out / "report")),
        ],
    ]


def run(args: argparse.Namespace) -> int:
    from fusedset.cli import main

    start = time.perf_counter()
    for argv in commands(args):
        print(f"\n$ fusedset {shlex.join(argv)}", flush=True)
        step_start = time.perf_counter()
        code = main(argv)
        if code:
            raise UsageError(f"step `fusedset {shlex.join(argv)}` failed (exit code {code})")
        print(f"({time.perf_counter() - step_start:.1f} s)", flush=True)
    print(f"\nsynthetic benchmark done in {time.perf_counter() - start:.0f} s; files in {args.out}")
    return 0

"""``fusedset data``: benchmark data (``fusedset data synth`` writes the synthetic benchmark)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from fusedset.cli import UsageError, add_command, add_defaulted
from fusedset.data.synthetic import SPLITS, SynthConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="benchmark data in the IJB-B/C layout")
    commands = parser.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    defaults = SynthConfig()
    synth = add_command(
        commands,
        "synth",
        help="write the seeded synthetic surveillance benchmark",
        description="Write OUT/meta/synth_*.txt|csv (IJB layout), OUT/synth_features.npy and "
        "OUT/synth_features_style.npy; evaluate with "
        "`fusedset eval --meta OUT/meta --features OUT/synth_features.npy`.",
    )
    synth.add_argument("--out", type=Path, required=True, help="output directory")
    synth.add_argument("--seed", type=int, default=0, help="random seed")
    synth.add_argument(
        "--split",
        choices=SPLITS,
        default="eval",
        help="eval: the benchmark; train: a training set for it, with the same "
        "backbone constants (non-face direction, clean style statistics) but other "
        "identities, for `fusedset train`",
    )
    add_defaulted(
        synth,
        [
            ("--enrolled", defaults.enrolled, "identities with a gallery template"),
            ("--unenrolled", defaults.unenrolled, "open-set identities with a probe only"),
            ("--frames-median", defaults.frames_median, "median frames per probe"),
            ("--frames-max", defaults.frames_range[1], "most frames per probe"),
        ],
    )
    synth.set_defaults(func=run_synth)


def run_synth(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from fusedset.data import generate, write_benchmark

    if args.enrolled < 1 or args.unenrolled < 0:
        raise UsageError("--enrolled must be at least 1 and --unenrolled at least 0")
    frames_min = SynthConfig.frames_range[0]
    if args.frames_max < frames_min or args.frames_median <= 0:
        raise UsageError(f"--frames-max must be at least {frames_min}, --frames-median positive")
    config = replace(
        SynthConfig(),
        enrolled=args.enrolled,
        unenrolled=args.unenrolled,
        frames_median=args.frames_median,
        frames_range=(frames_min, args.frames_max),
    )
    start = time.perf_counter()
    bench = generate(config, seed=args.seed, split=args.split)
    features_path = write_benchmark(args.out, bench.meta, bench.features, bench.style)
    meta = bench.meta
    print(
        f"wrote {len(meta.templates)} images, {len(meta.probes)} probe and "
        f"{args.enrolled} gallery templates, {len(meta.pairs)} pairs "
        f"in {time.perf_counter() - start:.1f} s"
    )
    if args.split == "train":
        print(
            f"train: fusedset train --method caface --meta {args.out / 'meta'} "
            f"--features {features_path} --out caface.pt"
        )
    else:
        print(f"evaluate: fusedset eval --meta {args.out / 'meta'} --features {features_path}")
    return 0

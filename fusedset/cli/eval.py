"""``fusedset eval``: accuracy of template fusion methods on an IJB-layout benchmark."""

from __future__ import annotations

import argparse
from pathlib import Path

from fusedset.cli import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    from fusedset.eval.fusion import method_names

    parser = subparsers.add_parser(
        "eval",
        help="1:1 TAR@FAR and 1:N rank / TPIR of fusion methods on IJB-layout data",
        description="Fuse every template with each method, then print 1:1 verification TAR "
        "at FAR 1e-5..1e-1 and, when the meta directory has 1:N lists, rank-1, rank-5 and "
        "TPIR at FPIR 1%. With --out, also write results.json and roc.png.",
    )
    parser.add_argument(
        "--meta", type=Path, required=True, help="directory of the *_face_tid_mid.txt etc."
    )
    parser.add_argument(
        "--features",
        type=Path,
        required=True,
        help="(images, D) .npy of raw embeddings in face_tid_mid order; style statistics "
        "are read from {stem}_style.npy next to it when present",
    )
    parser.add_argument(
        "--method",
        nargs="+",
        metavar="NAME",
        help=f"fusion methods among {' '.join(method_names())} (default: every registered "
        "method, except those that need a checkpoint when --checkpoint is not given)",
    )
    parser.add_argument("--checkpoint", help="weights for learned methods")
    parser.add_argument("--out", type=Path, help="write results.json and roc.png here")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default: 1; per-template ops are too small to share)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        from fusedset.eval.evaluate import evaluate, format_table, write_report
    except ImportError as exc:
        raise UsageError(f"{exc}; install the eval extra: pip install 'fusedset[eval]'") from exc
    import torch

    from fusedset.data import MetaFileError, read_features, read_meta
    from fusedset.eval.fusion import get_method, method_names

    methods = args.method or [
        m for m in method_names() if args.checkpoint or not get_method(m).needs_checkpoint
    ]
    unknown = [m for m in methods if m not in method_names()]
    if unknown:
        raise UsageError(f"unknown method {unknown[0]!r}; known: {' '.join(method_names())}")
    if args.threads < 1:
        raise UsageError("--threads must be at least 1")
    torch.set_num_threads(args.threads)
    try:
        meta = read_meta(args.meta)
        features, style = read_features(args.features)
        results = evaluate(meta, features, style, methods, checkpoint=args.checkpoint)
    except (MetaFileError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    print(format_table(results))
    if args.out is not None:
        json_path, png_path = write_report(results, args.out)
        print(f"wrote {json_path} and {png_path}")
    return 0

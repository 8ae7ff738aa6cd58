"""``fusedset eval``: accuracy of template fusion methods on an IJB-layout benchmark."""

from __future__ import annotations

import argparse
from pathlib import Path

from fusedset.cli import UsageError, add_command, add_threads


def register(subparsers: argparse._SubParsersAction) -> None:
    from fusedset.methods import canonical_name, method_names

    parser = add_command(
        subparsers,
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
        type=canonical_name,
        metavar="NAME",
        help=f"fusion methods among {' '.join(method_names())}; when not given, every method "
        "that needs no checkpoint, and each learned method given one",
    )
    parser.add_argument(
        "--checkpoint",
        nargs="+",
        metavar="[METHOD=]PATH",
        help="weights of the learned methods, one METHOD=PATH each (e.g. "
        "--checkpoint caface=caface.pt coreset=coreset.pt); a bare PATH when --method selects "
        "exactly one learned method. A released checkpoint or one written by `fusedset train`",
    )
    parser.add_argument("--out", type=Path, help="write results.json and roc.png here")
    add_threads(parser, "per-template ops are too small to share")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        from fusedset.eval.run import evaluate, format_table, write_report
    except ImportError as exc:
        raise UsageError(f"{exc}; install the eval extra: pip install 'fusedset[eval]'") from exc
    import torch

    from fusedset.data import MetaFileError, read_features, read_meta
    from fusedset.methods import get_method, method_names

    unknown = [m for m in args.method or [] if m not in method_names()]
    if unknown:
        raise UsageError(f"unknown method {unknown[0]!r}; known: {' '.join(method_names())}")
    checkpoints = parse_checkpoints(args.checkpoint or [], args.method)
    methods = args.method or [
        m for m in method_names() if m in checkpoints or not get_method(m).needs_checkpoint
    ]
    if args.threads < 1:
        raise UsageError("--threads must be at least 1")
    torch.set_num_threads(args.threads)
    try:
        meta = read_meta(args.meta)
        features, style = read_features(args.features)
        results = evaluate(meta, features, style, methods, checkpoints)
    except (MetaFileError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    print(format_table(results))
    if args.out is not None:
        json_path, png_path = write_report(results, args.out)
        print(f"wrote {json_path} and {png_path}")
    return 0


def parse_checkpoints(values: list[str], methods: list[str] | None) -> dict[str, str]:
    """``--checkpoint`` values -> learned method -> path. ``METHOD=PATH`` names its method (a
    path may hold ``=`` when what precedes it is no method name); a bare ``PATH`` belongs to the
    one learned method that ``--method`` selects."""
    from fusedset.methods import canonical_name, get_method, method_names

    learned = [m for m in method_names() if get_method(m).needs_checkpoint]
    selected = [m for m in methods or [] if m in learned]
    checkpoints: dict[str, str] = {}
    for value in values:
        name, has_name, path = value.partition("=")
        name = canonical_name(name)
        if not has_name or name not in method_names():
            if len(selected) != 1:
                raise UsageError(
                    f"--checkpoint {value}: say which method it is for, as METHOD=PATH with "
                    f"METHOD among {' '.join(learned)} (a bare PATH needs --method to select "
                    "exactly one of them)"
                )
            name, path = selected[0], value
        if name not in learned:
            raise UsageError(f"--checkpoint {value}: method {name!r} takes no checkpoint")
        if name in checkpoints:
            raise UsageError(f"--checkpoint: two checkpoints for {name!r}")
        if methods is not None and name not in methods:
            raise UsageError(f"--checkpoint {value}: --method does not select {name!r}")
        checkpoints[name] = path
    return checkpoints

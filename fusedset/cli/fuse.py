"""``fusedset fuse``: one L2-normalized descriptor per template of a per-image feature file."""

from __future__ import annotations

import argparse
from pathlib import Path

from fusedset.cli import UsageError, add_command, positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    from fusedset.methods import canonical_name, method_names

    parser = add_command(
        subparsers,
        "fuse",
        help="fuse each template of a feature file into one descriptor",
        description="Read per-image features (.npy with --templates, or .npz/.safetensors "
        "holding features, templates and optionally media and style), fuse each template "
        "with METHOD, and write templates and L2-normalized descriptors to OUT (.npz or "
        ".safetensors).",
    )
    parser.add_argument("--method", required=True, type=canonical_name, choices=method_names())
    parser.add_argument("--features", type=Path, required=True, metavar="F")
    parser.add_argument(
        "--templates",
        type=Path,
        metavar="T",
        help="for .npy features: template ids (.npy of N ids or N x [template, media], or an "
        "IJB *_face_tid_mid.txt)",
    )
    parser.add_argument(
        "--style", type=Path, help="(N, C, 2) style statistics .npy (default: {stem}_style.npy)"
    )
    parser.add_argument(
        "--checkpoint",
        metavar="P",
        help="weights of a learned method (caface, coreset): a released checkpoint or one "
        "written by `fusedset train`",
    )
    parser.add_argument(
        "--chunk",
        type=positive_int,
        metavar="N",
        help="caface: frames per chunk; a template is read and fused one chunk at a time "
        "(default: 256)",
    )
    parser.add_argument("--out", type=Path, required=True, metavar="O")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fusedset.data.ijb import style_path
    from fusedset.fuse import check_output, fuse_templates, read_images, write_descriptors
    from fusedset.methods import get_method

    if get_method(args.method).needs_checkpoint and args.checkpoint is None:
        raise UsageError(f"method {args.method!r} needs --checkpoint")
    inputs = [args.features, args.templates, args.style, args.checkpoint, style_path(args.features)]
    try:
        check_output(args.out, inputs)
        images = read_images(args.features, args.templates, args.style)
        templates, descriptors = fuse_templates(
            images, args.method, args.checkpoint, args.chunk, progress=not args.no_progress
        )
        path = write_descriptors(args.out, templates, descriptors)
    except ValueError as exc:  # a FuseInputError, or --chunk for a method that does not stream
        raise UsageError(str(exc)) from exc
    print(f"wrote {len(templates)} descriptors of width {descriptors.shape[1]} to {path}")
    return 0

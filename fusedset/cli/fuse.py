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
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where to fuse; under torchrun, cuda is each rank's local GPU",
    )
    parser.add_argument(
        "--rank-timeout",
        type=positive_int,
        default=120,
        metavar="S",
        help="under torchrun: seconds without a sign of life after which a rank has failed",
    )
    parser.add_argument("--out", type=Path, required=True, metavar="O")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fusedset.methods import get_method
    from fusedset.sharded_fuse import Launch, fuse_sharded

    if get_method(args.method).needs_checkpoint and args.checkpoint is None:
        raise UsageError(f"method {args.method!r} needs --checkpoint")
    if args.device == "cuda" and not torch_cuda_available():
        raise UsageError("--device cuda: torch sees no CUDA device")
    try:
        launch = Launch.from_env()
        if launch is None:
            written = fuse_alone(args)
        else:
            written = fuse_sharded(
                launch, args.features, args.templates, args.style, args.method, args.checkpoint,
                args.chunk, args.out, args.device, not args.no_progress, args.rank_timeout,
            )  # fmt: skip
    # A FuseInputError, --chunk for a method that does not stream, or ranks that could not meet.
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if written is not None:  # rank 0, or the one process
        count, width, path = written
        print(f"wrote {count} descriptors of width {width} to {path}")
    return 0


def fuse_alone(args: argparse.Namespace) -> tuple[int, int, Path]:
    from fusedset.fuse import (
        check_output,
        fuse_templates,
        input_paths,
        read_images,
        write_descriptors,
    )

    check_output(args.out, input_paths(args.features, args.templates, args.style,
                                       args.checkpoint))  # fmt: skip
    images = read_images(args.features, args.templates, args.style)
    templates, descriptors = fuse_templates(
        images, args.method, args.checkpoint, args.chunk, not args.no_progress, args.device
    )
    path = write_descriptors(args.out, templates, descriptors)
    return len(templates), descriptors.shape[1], path


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()

"""``fusedset train``: train CAFace or FaceCoresetNet on frozen features of an IJB-layout set."""

from __future__ import annotations

import argparse
from pathlib import Path

from fusedset.cli import UsageError, add_command, add_defaulted, add_threads
from fusedset.methods.registry import canonical_name
from fusedset.training import METHODS, TrainConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    defaults = TrainConfig()
    parser = add_command(
        subparsers,
        "train",
        help="train a fusion module (caface, coreset) on frozen features",
        description="Train a fresh CAFace or FaceCoresetNet on the templates of an IJB-layout "
        "benchmark whose 1:N lists give each template's subject, with the papers' losses "
        "(cosine distance to the subject's center; CAFace adds the chunked-vs-one-shot "
        "consistency loss), AdamW and a step decay of the learning rate, and save a "
        "checkpoint that `fusedset fuse` and `fusedset eval --checkpoint` take. Train on "
        "identities the evaluation does not use, e.g. "
        "`fusedset data synth --split train`.",
    )
    parser.add_argument("--method", required=True, type=canonical_name, choices=METHODS)
    parser.add_argument(
        "--features",
        type=Path,
        required=True,
        metavar="F",
        help="(images, D) .npy of raw embeddings in face_tid_mid order, style statistics in "
        "{stem}_style.npy next to it (needed by caface)",
    )
    parser.add_argument(
        "--meta", type=Path, required=True, metavar="DIR", help="the IJB-layout meta directory"
    )
    parser.add_argument("--out", type=Path, required=True, metavar="CKPT", help="checkpoint path")
    add_defaulted(
        parser,
        [
            ("--epochs", defaults.epochs, "passes over the templates"),
            ("--batch-size", defaults.batch_size, "templates per step"),
            ("--max-frames", defaults.max_frames, "frames drawn from a template per step"),
            ("--lr", defaults.lr, "AdamW learning rate"),
            ("--seed", defaults.seed, "random seed"),
        ],
    )
    add_threads(parser, "1 also keeps runs bitwise reproducible")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from fusedset.data import MetaFileError, read_features, read_meta
    from fusedset.data.ijb import style_path
    from fusedset.training import save_checkpoint, train, training_set

    if args.threads < 1:
        raise UsageError("--threads must be at least 1")
    try:
        config = TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            max_frames=args.max_frames,
            lr=args.lr,
            seed=args.seed,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    torch.set_num_threads(args.threads)
    try:
        meta = read_meta(args.meta)
        features, style = read_features(args.features)
        if args.method == "caface" and style is None:
            raise UsageError(
                f"{style_path(args.features)}: no such file; caface trains on the style "
                "statistics of the features"
            )
        data = training_set(meta, features, style)
        result = train(args.method, data, config, progress=not args.no_progress)
    except (MetaFileError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    path = save_checkpoint(args.out, args.method, result, config, features=str(args.features))
    losses = result.epoch_losses
    print(
        f"trained {args.method} on {len(data.features)} templates: loss {losses[0]:.4f} "
        f"(epoch 1) -> {losses[-1]:.4f} (epoch {len(losses)}); wrote {path}"
    )
    return 0

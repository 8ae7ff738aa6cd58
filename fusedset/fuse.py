"""Fuse every template of a per-image feature file into one L2-normalized descriptor.

Inputs (``read_images``):

- ``.npy`` features (N, D), memory-mapped, with the template ids from ``--templates``: a
  ``.npy`` of N ids, or of (N, 2) template and media ids, or an IJB ``*_face_tid_mid.txt``;
  style statistics (N, C, 2) from ``--style`` or ``{stem}_style.npy`` next to the features.
- ``.npz`` or ``.safetensors`` holding ``features`` (N, D), ``templates`` (N,) and optionally
  ``media`` (N,) and ``style`` (N, C, 2).

A template's rows are read when it is fused, so with ``.npy`` input the memory is bounded by the
largest template, not by the file; methods that stream (CAFace) read a template one chunk at a
time, so their memory is bounded by the chunk.
Output (``write_descriptors``): ``.npz`` or ``.safetensors`` with ``templates`` (T,) and
``descriptors`` (T, D) float32. The file appears complete or not at all: it is written without
a name (Linux ``O_TMPFILE``) and linked into place when complete, so even a process killed while
writing leaves nothing behind (elsewhere, a hidden temporary name is renamed).
"""

from __future__ import annotations

import errno
import os
import secrets
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from fusedset.data.ijb import style_path, template_groups
from fusedset.methods import Fuser, StreamingFuser, Template, get_method
from fusedset.ops._checks import all_finite

OUTPUT_SUFFIXES = (".npz", ".safetensors")


class FuseInputError(ValueError):
    """An input file is missing, malformed or inconsistent; the message names the file."""


@dataclass
class ImageArrays:
    """Per-image arrays; ``features`` and ``style`` may be memory-mapped."""

    features: Any  # (N, D) array
    templates: np.ndarray  # (N,) int64
    media: np.ndarray  # (N,) int64
    style: Any | None  # (N, C, 2) array or None
    source: Path


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise FuseInputError(f"{path}: cannot read a .npy array ({exc})") from exc


def _read_templates(path: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise FuseInputError(f"{path}: no such templates file")
    if path.suffix == ".npy":
        ids = np.asarray(_load_npy(path))
    else:
        try:
            rows = np.loadtxt(path, dtype=str, ndmin=2)
        except ValueError as exc:
            raise FuseInputError(f"{path}: cannot read template ids ({exc})") from exc
        # IJB `name template media` lines, or one template id per line
        ids = rows[:, 1:3] if rows.shape[1] >= 3 else rows[:, :1]
    ids = _integer_ids(path, "template ids", ids)
    if ids.ndim == 2 and ids.shape[1] == 1:
        ids = ids[:, 0]
    if ids.shape[0] != n or ids.ndim not in (1, 2) or (ids.ndim == 2 and ids.shape[1] != 2):
        raise FuseInputError(
            f"{path}: expected {n} template ids (one per feature row), or {n} rows of "
            f"template and media id, got shape {ids.shape}"
        )
    return (ids, ids) if ids.ndim == 1 else (ids[:, 0], ids[:, 1])


def _integer_ids(path: Path, name: str, ids: Any) -> np.ndarray:
    """``ids`` as int64, refusing any a cast would change (3.5 -> 3, NaN, 1e30, True)."""
    ids = np.asarray(ids)
    if ids.dtype.kind in "US":  # the text of a template file
        try:
            return ids.astype(np.int64)
        except (ValueError, OverflowError) as exc:
            raise FuseInputError(f"{path}: {name} must be integers ({exc})") from exc
    if ids.dtype.kind == "f":
        whole = np.isfinite(ids) & (np.floor(ids) == ids) & (np.abs(ids) < 2.0**63)
    elif ids.dtype.kind in "iu":
        whole = ids <= np.iinfo(np.int64).max
    else:
        raise FuseInputError(f"{path}: {name} must be integers, got dtype {ids.dtype}")
    if not whole.all():
        bad = ids.reshape(-1)[np.flatnonzero(~whole)[0]]
        raise FuseInputError(f"{path}: {name} must be integers, got {bad} (dtype {ids.dtype})")
    return ids.astype(np.int64)


def _read_bundle(path: Path) -> dict[str, Any]:
    try:
        if path.suffix == ".npz":
            with np.load(path) as bundle:
                return {k: bundle[k] for k in bundle.files}
        from safetensors.numpy import load_file

        return load_file(str(path))
    except Exception as exc:  # any reader failure is a bad input file
        raise FuseInputError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from exc


def read_images(
    features: str | Path, templates: str | Path | None = None, style: str | Path | None = None
) -> ImageArrays:
    path = Path(features)
    if not path.is_file():
        raise FuseInputError(f"{path}: no such features file")
    if path.suffix == ".npy":
        feats = _load_npy(path)
        if templates is None:
            raise FuseInputError(f"{path}: a .npy feature file needs --templates")
        template_ids, media = _read_templates(Path(templates), len(feats))
        style_file = Path(style) if style is not None else style_path(path)
        stats = _load_npy(style_file) if style_file.is_file() else None
        if style is not None and stats is None:
            raise FuseInputError(f"{style_file}: no such style file")
        return _checked(ImageArrays(feats, template_ids, media, stats, path))
    if path.suffix not in OUTPUT_SUFFIXES:
        raise FuseInputError(f"{path}: features must be .npy, .npz or .safetensors")
    bundle = _read_bundle(path)
    missing = [k for k in ("features", "templates") if k not in bundle]
    if missing:
        raise FuseInputError(
            f"{path}: missing array {missing[0]!r} (has {', '.join(sorted(bundle)) or 'none'})"
        )
    template_ids = _integer_ids(path, "templates", bundle["templates"])
    media = _integer_ids(path, "media", bundle.get("media", template_ids))
    return _checked(ImageArrays(bundle["features"], template_ids, media, bundle.get("style"), path))


def _checked(images: ImageArrays) -> ImageArrays:
    path, n = images.source, len(images.templates)
    if images.features.ndim != 2 or images.features.shape[0] == 0:
        raise FuseInputError(
            f"{path}: features must be (images, D) with at least one image, "
            f"got shape {images.features.shape}"
        )
    for name, array in (("templates", images.templates), ("media", images.media)):
        if array.shape != (images.features.shape[0],):
            raise FuseInputError(
                f"{path}: {name} must hold one id per feature row ({images.features.shape[0]}), "
                f"got shape {array.shape}"
            )
    if images.style is not None and (
        images.style.ndim != 3 or images.style.shape[0] != n or images.style.shape[2] != 2
    ):
        raise FuseInputError(
            f"{path}: style must be (images, C, 2) with {n} rows, got shape {images.style.shape}"
        )
    return images


def templates_of(images: ImageArrays) -> Iterator[tuple[int, np.ndarray]]:
    """(template id, its row indices in file order), templates in increasing id order."""
    ids, groups = template_groups(images.templates)
    yield from zip(ids.tolist(), groups, strict=True)


def _template(
    images: ImageArrays, template: int, rows: np.ndarray, device: torch.device
) -> Template:
    """The images ``rows`` of ``template`` (all of it or one part), read, checked and on
    ``device``."""
    features = torch.from_numpy(np.asarray(images.features[rows], dtype=np.float32))
    if not all_finite(features):
        raise FuseInputError(f"{images.source}: template {template} has NaN or Inf features")
    style = None
    if images.style is not None:
        style = torch.from_numpy(np.asarray(images.style[rows], dtype=np.float32)).to(device)
    media = torch.from_numpy(images.media[rows]).to(device)
    return Template(features.to(device), media, style)


def _fuse_one(
    images: ImageArrays,
    fuser: Fuser,
    template: int,
    rows: np.ndarray,
    chunk_size: int | None,
    device: str | torch.device,
) -> torch.Tensor:
    device = torch.device(device)
    if not isinstance(fuser, StreamingFuser):
        return fuser(_template(images, template, rows, device))
    # Parts of whole chunks fuse as the whole template would, reading one part at a time.
    stream = fuser.stream(chunk_size)
    for start in range(0, len(rows), stream.chunk_size):
        part = rows[start : start + stream.chunk_size]
        stream.update(_template(images, template, part, device))
    return stream.result()


def build_fuser(
    images: ImageArrays,
    method: str,
    checkpoint: str | None = None,
    chunk_size: int | None = None,
    device: str | torch.device = "cpu",
) -> Fuser:
    """The fuser of ``method`` on ``device``, refused before any work when it cannot fuse
    ``images`` or does not take ``chunk_size``."""
    spec = get_method(method)
    if spec.needs_style and images.style is None:
        raise FuseInputError(f"{images.source}: method {method!r} needs style statistics")
    try:
        fuser = spec.build(checkpoint, torch.device(device))
    except ValueError as exc:  # a checkpoint that is missing or not this method's
        raise FuseInputError(str(exc)) from exc
    if chunk_size is not None and not isinstance(fuser, StreamingFuser):
        raise ValueError(f"method {method!r} does not stream in chunks: it takes no chunk size")
    return fuser


def fuse_groups(
    images: ImageArrays,
    fuser: Fuser,
    groups: Sequence[tuple[int, np.ndarray]],
    chunk_size: int | None = None,
    device: str | torch.device = "cpu",
    fused: Callable[[], None] = lambda: None,
) -> tuple[np.ndarray, np.ndarray]:
    """-> the ids (T,) int64 and L2-normalized descriptors (T, D) float32 of ``groups``
    ((template id, its rows) pairs, as ``templates_of`` yields them), in their order;
    ``fused()`` is called after each template.

    ``chunk_size``: frames per part for methods that stream (``StreamingFuser``, e.g. caface;
    their own default when None).
    """
    ids = np.empty(len(groups), dtype=np.int64)
    descriptors = np.empty((len(groups), images.features.shape[1]), dtype=np.float32)
    for i, (template, rows) in enumerate(groups):
        try:
            with torch.no_grad():
                descriptor = _fuse_one(images, fuser, template, rows, chunk_size, device)
        except FuseInputError:
            raise
        except ValueError as exc:  # the module refused the template (width, style shape, ...)
            raise FuseInputError(f"{images.source}: template {template}: {exc}") from exc
        descriptor = descriptor.float().cpu()
        if not all_finite(descriptor) or not bool(descriptor.any()):
            kind = "zero" if all_finite(descriptor) else "NaN or Inf"
            raise FuseInputError(
                f"{images.source}: template {template}: its fused descriptor is {kind}, a "
                "direction cannot be written (are all its features zero?)"
            )
        ids[i] = template
        descriptors[i] = torch.nn.functional.normalize(descriptor, dim=-1).numpy()
        fused()
    return ids, descriptors


def fuse_templates(
    images: ImageArrays,
    method: str,
    checkpoint: str | None = None,
    chunk_size: int | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """-> template ids (T,) int64 in increasing order and their L2-normalized descriptors
    (T, D) float32. Methods that do not stream refuse ``chunk_size``."""
    fuser = build_fuser(images, method, checkpoint, chunk_size, device)
    groups = list(templates_of(images))
    from tqdm import tqdm

    with tqdm(total=len(groups), unit="template", disable=not progress, dynamic_ncols=True) as bar:
        return fuse_groups(images, fuser, groups, chunk_size, device, lambda: bar.update())


def input_paths(
    features: str | Path,
    templates: str | Path | None,
    style: str | Path | None,
    checkpoint: str | None,
) -> list[str | Path | None]:
    """Every file a run with these arguments may read (the output must be none of them)."""
    return [features, templates, style, checkpoint, style_path(Path(features))]


def check_output(path: str | Path, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Refuses, before any work, an output that could not be written or would overwrite an
    input: a wrong suffix, a directory, a path under a regular file, one of ``inputs``."""
    path = Path(path)
    if path.suffix not in OUTPUT_SUFFIXES:
        raise FuseInputError(f"{path}: the output must be .npz or .safetensors")
    if path.is_dir():
        raise FuseInputError(f"{path}: the output is an existing directory")
    if path.exists():
        for source in inputs:
            if source is not None and Path(source).exists() and os.path.samefile(path, source):
                raise FuseInputError(
                    f"{path}: the output is an input file; it is never overwritten"
                )
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise FuseInputError(f"{path}: cannot write under {parent}, a file, not a directory")
    return path


def write_descriptors(path: str | Path, templates: np.ndarray, descriptors: np.ndarray) -> Path:
    """Writes atomically: the file appears complete or not at all, and a failure leaves no
    file behind, nor does a process killed while writing where ``O_TMPFILE`` exists."""
    path = check_output(path)

    def write(file: BinaryIO) -> None:
        if path.suffix == ".npz":
            np.savez(file, templates=templates, descriptors=descriptors)
        else:
            from safetensors.numpy import save

            file.write(save({"templates": templates, "descriptors": descriptors}))

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _unnamed_file(path.parent)
        if fd is None:
            _write_named(path, write)
        else:
            try:
                with os.fdopen(fd, "wb", closefd=False) as file:
                    write(file)
                _link(fd, path)
            finally:
                os.close(fd)
    except OSError as exc:
        raise FuseInputError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    return path


def _unnamed_file(directory: Path) -> int | None:
    """A file open for writing in ``directory`` without a name, or None where the system or the
    file system has no ``O_TMPFILE``."""
    flag = getattr(os, "O_TMPFILE", 0)
    if not flag or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        return os.open(directory, flag | os.O_RDWR, 0o666)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            return None
        raise


def _link(fd: int, path: Path) -> None:
    """Names the unnamed file open at ``fd`` ``path``, replacing a file there."""
    # linkat(AT_SYMLINK_FOLLOW) of /proc/self/fd/N; os.link calls plain link(), which would
    # link the /proc entry itself, unless given a directory descriptor.
    fds = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            os.link(str(fd), path, src_dir_fd=fds, follow_symlinks=True)
            return
        except FileExistsError:
            pass
        # linkat never replaces a file: link under a hidden name, then rename it over the file.
        hidden = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
        os.link(str(fd), hidden, src_dir_fd=fds, follow_symlinks=True)
    finally:
        os.close(fds)
    try:
        os.replace(hidden, path)
    except BaseException:
        hidden.unlink(missing_ok=True)
        raise


def _write_named(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Without unnamed files: a hidden temporary file beside ``path``, renamed when complete."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)

"""The insightface IJB-B/C evaluation layout, read and written, so real data and the synthetic
benchmark go through one loader.

A meta directory holds, for one prefix such as ``ijbc`` or ``synth``:

``{prefix}_face_tid_mid.txt``
    one line per image, ``image_name template_id media_id`` (space separated, no header). The
    line order is the row order of the feature file.
``{prefix}_template_pair_label.txt``
    1:1 verification pairs, ``template_id_1 template_id_2 label`` (label 1: same subject).
``{prefix}_1N_gallery_{name}.csv`` (e.g. ``G1``, ``G2``; optional, with the probe file)
    1:N gallery, a header line then ``TEMPLATE_ID,SUBJECT_ID,FILENAME[,...]``, one row per image.
``{prefix}_1N_probe_mixed.csv``
    1:N probes, same columns. Probes whose subject is in no gallery are open-set (non-mated).

Features are a ``.npy`` of shape (images, D), float32, the raw backbone embeddings with their
norms (fusion baselines and quality-aware methods need the norm), and optionally the per-image
style statistics next to it as ``{stem}_style.npy``, shape (images, C, 2) of spatial
[mean, std] (stored as float16, read as float32).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FACE_TID_MID = "{prefix}_face_tid_mid.txt"
PAIRS = "{prefix}_template_pair_label.txt"
GALLERY = "{prefix}_1N_gallery_{name}.csv"
PROBES = "{prefix}_1N_probe_mixed.csv"
CSV_HEADER = "TEMPLATE_ID,SUBJECT_ID,FILENAME"


class MetaFileError(Exception):
    """A meta or feature file is missing or malformed; the message names the file."""


@dataclass
class IJBMeta:
    """The protocol of one benchmark, as read from (or written to) a meta directory.

    Attributes:
        prefix: file name prefix (``ijbc``, ``synth``, ...).
        image_names: (n,) image names, in feature-row order.
        templates: (n,) int64 template id of each image.
        medias: (n,) int64 media id of each image (one per still or per video).
        pairs: (P, 3) int64 rows of template_id_1, template_id_2, label (1: same subject).
        galleries: 1:N gallery name (``G1``...) -> (G, 2) int64 rows of template id, subject id.
        probes: (Q, 2) int64 rows of template id, subject id; None when the 1:N files are absent.
    """

    prefix: str
    image_names: np.ndarray
    templates: np.ndarray
    medias: np.ndarray
    pairs: np.ndarray
    galleries: dict[str, np.ndarray]
    probes: np.ndarray | None


def template_groups(templates: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Per-image template ids (n,) -> the distinct ids in increasing order, and each one's row
    indices in increasing order."""
    order = np.argsort(templates, kind="stable")
    ids, starts = np.unique(templates[order], return_index=True)
    return ids, np.split(order, starts[1:])


def style_path(features_path: str | Path) -> Path:
    """Where the style statistics belonging to a feature file live."""
    path = Path(features_path)
    return path.with_name(f"{path.stem}_style.npy")


def write_meta(meta_dir: str | Path, meta: IJBMeta) -> None:
    """Write the meta files of ``meta`` into ``meta_dir`` (created if needed)."""
    meta_dir = Path(meta_dir)
    meta_dir.mkdir(parents=True, exist_ok=True)
    with open(meta_dir / FACE_TID_MID.format(prefix=meta.prefix), "w") as f:
        f.writelines(
            f"{name} {t} {m}\n"
            for name, t, m in zip(meta.image_names, meta.templates, meta.medias, strict=True)
        )
    np.savetxt(meta_dir / PAIRS.format(prefix=meta.prefix), meta.pairs, fmt="%d")
    if meta.probes is None:
        return
    lists = {GALLERY.format(prefix=meta.prefix, name=n): g for n, g in meta.galleries.items()}
    lists[PROBES.format(prefix=meta.prefix)] = meta.probes
    for file_name, rows in lists.items():
        subject_of = dict(rows.tolist())
        in_list = np.flatnonzero(np.isin(meta.templates, rows[:, 0]))
        with open(meta_dir / file_name, "w") as f:
            f.write(CSV_HEADER + "\n")
            f.writelines(
                f"{meta.templates[i]},{subject_of[meta.templates[i]]},{meta.image_names[i]}\n"
                for i in in_list
            )


def write_features(path: str | Path, features: np.ndarray, style: np.ndarray | None) -> None:
    """Write raw embeddings (images, D) to ``path`` and style stats next to it (see module)."""
    np.save(path, np.asarray(features, dtype=np.float32))
    if style is not None:
        np.save(style_path(path), np.asarray(style, dtype=np.float16))


def write_benchmark(
    out_dir: str | Path, meta: IJBMeta, features: np.ndarray, style: np.ndarray | None
) -> Path:
    """Write ``out_dir/meta/*`` and ``out_dir/{prefix}_features.npy``; returns the feature path."""
    out_dir = Path(out_dir)
    write_meta(out_dir / "meta", meta)
    features_path = out_dir / f"{meta.prefix}_features.npy"
    write_features(features_path, features, style)
    return features_path


def _columns(
    path: Path, usecols: tuple[int, ...] | int, dtype: type, delimiter: str | None = None
) -> np.ndarray:
    """Columns of a whitespace- (or ``delimiter``-) separated file; a header line is skipped
    for csv. numpy's C parser reads IJB-C's 15.7M pairs in seconds, a Python loop would not."""
    if not path.is_file():
        raise MetaFileError(f"meta file not found: {path}")
    with warnings.catch_warnings():
        # An empty file is reported below, as an error rather than a warning.
        warnings.simplefilter("ignore", UserWarning)
        try:
            table = np.loadtxt(
                path,
                dtype=dtype,
                usecols=usecols,
                delimiter=delimiter,
                skiprows=int(delimiter == ","),
                ndmin=1 if isinstance(usecols, int) else 2,
            )
        except ValueError as exc:
            raise MetaFileError(f"{path}: {exc}") from None
    if len(table) == 0:
        raise MetaFileError(f"{path}: no rows")
    return table


def _subject_list(path: Path) -> np.ndarray:
    """(templates, 2) template id, subject id of a 1:N csv (one row per image, deduplicated)."""
    rows = _columns(path, (0, 1), np.int64, delimiter=",")
    _, first = np.unique(rows[:, 0], return_index=True)
    return rows[first]


def read_meta(meta_dir: str | Path) -> IJBMeta:
    """Read the meta files of the single prefix found in ``meta_dir`` (see module docstring).

    Raises:
        MetaFileError: a required file is missing or malformed (the message names it).
    """
    meta_dir = Path(meta_dir)
    found = sorted(meta_dir.glob(FACE_TID_MID.format(prefix="*")))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise MetaFileError(f"{what} *_face_tid_mid.txt files in {meta_dir}, expected one")
    prefix = found[0].name.removesuffix(FACE_TID_MID.format(prefix=""))
    ids = _columns(found[0], (1, 2), np.int64)
    pairs = _columns(meta_dir / PAIRS.format(prefix=prefix), (0, 1, 2), np.int64)

    gallery_paths = sorted(meta_dir.glob(GALLERY.format(prefix=prefix, name="*")))
    probes_path = meta_dir / PROBES.format(prefix=prefix)
    probes = None
    galleries = {}
    if gallery_paths or probes_path.exists():
        if not gallery_paths:
            raise MetaFileError(f"meta file not found: {GALLERY.format(prefix=prefix, name='*')}")
        probes = _subject_list(probes_path)
        name_start = len(GALLERY.format(prefix=prefix, name="").removesuffix(".csv"))
        galleries = {p.stem[name_start:]: _subject_list(p) for p in gallery_paths}
    return IJBMeta(
        prefix=prefix,
        image_names=_columns(found[0], 0, str),
        templates=ids[:, 0],
        medias=ids[:, 1],
        pairs=pairs,
        galleries=galleries,
        probes=probes,
    )


def read_features(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Raw embeddings (images, D) float32 and style stats (images, C, 2) float32 or None.

    Raises:
        MetaFileError: the feature file is missing or not a 2-d array.
    """
    path = Path(path)
    if not path.is_file():
        raise MetaFileError(f"feature file not found: {path}")
    features = np.load(path)
    if features.ndim != 2:
        raise MetaFileError(f"{path}: expected (images, D) features, got shape {features.shape}")
    style_file = style_path(path)
    style = np.load(style_file).astype(np.float32) if style_file.is_file() else None
    return features.astype(np.float32, copy=False), style

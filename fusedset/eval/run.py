"""Evaluate fusion methods on an IJB-layout benchmark: fuse every template, score the 1:1 pairs
and the 1:N searches, report a table, a JSON file and a ROC plot."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fusedset.data.ijb import IJBMeta, MetaFileError, template_groups
from fusedset.eval import metrics
from fusedset.methods import Fuser, Template, get_method


@dataclass
class MethodResult:
    """One method's numbers.

    Attributes:
        method: registered name.
        tar: FAR -> TAR of 1:1 verification.
        identification: 1:N results, None when the benchmark has no 1:N lists.
        fpr, tpr: the 1:1 ROC, for plotting.
        seconds: time to fuse all templates.
    """

    method: str
    tar: dict[float, float]
    identification: metrics.Identification | None
    fpr: np.ndarray
    tpr: np.ndarray
    seconds: float

    def to_json(self) -> dict:
        ident = self.identification
        return {
            "method": self.method,
            "tar_at_far": {f"{far:g}": tar for far, tar in self.tar.items()},
            "identification": None
            if ident is None
            else {
                "rank": {str(r): v for r, v in ident.ranks.items()},
                "tpir": ident.tpir,
                "fpir": ident.fpir,
                "mated_probes": ident.mated,
                "non_mated_probes": ident.non_mated,
            },
            "fuse_seconds": self.seconds,
        }


class TemplateSet:
    """The templates of a benchmark, grouped once and fused by any number of methods."""

    def __init__(self, meta: IJBMeta, features: np.ndarray, style: np.ndarray | None) -> None:
        if len(features) != len(meta.templates):
            raise MetaFileError(
                f"the features have {len(features)} rows but "
                f"{meta.prefix}_face_tid_mid.txt lists {len(meta.templates)} images"
            )
        if style is not None and len(style) != len(features):
            raise MetaFileError(
                f"the style statistics have {len(style)} rows, the features {len(features)}"
            )
        self.ids, groups = template_groups(meta.templates)
        self.templates = [
            Template(
                features=torch.from_numpy(features[rows]),
                media=torch.from_numpy(meta.medias[rows]),
                style=None if style is None else torch.from_numpy(style[rows]),
            )
            for rows in groups
        ]
        self.has_style = style is not None

    def rows(self, template_ids: np.ndarray, what: str) -> np.ndarray:
        """Row of each template id in ``fuse``'s output; MetaFileError naming ``what`` if a
        template has no image."""
        rows = np.searchsorted(self.ids, template_ids).clip(max=len(self.ids) - 1)
        missing = self.ids[rows] != template_ids
        if missing.any():
            raise MetaFileError(
                f"{what} uses template {template_ids[missing][0]}, which has no image in "
                "face_tid_mid.txt"
            )
        return rows

    def fuse(self, fuser: Fuser) -> np.ndarray:
        """(templates, D) unit descriptors, rows in ascending template id."""
        with torch.no_grad():
            fused = torch.stack([fuser(t) for t in self.templates])
        return torch.nn.functional.normalize(fused.double(), dim=1).numpy()


def pair_scores(
    descriptors: np.ndarray, first: np.ndarray, second: np.ndarray, block: int = 1024
) -> np.ndarray:
    """Cosine of rows ``first[i]`` and ``second[i]`` of unit ``descriptors``.

    Matrix products of ``block`` template rows against all templates, then gathers: far faster
    than gathering two vectors per pair, and IJB-C's 23k x 23k matrix never exists at once.
    """
    scores = np.empty(len(first))
    for start in range(0, len(descriptors), block):
        in_block = (first >= start) & (first < start + block)
        if in_block.any():
            similarity = descriptors[start : start + block] @ descriptors.T
            scores[in_block] = similarity[first[in_block] - start, second[in_block]]
    return scores


def evaluate(
    meta: IJBMeta,
    features: np.ndarray,
    style: np.ndarray | None,
    methods: Sequence[str],
    checkpoints: Mapping[str, str] | None = None,
) -> list[MethodResult]:
    """Fuse with each method and compute 1:1 TAR@FAR (``metrics.FARS``) and, when the meta has
    1:N lists, rank-1/rank-5 and TPIR at FPIR 1% (galleries pooled, as insightface does).
    ``checkpoints`` maps each learned method to its checkpoint.

    Raises:
        KeyError: an unknown method.
        ValueError: a method needs a checkpoint or style statistics that are not there, or a
            checkpoint cannot be loaded (``CheckpointError``).
        MetaFileError: the meta files and features disagree.
    """
    checkpoints = dict(checkpoints or {})
    chosen = [get_method(name) for name in methods]
    templates = TemplateSet(meta, features, style)
    for method in chosen:
        if method.needs_checkpoint and method.name not in checkpoints:
            raise ValueError(f"method {method.name!r} needs a checkpoint (--checkpoint)")
        if method.needs_style and not templates.has_style:
            raise ValueError(f"method {method.name!r} needs style statistics (*_style.npy)")
    pair_file = f"{meta.prefix}_template_pair_label.txt"
    first = templates.rows(meta.pairs[:, 0], pair_file)
    second = templates.rows(meta.pairs[:, 1], pair_file)
    labels = meta.pairs[:, 2]
    if meta.probes is not None:
        gallery = np.concatenate(list(meta.galleries.values()))
        gallery_rows = templates.rows(gallery[:, 0], "the 1:N gallery")
        probe_rows = templates.rows(meta.probes[:, 0], "the 1:N probe list")

    # Every checkpoint is loaded before any fusing, so a bad one fails at once.
    fusers = [method.build(checkpoints.get(method.name)) for method in chosen]
    results = []
    for method, fuser in zip(chosen, fusers, strict=True):
        start = time.perf_counter()
        fused = templates.fuse(fuser)
        seconds = time.perf_counter() - start
        scores = pair_scores(fused, first, second)
        fpr, tpr = metrics.roc(labels, scores)
        ident = None
        if meta.probes is not None:
            ident = metrics.identification(
                fused[probe_rows], meta.probes[:, 1], fused[gallery_rows], gallery[:, 1]
            )
        results.append(
            MethodResult(
                method=method.name,
                tar=metrics.tar_from_roc(fpr, tpr),
                identification=ident,
                fpr=fpr,
                tpr=tpr,
                seconds=seconds,
            )
        )
    return results


def format_table(results: Sequence[MethodResult]) -> str:
    """A fixed-width table, numbers in percent."""
    fars = list(results[0].tar)
    header = ["method"] + [f"TAR@{far:g}" for far in fars]
    with_ident = results[0].identification is not None
    if with_ident:
        ident = results[0].identification
        header += [f"rank-{r}" for r in ident.ranks]
        if ident.tpir is not None:
            header.append(f"TPIR@{ident.fpir:g}")
    rows = []
    for r in results:
        row = [r.method] + [f"{100 * r.tar[far]:.2f}" for far in fars]
        if with_ident:
            row += [f"{100 * v:.2f}" for v in r.identification.ranks.values()]
            if r.identification.tpir is not None:
                row.append(f"{100 * r.identification.tpir:.2f}")
        rows.append(row)
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in [header, *rows]
    )


def write_report(results: Sequence[MethodResult], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``results.json`` and ``roc.png`` (TPR against log FPR) into ``out_dir``."""
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps([r.to_json() for r in results], indent=2) + "\n")

    # A bare Figure renders with Agg and leaves pyplot's global backend alone.
    figure = Figure(figsize=(6, 4.5))
    axes = figure.subplots()
    for r in results:
        positive = r.fpr > 0
        axes.plot(r.fpr[positive], r.tpr[positive], lw=1.2, label=r.method)
    axes.set_xscale("log")
    axes.set_xlim(min(results[0].tar) / 10, 1)
    axes.set_xlabel("false accept rate")
    axes.set_ylabel("true accept rate")
    axes.set_title("1:1 verification ROC")
    axes.grid(linestyle="--", linewidth=0.5)
    axes.legend(loc="lower right")
    png_path = out_dir / "roc.png"
    figure.savefig(png_path, dpi=120, bbox_inches="tight")
    return json_path, png_path

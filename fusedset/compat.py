"""The released modules' call conventions, on fusedset's fast modules.

Code written against the authors' repositories (mk-minchul/caface, ligaripash/FaceCoresetNet)
builds and calls ``StyleBasedAggregator`` and ``TemplateAggregateModel``; these classes have
those names, state dicts, attributes and calls, and run ``fusedset.nn.CAFace`` and
``fusedset.nn.FaceCoresetNet`` underneath (the same kernels, the same folded attention), so
that such code changes the line that builds the module and nothing else:

    aggregator = StyleBasedAggregator.from_official("caface.ckpt")
    compressed = aggregator.compress_intermediate([block3_stats, block5_stats])  # per batch
    aggregator.memory_count = 0  # a new probe
    for features, compressed_split in splits:  # at most max_element images each
        result = aggregator(features, compressed_split)
    fused = result["aggregated"]

    aggregate_model = TemplateAggregateModel.from_official("facecoresetnet.ckpt")
    descriptor, norm, fps_sample = aggregate_model(embeddings, norms, only_FPS=False)

Both take ``from_official`` sources as ``fusedset.nn`` does (a bare state dict or a Lightning
checkpoint with its ``aggregator.`` / ``aggregate_model.`` prefix), and their ``state_dict()``
keys are the released ones, so a checkpoint saved from either side loads in the other. Where the
released code would stop at an assert, these raise a ValueError or TypeError naming the argument.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping, Sequence
from typing import Any

import torch

from fusedset.nn.caface import CAFace, _describe
from fusedset.nn.checkpoints import CheckpointSource
from fusedset.nn.facecoresetnet import FaceCoresetNet, _select_core
from fusedset.nn.folded_attention import DEFAULT_CHUNK_SIZE
from fusedset.ops._checks import all_finite
from fusedset.reference.caface import COUNT_EPS, CAFaceConfig, ClusterSums, cluster_means

__all__ = ["ReleasedResult", "StyleBasedAggregator", "TemplateAggregateModel"]

_AGGREGATION_KEYS = ("aggregated", "confidence_weight", "conf", "weights")


def _running_mean(
    mean: torch.Tensor, count: torch.Tensor, chunk_mean: torch.Tensor, chunk_count: torch.Tensor
) -> torch.Tensor:
    """The released memory update: the means of two parts weighted by their assignment counts
    (the released code divides by at least COUNT_EPS)."""
    return (count * mean + chunk_count * chunk_mean) / (count + chunk_count).clamp_min(COUNT_EPS)


class ReleasedResult(MutableMapping[str, Any]):
    """The released result dict, some of whose entries are computed together, by ``compute``,
    when one of them is first read: a validation loop reads only its last split's result, so
    the other splits never run what only the result needs (the aggregation network, the
    assignment map), as a ``fusedset.nn`` stream aggregates once at the end. A deferred entry
    comes from the call's tensors and the module's parameters as they are when it is read."""

    def __init__(
        self,
        values: dict[str, Any],
        deferred: tuple[str, ...],
        compute: Callable[[], dict[str, Any]],
        *,
        now: bool,
    ) -> None:
        self._values = values
        self._deferred = deferred
        self._compute: Callable[[], dict[str, Any]] | None = compute
        if now:
            self._resolve()

    def _resolve(self) -> None:
        if self._compute is not None:
            compute, self._compute = self._compute, None
            self._values.update(compute())

    def _pending(self) -> list[str]:
        return [] if self._compute is None else list(self._deferred)

    def __getitem__(self, key: str) -> Any:
        if key in self._pending():
            self._resolve()
        return self._values[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._resolve()
        self._values[key] = value

    def __delitem__(self, key: str) -> None:
        self._resolve()
        del self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter([*self._values, *self._pending()])

    def __len__(self) -> int:
        return len(self._values) + len(self._pending())

    def __repr__(self) -> str:
        return repr(dict(self))


class StyleBasedAggregator(CAFace):
    """CAFace with the released ``StyleBasedAggregator`` interface.

    ``compress_intermediate`` turns an image batch's style statistics into the compact style
    (the Style Input Maker); ``forward(folded_features, intermediate)`` fuses a set of raw
    features with their compact styles and returns the released result dict.

    Memory, as released: ``memory_count = 0`` starts a new probe; while ``use_memory`` is on and
    ``memory_count > -1``, every call adds its images as one more chunk (each chunk clustered on
    its own) and the result is the fusion of every chunk so far, in the released memory mode's
    normalization. ``memory_count = -1`` (``reset_memory()``) makes every call independent.
    ``memory`` is the released dict: ``attn`` (B, M, 1), each center's assignment summed over
    the chunks so far, and ``cluster_features``, ``cluster_style``, their F' and S'; in train
    mode it keeps their graph, so that a loss on the last chunk's result reaches every chunk, in
    eval mode it is detached.

    The released constructor's arguments map onto ``config``: ``intermediate_indim`` is
    ``style_channels`` (384), ``style_dim`` and ``normemb_dim`` are ``style_dim`` and
    ``norm_dim`` (64 each), and the fusion net's ``depths``, ``num_group_tokens``, ``num_heads``
    and ``confidence_dim`` are ``depth``, ``num_centers``, ``num_heads`` and ``confidence_dim``.
    """

    def __init__(self, config: CAFaceConfig | None = None, use_memory: bool = False) -> None:
        super().__init__(config)
        self.use_memory = use_memory
        self.reset_memory()

    @classmethod
    def from_official(  # type: ignore[override]
        cls, source: CheckpointSource, num_heads: int = 8, use_memory: bool = True
    ) -> StyleBasedAggregator:
        """``fusedset.nn.CAFace.from_official``, with the memory on by default: the released
        checkpoints are evaluated (and trained) fusing splits of a probe in memory mode."""
        model = super().from_official(source, num_heads)
        model.use_memory = use_memory
        return model

    def reset_memory(self) -> None:
        """Memory tracking off and empty, as a freshly built released aggregator."""
        self.memory_count = -1
        self.memory: dict[str, torch.Tensor] | None = None

    def compress_intermediate(self, intermediate: Sequence[torch.Tensor]) -> torch.Tensor:
        """Style statistics of an image batch -> the compact style (..., style_dim), the
        ``intermediate`` that ``forward`` takes. ``intermediate`` is the released list of
        per-block statistics [(I, 128, 2), (I, 256, 2)] (spatial mean and std per channel,
        ``fusedset.ops.style_pool`` of each block's map); any split of the style channels in
        their order works, with any leading dimensions."""
        name = "StyleBasedAggregator.compress_intermediate"
        if isinstance(intermediate, torch.Tensor) or not isinstance(intermediate, Sequence):
            raise TypeError(
                f"{name}: intermediate must be a list of style statistics tensors (I, C_i, 2), "
                f"one per backbone block, got {_describe(intermediate)}"
            )
        if not intermediate:
            raise ValueError(f"{name}: intermediate is empty; it needs the blocks' statistics")
        leading = None
        for index, stats in enumerate(intermediate):
            if not isinstance(stats, torch.Tensor) or stats.dim() < 2 or stats.shape[-1] != 2:
                hint = ""
                if isinstance(stats, torch.Tensor) and stats.dim() == 4:
                    hint = " (a feature map? its statistics are fusedset.ops.style_pool(map))"
                raise ValueError(
                    f"{name}: intermediate[{index}] must be style statistics (I, C, 2), "
                    f"[mean, std] per channel, got {_describe(stats)}{hint}"
                )
            if not stats.is_floating_point():
                raise TypeError(
                    f"{name}: intermediate[{index}] must be floating point, got {stats.dtype}"
                )
            if leading is None:
                leading = stats.shape[:-2]
            elif stats.shape[:-2] != leading:
                raise ValueError(
                    f"{name}: intermediate[{index}] has shape {tuple(stats.shape)}, but "
                    f"intermediate[0] holds {tuple(leading)} images: every block's statistics "
                    "must cover the same images"
                )
        channels = sum(stats.shape[-2] for stats in intermediate)
        if channels != self.config.style_channels:
            raise ValueError(
                f"{name}: intermediate must hold {self.config.style_channels} style channels in "
                f"all, got {channels} ({' + '.join(str(s.shape[-2]) for s in intermediate)})"
            )
        return self.style_embedding(torch.cat(list(intermediate), dim=-2))

    def forward(  # type: ignore[override]
        self,
        folded_features: torch.Tensor,
        intermediate: torch.Tensor,
        return_attn: bool = True,
    ) -> ReleasedResult:
        """Raw features (B, N, C) and their compact styles (B, N, style_dim) -> the released
        result dict: ``aggregated`` (B, C); ``cluster_feature`` and ``mu`` (B, M, C);
        ``cluster_style`` (B, M, D); ``group_token`` (B, M, D), the centers;
        ``confidence_weight`` (B, M, confidence_dim), the softmax over centers; ``conf``, that
        times each cluster feature's norm, and ``weights``, ``conf`` normalized over the
        centers; ``attn_dict_list``, whose first dict holds this call's assignment map under
        ``attn`` (and ``hard``, ``soft``), shape (B, 1, M, N), when ``return_attn`` (the map is
        formed only then). In eval mode without autograd, the aggregation and the map run when
        first read (``ReleasedResult``)."""
        self._check_call(folded_features, intermediate, return_attn)
        if self.memory_count < 1:
            self.memory = None
        feature_num, token_num, den, styles = self.embedded_cluster_sums(
            folded_features, intermediate
        )
        cluster_feature, cluster_style = cluster_means(ClusterSums(feature_num, token_num, den))
        count = den[..., None]
        if self.memory is not None:
            seen = self.memory["attn"]
            cluster_feature = _running_mean(
                self.memory["cluster_features"], seen, cluster_feature, count
            )
            cluster_style = _running_mean(self.memory["cluster_style"], seen, cluster_style, count)
            count = seen + count
        if self.use_memory and self.memory_count > -1:
            self.memory_count += 1
            memory = {
                "attn": count,
                "cluster_features": cluster_feature,
                "cluster_style": cluster_style,
            }
            if not self.training:
                memory = {key: value.detach() for key, value in memory.items()}
            self.memory = memory
        # Training reads every result (and the parameters change between steps): no deferral.
        now = self.training or torch.is_grad_enabled()

        def aggregation() -> dict[str, torch.Tensor]:
            aggregated, confidence = self.aggregate(cluster_feature, cluster_style)
            conf = confidence * torch.linalg.vector_norm(cluster_feature, dim=-1, keepdim=True)
            return {
                "aggregated": aggregated,
                "confidence_weight": confidence,
                "conf": conf,
                "weights": conf / conf.sum(dim=1, keepdim=True),
            }

        def assignment() -> dict[str, torch.Tensor]:
            attn = self.assignment_map(styles)[:, None]  # one head, as released
            return {"attn": attn, "hard": attn, "soft": attn}

        attn_dict = {}
        if return_attn:
            attn_dict = ReleasedResult({}, ("attn", "hard", "soft"), assignment, now=now)
        values = {
            "cluster_feature": cluster_feature,
            "mu": cluster_feature,
            "cluster_style": cluster_style,
            "group_token": self.centers.expand(folded_features.shape[0], -1, -1),
            "attn_dict_list": [attn_dict],
        }
        return ReleasedResult(values, _AGGREGATION_KEYS, aggregation, now=now)

    def _check_call(
        self, folded_features: torch.Tensor, intermediate: torch.Tensor, return_attn: bool
    ) -> None:
        name = "StyleBasedAggregator"
        if not isinstance(folded_features, torch.Tensor) or folded_features.dim() != 3:
            raise ValueError(
                f"{name}: folded_features must be a (B, N, C) tensor of raw features, got "
                f"{_describe(folded_features)}"
            )
        if not folded_features.is_floating_point():
            raise TypeError(
                f"{name}: folded_features must be floating point, got {folded_features.dtype}"
            )
        b, n, c = folded_features.shape
        if b == 0 or n == 0:
            raise ValueError(
                f"{name}: folded_features holds an empty set (shape {(b, n, c)}); every probe "
                "needs an image"
            )
        if self.config.confidence_dim not in (1, c):
            raise ValueError(
                f"{name}: folded_features must have {self.config.confidence_dim} channels to "
                f"match the confidence width of this model, got {c}"
            )
        expected = (b, n, self.config.style_dim)
        if not isinstance(intermediate, torch.Tensor) or tuple(intermediate.shape) != expected:
            hint = ""
            if isinstance(intermediate, torch.Tensor) and intermediate.shape[-1:] == (2,):
                hint = " (style statistics? compact them with compress_intermediate first)"
            raise ValueError(
                f"{name}: intermediate must be the compact styles of shape {expected}, got "
                f"{_describe(intermediate)}{hint}"
            )
        if not isinstance(return_attn, bool):
            raise TypeError(f"{name}: return_attn must be a bool, got {_describe(return_attn)}")
        for arg, value in (("folded_features", folded_features), ("intermediate", intermediate)):
            if not all_finite(value):
                raise ValueError(f"{name}: {arg} holds NaN or Inf")
        if self.memory is not None and self.memory_count >= 1:
            held = self.memory["attn"].shape[0]
            if held != b:
                raise ValueError(
                    f"{name}: folded_features holds {b} probes, but the memory "
                    f"(memory_count = {self.memory_count}) holds {held}; set memory_count = 0 "
                    "to start new probes"
                )


class TemplateAggregateModel(FaceCoresetNet):
    """FaceCoresetNet with the released ``TemplateAggregateModel`` interface:
    ``TemplateAggregateModel(embedding_size, coreset_size)`` and
    ``model(template_features, template_norms, only_FPS=False)`` -> (descriptor, norm,
    FPS_sample). ``gamma`` is the learned selection exponent, a parameter as released; train
    mode selects with Gumbel straight-through picks, eval mode with the argmax."""

    def __init__(
        self,
        embedding_size: int = 512,
        coreset_size: int = 3,
        *,
        num_heads: int = 8,
        dropout: float = 0.1,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        super().__init__(
            embedding_size,
            num_heads=num_heads,
            coreset_size=coreset_size,
            dropout=dropout,
            chunk_size=chunk_size,
        )

    def forward(  # type: ignore[override]
        self,
        template_features: torch.Tensor,
        template_norms: torch.Tensor,
        only_FPS: bool = False,
        *,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unit directions (B, N, C) and norms (B, N, 1) -> the L2-normalized descriptor (B, C),
        its norm (B, 1) and the core template FPS_sample (B, min(K, N), C), the selected rows
        direction times norm. ``only_FPS``: the descriptor is the core template's mean (the
        paper's "selection only"), and the decoder does not run. ``noise`` (K, B, N): Gumbel
        samples for the train-mode selection (drawn when omitted), an addition to the released
        call for reproducible training steps."""
        self._check_template(template_features, template_norms, only_FPS)
        if not only_FPS:
            result = self.aggregate(template_features, template_norms, noise=noise)
            return result.descriptor, result.norm, result.core_template
        features = self._compute_dtype(template_features)
        norms = self._compute_dtype(template_norms)
        with torch.autocast(features.device.type, enabled=False):
            core = _select_core(
                features,
                self.coreset_size,
                self.gamma,
                training=self.training,
                noise=noise,
                row_scale=norms.squeeze(-1),
            )
            mean = core.mean(dim=1)
            norm = torch.linalg.vector_norm(mean, dim=-1, keepdim=True)
            return mean / norm, norm, core

    def _check_template(
        self, template_features: torch.Tensor, template_norms: torch.Tensor, only_fps: bool
    ) -> None:
        self._check_set("template_features", template_features, None)
        expected = (*template_features.shape[:2], 1)
        if not isinstance(template_norms, torch.Tensor) or template_norms.shape != expected:
            raise ValueError(
                f"template_norms must have shape (B, N, 1) = {expected} to match "
                f"template_features, got {_describe(template_norms)}"
            )
        if not template_norms.is_floating_point():
            raise TypeError(f"template_norms must be floating point, got {template_norms.dtype}")
        if not isinstance(only_fps, bool):
            raise TypeError(f"only_FPS must be a bool, got {_describe(only_fps)}")

"""Eager reference of the released CAFace aggregator (mk-minchul/caface, `StyleBasedAggregator`).

Parameter names are the released keys (`style_maker.*`, `norm_emb.*`, `fusion_net.*`), so a
released state dict loads with strict=True. The forward pass is cut where fused kernels take over;
a fast module overrides these methods and keeps the rest:

    style_embedding        style stats (B, N, C, 2) -> SIM output (B, N, 64)
    norm_embedding         feature norms (B, N, 1) -> (B, N, 64)
    cluster_tokens         CN transformer over tokens + centers -> tokens (B, N, D)
    assign_and_accumulate  LN'd tokens, q/k projections, softmax over M, sums A V, A x, A 1
    aggregate              AGN: (centers, S') -> confidence P (softmax over M) and sum_M P F'

Chunked (memory) mode keeps a `ClusterSums` state that chunks add into (`merge_chunk`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fusedset.reference._sinusoid import sinusoidal_encoding

Normalization = Literal["official", "paper"]

FEATURE_EPS = 1e-5  # values are f / (||f|| + 1e-5)
NORM_CLIP = 3  # standardized norms are clipped to [-3, 3] ...
NORM_LEVELS_PER_UNIT = 10  # ... and quantized to tenths: 61 rows in the norm embedding table
COUNT_EPS = 1e-6  # the released memory update divides by max(sum_t r_t, 1e-6)


@dataclass(frozen=True)
class CAFaceConfig:
    """Defaults are the paper's model (791,328 numbers in its state dict)."""

    depth: int = 2
    num_centers: int = 4
    confidence_dim: int = 512
    num_heads: int = 8
    style_channels: int = 384
    style_dim: int = 64
    norm_dim: int = 64
    mlp_ratio: int = 4

    @property
    def dim(self) -> int:
        """Width of the CN tokens: style embedding and norm embedding concatenated."""
        return self.style_dim + self.norm_dim

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, torch.Tensor], num_heads: int = 8
    ) -> CAFaceConfig:
        """Everything but the number of attention heads (not visible in any shape; the released
        configurations all use 8) follows from the keys and shapes of a released state dict."""

        def shape(key: str, rank: int = 2) -> tuple[int, ...]:
            if key not in state_dict:
                raise ValueError(
                    f"cannot infer the CAFace configuration: the state dict has no key {key!r}"
                )
            value = state_dict[key]
            if not isinstance(value, torch.Tensor) or value.dim() != rank:
                tensor = isinstance(value, torch.Tensor)
                got = tuple(value.shape) if tensor else type(value).__name__
                raise ValueError(
                    f"cannot infer the CAFace configuration: {key!r} must have {rank} "
                    f"dimensions, got {got}"
                )
            return tuple(value.shape)

        block_key = re.compile(r"fusion_net\.clustering_layer\.blocks\.(\d+)\.")
        depth = 1 + max((int(m[1]) for k in state_dict if (m := block_key.match(k))), default=-1)
        _, num_centers, dim = shape("fusion_net.clustering_layer.group_token", 3)
        style_dim, style_channels = shape("style_maker.linear.weight")
        hidden = shape("fusion_net.clustering_layer.blocks.0.mlp.fc1.weight")[0]
        return cls(
            depth=depth,
            num_centers=num_centers,
            confidence_dim=shape(f"fusion_net.conf_mlp.{depth}.fc2.weight")[0],
            num_heads=num_heads,
            style_channels=style_channels,
            style_dim=style_dim,
            norm_dim=dim - style_dim,
            mlp_ratio=hidden // dim,
        )


class ClusterSums(NamedTuple):
    """Per-center sums over images i: the state a chunk contributes, and the memory state."""

    feature: torch.Tensor  # (B, M, C): sum_i A_ji v_i, v the L2-normalized features
    style: torch.Tensor  # (B, M, D): sum_i A_ji x_i, x the LayerNorm'd CN tokens
    count: torch.Tensor  # (B, M): sum_i A_ji


class CAFaceOutput(NamedTuple):
    aggregated: torch.Tensor  # (B, C)
    cluster_feature: torch.Tensor  # (B, M, C): F'
    cluster_style: torch.Tensor  # (B, M, D): S'
    confidence_weight: torch.Tensor  # (B, M, confidence_dim): P
    assignment: torch.Tensor  # (B, M, N): A
    style_embedding: torch.Tensor  # (B, N, style_dim)


class CAFaceChunkOutput(NamedTuple):
    chunk_aggregated: list[torch.Tensor]  # (B, C) after each chunk
    cluster_feature: torch.Tensor  # (B, M, C): F' after the last chunk
    cluster_style: torch.Tensor  # (B, M, D): S' after the last chunk
    state: ClusterSums  # the memory after the last chunk


def cluster_assignment(queries: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """queries (B|1, M, D), keys (B, N, D) -> A (B, M, N): softmax over the M centers, so each
    image spreads one unit of weight over the centers."""
    return torch.softmax(queries @ keys.transpose(-1, -2) * scale, dim=-2)


def cluster_sums(
    assignment: torch.Tensor, values: torch.Tensor, styles: torch.Tensor
) -> ClusterSums:
    """A (B, M, N), values (B, N, C), styles (B, N, D) -> A V, A styles, A 1."""
    return ClusterSums(assignment @ values, assignment @ styles, assignment.sum(dim=-1))


def cluster_means(sums: ClusterSums) -> tuple[torch.Tensor, torch.Tensor]:
    """One call: F' = A V / max(r, 1), S' = A x / max(r, 1). The released clip is detached, so
    gradients treat the divisor as a constant."""
    divisor = sums.count.clamp_min(1).detach()[..., None]
    return sums.feature / divisor, sums.style / divisor


def merge_chunk(
    state: ClusterSums | None, chunk: ClusterSums, normalization: Normalization = "official"
) -> ClusterSums:
    """Adds one chunk's sums to the memory. "official" is the released update, which weights a
    chunk's sums by min(r_t, 1) (F' = sum_t min(r_t, 1) A_t V_t / sum_t r_t); "paper" is Eq. 7
    (weight 1). Both are plain sums over chunks: any order, any split across processes."""
    if normalization == "official":
        # r / max(r, 1) with the clip detached: the value min(r, 1), and the gradient of the
        # released update, which multiplies r_t by the chunk mean A_t V_t / max(r_t, 1).detach().
        weight = (chunk.count / chunk.count.clamp_min(1).detach())[..., None]
        chunk = ClusterSums(weight * chunk.feature, weight * chunk.style, chunk.count)
    elif normalization != "paper":
        raise ValueError(f"normalization must be 'official' or 'paper', got {normalization!r}")
    if state is None:
        return chunk
    return ClusterSums(*(total + part for total, part in zip(state, chunk, strict=True)))


def memory_means(state: ClusterSums) -> tuple[torch.Tensor, torch.Tensor]:
    """F' and S' of a memory state."""
    count = state.count.clamp_min(COUNT_EPS)[..., None]
    return state.feature / count, state.style / count


class Mlp(nn.Module):
    """Linear, GELU, Linear: the CN block MLP, the mixer MLPs and the AGN head."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class StyleInputMaker(nn.Module):
    """SIM: z_c = w_c0 mean_c + w_c1 std_c, PReLU, Linear, BatchNorm1d."""

    def __init__(self, channels: int, out_dim: int) -> None:
        super().__init__()
        # The released layer holds its (C, 2) weight in a ParameterList and also under the alias
        # `cfc`; its checkpoints carry both keys, so both stay for a strict load.
        self.cfcs = nn.ParameterList([nn.Parameter(torch.zeros(channels, 2))])
        self.cfc = self.cfcs[0]
        self.relu = nn.PReLU()
        self.linear = nn.Linear(channels, out_dim)
        self.bn = nn.BatchNorm1d(out_dim)

    def forward(self, style_stats: torch.Tensor) -> torch.Tensor:
        """(..., C, 2) [mean, std] -> (..., out_dim)."""
        return self.project((style_stats * self.cfc).sum(dim=-1))

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """The per-channel weighted statistics z (..., C) -> (..., out_dim)."""
        z = self.linear(self.relu(z))
        return self.bn(z.reshape(-1, z.shape[-1])).reshape(z.shape)


class NormEmbedding(nn.Module):
    """Feature norm -> a row of a sinusoidal table, times a learned scale."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm_bn = nn.BatchNorm1d(1, affine=False)
        levels = torch.arange(2 * NORM_CLIP * NORM_LEVELS_PER_UNIT + 1)
        # The released table is a persistent buffer: a loaded checkpoint brings its own copy.
        self.register_buffer("pe", sinusoidal_encoding(levels, dim))
        self.scale = nn.Parameter(torch.tensor(0.1))

    def forward(self, norms: torch.Tensor) -> torch.Tensor:
        """(B, N, 1) -> (B, N, dim)."""
        standardized = self.norm_bn(norms.transpose(-1, -2)).transpose(-1, -2)
        # `.long()` truncates toward zero, as released: levels -0.9..0.9 all land on row 30.
        level = (standardized.clamp(-NORM_CLIP, NORM_CLIP) * NORM_LEVELS_PER_UNIT).long()
        return self.scale * self.pe[level.squeeze(-1) + NORM_CLIP * NORM_LEVELS_PER_UNIT]


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        head_dim = dim // self.num_heads
        qkv = self.qkv(x).view(batch, length, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attention = torch.softmax(q @ k.transpose(-1, -2) * head_dim**-0.5, dim=-1)
        return self.proj((attention @ v).transpose(1, 2).reshape(batch, length, dim))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block; the released stochastic depth is the identity in eval mode."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * mlp_ratio, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class AssignProjections(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)


class ClusteringBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm_tokens = nn.LayerNorm(dim)
        self.norm_x = nn.LayerNorm(dim)
        self.assign = AssignProjections(dim)


class ClusteringLayer(nn.Module):
    """CN parameters: the M learned centers, the transformer blocks, the assignment."""

    def __init__(self, config: CAFaceConfig) -> None:
        super().__init__()
        centers = nn.init.orthogonal_(torch.empty(config.num_centers, config.dim))
        self.group_token = nn.Parameter(F.normalize(centers, dim=-1)[None])
        self.blocks = nn.ModuleList(
            TransformerBlock(config.dim, config.num_heads, config.mlp_ratio)
            for _ in range(config.depth)
        )
        self.cluster_block = ClusteringBlock(config.dim)


class MixerBlock(nn.Module):
    """MLP-Mixer block over the M centers, with a learned gate on the first skip connection."""

    def __init__(self, num_tokens: int, channels: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(channels)
        self.tokens_mlp_block = Mlp(num_tokens, 2 * num_tokens, num_tokens)
        self.channels_mlp_block = Mlp(channels, channels // 2, channels)
        self.skip_connect_gate = nn.Parameter(torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The released block applies its one LayerNorm before both the token and channel mixing.
        mixed = self.tokens_mlp_block(self.ln(x).transpose(1, 2)).transpose(1, 2)
        x = self.skip_connect_gate * x + mixed
        return x + self.channels_mlp_block(self.ln(x))


class ClusterAggregateNet(nn.Module):
    """CN (`clustering_layer`) and AGN (`conf_mlp`): the released `fusion_net`."""

    def __init__(self, config: CAFaceConfig) -> None:
        super().__init__()
        self.clustering_layer = ClusteringLayer(config)
        width = 2 * config.dim
        self.conf_mlp = nn.Sequential(
            *(MixerBlock(config.num_centers, width) for _ in range(config.depth)),
            Mlp(width, width, config.confidence_dim),
        )


class CAFaceReference(nn.Module):
    """The released StyleBasedAggregator. Eval mode is exact. Train mode runs the BatchNorms on
    batch statistics, as released, but leaves out the released stochastic depth (drop_path up to
    0.1 in the CN blocks), so that a training step is deterministic and comparable."""

    def __init__(self, config: CAFaceConfig | None = None) -> None:
        super().__init__()
        self.config = config or CAFaceConfig()
        self.style_maker = StyleInputMaker(self.config.style_channels, self.config.style_dim)
        self.fusion_net = ClusterAggregateNet(self.config)
        self.norm_emb = NormEmbedding(self.config.norm_dim)

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, torch.Tensor], num_heads: int = 8
    ) -> CAFaceReference:
        """Released aggregator keys, configuration inferred, strict load, eval mode."""
        model = cls(CAFaceConfig.from_state_dict(state_dict, num_heads))
        model.load_state_dict(state_dict)
        return model.eval()

    @property
    def centers(self) -> torch.Tensor:
        """(1, M, D): the learned centers, the assignment queries and the AGN's first input."""
        return self.fusion_net.clustering_layer.group_token

    def style_embedding(self, style_stats: torch.Tensor) -> torch.Tensor:
        """(B, N, C, 2) -> (B, N, style_dim)."""
        return self.style_maker(style_stats)

    def norm_embedding(self, norms: torch.Tensor) -> torch.Tensor:
        """(B, N, 1) -> (B, N, norm_dim)."""
        return self.norm_emb(norms)

    def tokens(self, norms: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        """Feature norms (B, N, 1), the quality signal, and style embedding -> CN input tokens
        (B, N, D)."""
        return torch.cat([style, self.norm_embedding(norms)], dim=-1)

    def encode(
        self, features: torch.Tensor, style: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw features (B, N, C) and style embedding -> values (B, N, C), tokens (B, N, D). The
        norm enters only through the tokens: the values are unit directions."""
        norms = torch.linalg.vector_norm(features, dim=-1, keepdim=True)
        return features / (norms + FEATURE_EPS), self.tokens(norms, style)

    def cluster_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The CN transformer: (B, N, D) -> (B, N, D). The centers attend with the tokens, but
        their updated copies are dropped: the released CN keeps the learned centers as the
        assignment queries so that a center's meaning does not depend on the set."""
        x = torch.cat([tokens, self.centers.expand(tokens.shape[0], -1, -1)], dim=1)
        for block in self.fusion_net.clustering_layer.blocks:
            x = block(x)
        return x[:, : tokens.shape[1]]

    def assign_and_accumulate(
        self, tokens: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, ClusterSums]:
        """CN tokens (B, N, D), values (B, N, C) -> A (B, M, N) and its sums. Keys are the
        k-projected LayerNorm'd tokens; the accumulated styles are the LayerNorm'd tokens
        themselves; the logits have one head and scale 1/sqrt(D)."""
        block = self.fusion_net.clustering_layer.cluster_block
        styles = block.norm_x(tokens)
        queries = block.assign.q_proj(block.norm_tokens(self.centers))
        keys = block.assign.k_proj(styles)
        assignment = cluster_assignment(queries, keys, self.config.dim**-0.5)
        return assignment, cluster_sums(assignment, values, styles)

    def aggregate(
        self, cluster_feature: torch.Tensor, cluster_style: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """AGN: F' (B, M, C), S' (B, M, D) -> aggregated (B, C), P (B, M, confidence_dim)."""
        centers = self.centers.expand(cluster_style.shape[0], -1, -1)
        logits = self.fusion_net.conf_mlp(torch.cat([centers, cluster_style], dim=-1))
        confidence = torch.softmax(logits, dim=-2)
        return (confidence * cluster_feature).sum(dim=-2), confidence

    def cluster_chunk(
        self, features: torch.Tensor, style: torch.Tensor
    ) -> tuple[torch.Tensor, ClusterSums]:
        """Everything before the normalization of the sums, for one call or one chunk."""
        values, tokens = self.encode(features, style)
        return self.assign_and_accumulate(self.cluster_tokens(tokens), values)

    def forward(self, features: torch.Tensor, style_stats: torch.Tensor) -> CAFaceOutput:
        """The whole set in one call: features (B, N, C), style_stats (B, N, style_channels, 2)."""
        style = self.style_embedding(style_stats)
        assignment, sums = self.cluster_chunk(features, style)
        cluster_feature, cluster_style = cluster_means(sums)
        aggregated, confidence = self.aggregate(cluster_feature, cluster_style)
        return CAFaceOutput(
            aggregated, cluster_feature, cluster_style, confidence, assignment, style
        )

    def forward_chunks(
        self,
        features: torch.Tensor,
        style_stats: torch.Tensor,
        chunk_sizes: Sequence[int],
        normalization: Normalization = "official",
    ) -> CAFaceChunkOutput:
        """The released memory mode: consecutive chunks of the set (sizes summing to N), each
        clustered on its own (the CN mixes tokens only within a chunk) and added to the memory;
        the aggregate is formed after every chunk."""
        if not chunk_sizes:
            raise ValueError("chunk_sizes must name at least one chunk")
        state = None
        chunk_aggregated = []
        for chunk_features, chunk_stats in zip(
            features.split(list(chunk_sizes), dim=1),
            style_stats.split(list(chunk_sizes), dim=1),
            strict=True,
        ):
            _, sums = self.cluster_chunk(chunk_features, self.style_embedding(chunk_stats))
            state = merge_chunk(state, sums, normalization)
            cluster_feature, cluster_style = memory_means(state)
            chunk_aggregated.append(self.aggregate(cluster_feature, cluster_style)[0])
        return CAFaceChunkOutput(chunk_aggregated, cluster_feature, cluster_style, state)

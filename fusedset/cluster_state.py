"""ClusterState: CAFace's clustered features of a probe of any size, fused chunk by chunk.

Both normalizations are ratios of sums over chunks, so the state is a handful of running sums:
merging is addition, in any order, in one process or across ranks (all_reduce SUM). The sums
are kept in float64 so that the order of the additions does not show in float32 results.
"""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Integral
from typing import Literal

import torch

from fusedset.ops._checks import FLOAT_DTYPES, all_finite
from fusedset.ops.cluster_accumulate import cluster_accumulate

Normalization = Literal["paper", "official"]
_FIELDS = ("num", "clipped_num", "den", "token_num", "clipped_token_num")
_DTYPE_NAMES = {str(d).removeprefix("torch."): d for d in FLOAT_DTYPES}


class ClusterState:
    """Running sums over chunks t of one cluster assignment per probe (B probes, M centers).

    ``num = sum_t A_t V_t`` and ``den = sum_t rowsum(A_t)`` give the paper's ``num / den``
    (Eq. 7-8); ``clipped_num = sum_t min(rowsum(A_t), 1) A_t V_t`` gives the released code's
    memory mode, ``clipped_num / den``. An optional second value stream (CAFace's tokens, for
    S') is kept the same way. The first update fixes the shapes, dtype and device. A state has
    no lock: threads sharing one need their own (``CAFaceStream`` holds one).
    """

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._dtype: torch.dtype | None = None
        self.chunks = 0

    @property
    def empty(self) -> bool:
        return not self._sums

    def update(
        self,
        num: torch.Tensor,
        den: torch.Tensor,
        token_num: torch.Tensor | None = None,
        *,
        chunk: object = None,
    ) -> ClusterState:
        """Adds one chunk's ``num`` (B, M, C), ``den`` (B, M) and optionally ``token_num``
        (B, M, D), as returned by ``fusedset.ops.cluster_accumulate[_caface]``. ``chunk`` names
        the chunk in errors (default: its index in update order). On any error the state is
        unchanged."""
        label = self.chunks if chunk is None else chunk
        parts = {"num": num, "den": den, "token_num": token_num}
        for name, value in parts.items():
            if value is not None and not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"ClusterState.update: chunk {label}: {name} must be a torch.Tensor, "
                    f"got {type(value).__name__}"
                )
            if value is not None and value.dtype not in FLOAT_DTYPES:
                raise TypeError(
                    f"ClusterState.update: chunk {label}: {name} must have dtype "
                    f"{', '.join(_DTYPE_NAMES)}, got {value.dtype}"
                )
            if value is not None and value.device != num.device:
                raise ValueError(
                    f"ClusterState.update: chunk {label}: {name} is on {value.device}, num on "
                    f"{num.device}"
                )
        if num.dim() != 3 or den.shape != num.shape[:2]:
            raise ValueError(
                f"ClusterState.update: chunk {label}: num must be (B, M, C) and den (B, M), got "
                f"{tuple(num.shape)} and {tuple(den.shape)}"
            )
        if token_num is not None and (token_num.dim() != 3 or token_num.shape[:2] != den.shape):
            raise ValueError(
                f"ClusterState.update: chunk {label}: token_num must be "
                f"{(*den.shape, 'D')}, got {tuple(token_num.shape)}"
            )
        what = f"chunk {label}"
        self._check_compatible({k: v for k, v in parts.items() if v is not None}, num.dtype, what)
        for name, value in parts.items():
            if value is not None and not all_finite(value):
                raise ValueError(
                    f"ClusterState.update: {what} has NaN or Inf in {name}; the state is unchanged"
                )
        if bool((den < 0).any()):
            raise ValueError(
                f"ClusterState.update: {what} has a negative den (a sum of assignment weights, "
                "never below 0); the state is unchanged"
            )
        weight = den.clamp(max=1).unsqueeze(-1)
        new = {"num": num, "clipped_num": weight * num, "den": den}
        if token_num is not None:
            new["token_num"] = token_num
            new["clipped_token_num"] = weight * token_num
        self._add({k: v.double() for k, v in new.items()}, num.dtype, what, 1)
        return self

    def accumulate(
        self,
        keys: torch.Tensor,
        queries: torch.Tensor,
        values: torch.Tensor,
        scale: float | None = None,
        *,
        chunk: object = None,
    ) -> ClusterState:
        """Runs ``fusedset.ops.cluster_accumulate`` on one chunk of images and adds it."""
        num, den = cluster_accumulate(keys, queries, values, scale)
        return self.update(num, den, chunk=chunk)

    def merge(self, other: ClusterState) -> ClusterState:
        """Adds the chunks another state has seen (same probes, centers, dtype and device)."""
        if not isinstance(other, ClusterState):
            raise TypeError(f"ClusterState.merge: expected a ClusterState, got {type(other)}")
        if not other.empty:
            self._add(other._sums, other._dtype, "the merged state", other.chunks)
        return self

    def all_reduce(self, group: object = None) -> ClusterState:
        """Sums the states of all ranks in place (torch.distributed, SUM): every rank ends with
        the state of all chunks. Every rank must have seen at least one chunk of the same
        shapes."""
        import torch.distributed as dist

        if self.empty:
            raise RuntimeError("ClusterState.all_reduce: this rank's state has seen no chunk")
        names = sorted(self._sums)
        flat = torch.cat(
            [self._sums[k].flatten() for k in names]
            + [torch.tensor([float(self.chunks)], dtype=torch.float64, device=self.device)]
        )
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for k in names:
            size = self._sums[k].numel()
            self._sums[k] = flat[offset : offset + size].view_as(self._sums[k]).clone()
            offset += size
        self.chunks = int(flat[offset].item())
        return self

    @property
    def device(self) -> torch.device | None:
        return None if self.empty else self._sums["num"].device

    def result(self, normalization: Normalization = "paper") -> torch.Tensor:
        """The clustered features F' (B, M, C), in the dtype of the chunks."""
        return self._ratio("num", normalization)

    def token_result(self, normalization: Normalization = "paper") -> torch.Tensor:
        """The clustered tokens S' (B, M, D), for states updated with ``token_num``."""
        if not self.empty and "token_num" not in self._sums:
            raise ValueError("ClusterState.token_result: the chunks carried no token_num")
        return self._ratio("token_num", normalization)

    def state_dict(self) -> dict[str, object]:
        out: dict[str, object] = {k: v.clone() for k, v in self._sums.items()}
        out["chunks"] = self.chunks
        out["dtype"] = None if self._dtype is None else str(self._dtype).removeprefix("torch.")
        return out

    def load_state_dict(self, state: Mapping[str, object]) -> ClusterState:
        """Replaces the state with one ``state_dict()`` wrote. Everything is checked first (keys,
        shapes, float64 finite sums on one device, den >= 0, chunks, dtype): on an error the
        state is unchanged."""
        sums, dtype, chunks = _checked_state(state)
        self._sums, self._dtype, self.chunks = sums, dtype, chunks
        return self

    def _ratio(self, numerator: str, normalization: Normalization) -> torch.Tensor:
        if normalization not in ("paper", "official"):
            raise ValueError(
                f"ClusterState: normalization must be 'paper' or 'official', got {normalization!r}"
            )
        if self.empty or not bool((self._sums["den"].sum(-1) > 0).all()):
            raise RuntimeError(
                "ClusterState.result: the state has seen no image (for some probe); update it "
                "with at least one non-empty chunk first"
            )
        key = numerator if normalization == "paper" else f"clipped_{numerator}"
        return (self._sums[key] / self._sums["den"].unsqueeze(-1)).to(self._dtype)

    def _check_compatible(
        self, sums: Mapping[str, torch.Tensor], dtype: torch.dtype, what: str
    ) -> None:
        """sums (any subset of the fields, at least num and den) must match the state's."""
        if self.empty:
            return
        if dtype != self._dtype:
            raise TypeError(
                f"ClusterState: {what} has dtype {dtype}, the state holds {self._dtype}"
            )
        streams = {"token_num"} & (self._sums.keys() ^ sums.keys())
        if streams:
            verb = "adds" if "token_num" in sums else "lacks"
            raise ValueError(
                f"ClusterState: {what} {verb} the token_num stream the state "
                f"{'lacks' if verb == 'adds' else 'has'}"
            )
        for k, theirs in sums.items():
            mine = self._sums[k]
            if mine.shape != theirs.shape:
                raise ValueError(
                    f"ClusterState: {what} has {k} of shape {tuple(theirs.shape)}, the state "
                    f"{tuple(mine.shape)}"
                )
            if mine.device != theirs.device:
                raise ValueError(
                    f"ClusterState: {what} is on {theirs.device}, the state on {mine.device}"
                )

    def _add(
        self, sums: Mapping[str, torch.Tensor], dtype: torch.dtype, what: str, chunks: int
    ) -> None:
        self._check_compatible(sums, dtype, what)
        if self.empty:
            self._sums = {k: v.clone() for k, v in sums.items()}
            self._dtype = dtype
        else:
            self._sums = {k: v + sums[k] for k, v in self._sums.items()}
        self.chunks += chunks


def _checked_state(
    state: Mapping[str, object],
) -> tuple[dict[str, torch.Tensor], torch.dtype | None, int]:
    """The sums (cloned), dtype and chunk count of a ``state_dict()``, or a ValueError or
    TypeError naming the entry at fault."""
    where = "ClusterState.load_state_dict"
    if not isinstance(state, Mapping):
        raise TypeError(
            f"{where}: expected a mapping from state_dict(), got {type(state).__name__}"
        )
    fields = [k for k in _FIELDS if k in state]
    if fields not in ([], list(_FIELDS[:3]), list(_FIELDS)) or state.keys() != {
        *fields,
        *("chunks", "dtype"),
    }:
        raise ValueError(
            f"{where}: expected keys {', '.join(_FIELDS)} (the token ones optional), chunks and "
            f"dtype; got {sorted(map(str, state))}"
        )
    sums = {}
    for k in fields:
        value = state[k]
        if not isinstance(value, torch.Tensor) or value.dtype != torch.float64:
            got = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
            raise TypeError(f"{where}: {k} must be a float64 tensor, got {got}")
        sums[k] = value
    chunks = state["chunks"]
    if isinstance(chunks, bool) or not isinstance(chunks, Integral) or chunks < 0:
        raise ValueError(f"{where}: chunks must be an integer >= 0, got {chunks!r}")
    dtype = state["dtype"]
    if not sums:
        if chunks != 0 or dtype is not None:
            raise ValueError(
                f"{where}: a state without sums has chunks 0 and dtype None, got chunks "
                f"{chunks!r} and dtype {dtype!r}"
            )
        return {}, None, 0
    if str(dtype).removeprefix("torch.") not in _DTYPE_NAMES:
        raise ValueError(f"{where}: dtype must be one of {', '.join(_DTYPE_NAMES)}, got {dtype!r}")
    if chunks == 0:
        raise ValueError(f"{where}: a state with sums has seen at least one chunk, got chunks 0")
    num = sums["num"]
    if num.dim() != 3:
        raise ValueError(f"{where}: num must have shape (B, M, C), got {tuple(num.shape)}")
    b, m, c = num.shape
    tokens = sums.get("token_num")
    d = tokens.shape[2] if tokens is not None and tokens.dim() == 3 else "D"
    expected = {
        "num": (b, m, c),
        "clipped_num": (b, m, c),
        "den": (b, m),
        "token_num": (b, m, d),
        "clipped_token_num": (b, m, d),
    }
    for k, value in sums.items():
        if value.shape != expected[k]:
            raise ValueError(
                f"{where}: {k} must have shape {expected[k]} (num has {(b, m, c)}), got "
                f"{tuple(value.shape)}"
            )
        if value.device != num.device:
            raise ValueError(f"{where}: {k} is on {value.device}, num on {num.device}")
    for k, value in sums.items():
        if not all_finite(value):
            raise ValueError(f"{where}: {k} holds NaN or Inf")
    if bool((sums["den"] < 0).any()):
        raise ValueError(f"{where}: den holds a negative value (a sum of weights is >= 0)")
    return (
        {k: v.clone() for k, v in sums.items()},
        _DTYPE_NAMES[str(dtype).removeprefix("torch.")],
        int(chunks),
    )

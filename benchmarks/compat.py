"""fusedset.compat (the released call conventions) against the fusedset.nn modules it runs on,
fp32, inference: the cost of the convention itself, which should stay within 5%.

CAFace as the released IJB validation calls it: compress_intermediate per batch of 256 images
(the image pass), then memory_count = 0 and one call per split (return_attn left at the
released default), reading the last split's ``aggregated``; against nn.CAFace's stream fed the
same splits, one update each. One call: the whole template in one call, against nn.CAFace.
FaceCoresetNet: the released 3-tuple against nn.FaceCoresetNet's (descriptor, norm)."""

from __future__ import annotations

import torch

from fusedset.bench.common import Case, Measurement
from fusedset.compat import StyleBasedAggregator, TemplateAggregateModel
from fusedset.nn import CAFace, FaceCoresetNet

EXPECTED_SECONDS = {"smoke": 3, "quick": 25, "full": 90}
IMAGE_BATCH = 256  # images per compress_intermediate call
TOLERANCE = 1.05  # the compat path's time over the nn path's, at most
# (N, images per split): the released validation splits templates at 4 to 256 images.
SPLITS = {
    "smoke": [(512, 256)],
    "quick": [(4096, 256), (1024, 32)],
    "full": [(4096, 256), (16384, 256), (1024, 32), (256, 4)],
}
CALL_SIZES = {"smoke": [64], "quick": [37, 1024], "full": [37, 256, 1024]}
CORESET_SIZES = {"smoke": [256], "quick": [37, 16384], "full": [37, 16384, 100_000]}


def _caface_models() -> tuple[StyleBasedAggregator, CAFace]:
    torch.manual_seed(0)
    compat = StyleBasedAggregator(use_memory=True).eval()
    fused = CAFace(compat.config).eval()
    fused.load_state_dict(compat.state_dict())
    return compat, fused


def _coreset_models() -> tuple[TemplateAggregateModel, FaceCoresetNet]:
    torch.manual_seed(0)
    compat = TemplateAggregateModel().eval()
    fused = FaceCoresetNet().eval()
    fused.load_state_dict(compat.state_dict())
    return compat, fused


def _caface_inputs(n: int):
    """Raw features (1, N, 512) and the style statistics of backbone blocks 3 and 5, one tensor
    per block, as the backbone returns them."""

    def make(device: str) -> list[tuple]:
        return [
            (
                torch.randn(1, n, 512, device=device) * 20,
                torch.randn(n, 128, 2, device=device),
                torch.randn(n, 256, 2, device=device),
            )
            for _ in range(2)
        ]

    return make


def _coreset_inputs(n: int):
    def make(device: str) -> list[tuple]:
        directions = torch.nn.functional.normalize(torch.randn(1, n, 512, device=device), dim=-1)
        return [(directions, torch.rand(1, n, 1, device=device) * 35 + 5)]

    return make


def cases(mode: str) -> list[Case]:
    compat, fused = _caface_models()
    compat_coreset, fused_coreset = _coreset_models()

    def compress(block3: torch.Tensor, block5: torch.Tensor) -> torch.Tensor:
        batches = zip(block3.split(IMAGE_BATCH), block5.split(IMAGE_BATCH), strict=True)
        return torch.cat([compat.compress_intermediate(list(pair)) for pair in batches])[None]

    def style_stats(block3: torch.Tensor, block5: torch.Tensor) -> torch.Tensor:
        return torch.cat([block3, block5], dim=1)[None]  # as CAFace.style_stats_from_maps

    def compat_splits(split: int):
        @torch.no_grad()
        def run(features, block3, block5):
            compact = compress(block3, block5)
            compat.memory_count = 0
            for start in range(0, features.shape[1], split):
                stop = start + split
                result = compat(features[:, start:stop], compact[:, start:stop])
            return result["aggregated"]

        return run

    def nn_splits(split: int):
        @torch.no_grad()
        def run(features, block3, block5):
            stats = style_stats(block3, block5)
            stream = fused.stream(1)
            for start in range(0, features.shape[1], split):
                stream.update(features[:, start : start + split], stats[:, start : start + split])
            return stream.result()

        return run

    @torch.no_grad()
    def compat_one_call(features, block3, block5):
        compat.memory_count = 0
        return compat(features, compress(block3, block5))["aggregated"]

    @torch.no_grad()
    def nn_one_call(features, block3, block5):
        return fused(features, style_stats(block3, block5))

    @torch.no_grad()
    def compat_coreset_call(embeddings, norms):
        return compat_coreset(embeddings, norms)[0]

    @torch.no_grad()
    def nn_coreset_call(embeddings, norms):
        return fused_coreset(embeddings, norms)[0]

    def repeats(n: int) -> int:
        # Templates of a few dozen images take milliseconds: more turns for a stable median.
        return 3 if mode == "smoke" else 31 if n < 1000 else 9

    out = [
        Case(
            op="compat",
            label=_split_label(n, split),
            size=n,
            make_inputs=_caface_inputs(n),
            impls={"compat": compat_splits(split), "nn": nn_splits(split)},
            backward=False,
            repeats=repeats(n),
            series=f"CAFace splits of {split}",
        )
        for n, split in SPLITS[mode]
    ]
    out += [
        Case(
            op="compat",
            label=_call_label(n),
            size=n,
            make_inputs=_caface_inputs(n),
            impls={"compat": compat_one_call, "nn": nn_one_call},
            backward=False,
            repeats=repeats(n),
            series="CAFace one call",
        )
        for n in CALL_SIZES[mode]
    ]
    out += [
        Case(
            op="compat",
            label=_coreset_label(n),
            size=n,
            make_inputs=_coreset_inputs(n),
            impls={"compat": compat_coreset_call, "nn": nn_coreset_call},
            backward=False,
            repeats=repeats(n),
            series="FaceCoresetNet",
        )
        for n in CORESET_SIZES[mode]
    ]
    return out


def _split_label(n: int, split: int) -> str:
    return f"CAFace N={n} in splits of {split}"


def _call_label(n: int) -> str:
    return f"CAFace N={n} one call"


def _coreset_label(n: int) -> str:
    return f"FaceCoresetNet N={n}"


# The quick run's cases carry the target; the smoke run's sizes only show that the cases run.
TARGET_CASES = {
    *(_split_label(n, split) for n, split in SPLITS["quick"]),
    *(_call_label(n) for n in CALL_SIZES["quick"]),
    *(_coreset_label(n) for n in CORESET_SIZES["quick"]),
}


def summary(rows: list[Measurement]) -> list[str]:
    by_case = {(r.case, r.impl): r.median_s for r in rows}
    lines = []
    for case in dict.fromkeys(r.case for r in rows):
        ratio = by_case[(case, "compat")] / by_case[(case, "nn")]
        if case not in TARGET_CASES:
            lines.append(f"compat {case} at {ratio:.3f}x the time of fusedset.nn")
            continue
        status = "met" if ratio <= TOLERANCE else "MISSED"
        lines.append(
            f"target: compat {case} at {ratio:.3f}x the time of fusedset.nn "
            f"(goal <= {TOLERANCE:.2f}x): {status}"
        )
    return lines

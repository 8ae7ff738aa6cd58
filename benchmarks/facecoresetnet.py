"""FaceCoresetNet (fusedset.nn) against the released-style eager module (the reference), fp32,
no_grad, one template of N frames given as unit directions and norms: the whole module, and the
decoder alone (the cross-attention with its key encoding: what fusedset.ops.
sinusoid_attention_pool replaces). The "selection" series times the selection alone. The decoder
at N = 1e6 runs fusedset's only (full mode). The peak extra memory of fusedset's whole module and
decoder at N = 1e5 and 1e6 is measured in a fresh process each (`python -m
fusedset.bench.facecoresetnet whole|decoder N`): within the suite's process, memory freed by
earlier calls is reused and shows as 0.

The 20x target is checked where the issue's anchor (the released module at about 1.9 s) was
measured: the whole module at N = 1e5 with glibc's default allocator, in a fresh process, the
two modules alternating (`python -m fusedset.bench.facecoresetnet default-allocator`). There
every call of the eager module maps and zeroes its large temporaries anew, as in a user's
process. The suite's own timing keeps freed memory (common.freed_memory_kept), which spares
the eager module that cost: that ratio is printed beside the target as the stricter figure."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial

import torch

from fusedset.bench.common import (
    Case,
    Measurement,
    fresh_process,
    h100_roofline_s,
    peak_extra_memory,
    time_cpu,
)
from fusedset.nn import FaceCoresetNet
from fusedset.nn.facecoresetnet import _select_core
from fusedset.reference import FaceCoresetNetReference

EXPECTED_SECONDS = {"smoke": 5, "quick": 60, "full": 300}
WIDTH = 512
TARGET_N = 100_000
MEMORY_N = 1_000_000
TARGET_SPEEDUP = 20.0
FAST, EAGER = "fusedset", "released-style eager"
DEFAULT_ALLOCATOR = "default-allocator"  # `python -m fusedset.bench.facecoresetnet` argument
PEAK_PARTS = ("decoder", "whole")  # the same, followed by N


def unit_template(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit directions (1, N, C) and norms (1, N, 1) in the range of face-feature norms, built in
    place: no temporary larger than the template."""
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.empty(1, n, WIDTH).normal_(generator=generator)
    embeddings /= torch.linalg.vector_norm(embeddings, dim=-1, keepdim=True)
    norms = torch.empty(1, n, 1).uniform_(5, 40, generator=generator)
    return embeddings, norms


def _decoder_inputs(eager: FaceCoresetNetReference, n: int, seed: int) -> tuple:
    """(core, template, norms): the decoder's inputs, the template built in place."""
    template, norms = unit_template(n, seed)
    template *= norms
    norms = norms.squeeze(-1)
    with torch.no_grad():
        core = eager.select(template, norms).features
    return core, template, norms


def _no_grad(fn: Callable) -> Callable:
    def run(*args):
        with torch.no_grad():
            return fn(*args)

    return run


def _models() -> tuple[FaceCoresetNetReference, FaceCoresetNet]:
    torch.manual_seed(0)
    eager = FaceCoresetNetReference().eval()
    fast = FaceCoresetNet().eval()
    fast.load_state_dict(eager.state_dict())
    return eager, fast


def _cases(n: int, repeats: int, parts: tuple[str, ...]) -> list[Case]:
    eager, fast = _models()
    x_bytes = 4 * n * WIDTH
    make = {
        "whole module": lambda device: [unit_template(n, seed) for seed in range(2)],
        "decoder": lambda device: [_decoder_inputs(eager, n, seed) for seed in range(2)],
        "selection": lambda device: [_decoder_inputs(eager, n, seed)[1:] for seed in range(2)],
    }
    impls = {
        "whole module": {FAST: _no_grad(fast), EAGER: _no_grad(eager)},
        "decoder": {FAST: _no_grad(fast.refine), EAGER: _no_grad(eager.refine)},
        "selection": {
            FAST: _no_grad(
                lambda x, norms: _select_core(x, fast.coreset_size, fast.gamma, training=False)
            ),
            EAGER: _no_grad(eager.select),
        },
    }
    # The floor: reads of X. Whole module: one selection pass (the norms and the distances to
    # the first pick, the largest norm; the last step reads only the rows that can win) and one
    # attention pass; the decoder one pass; the selection alone (from the template, whose first
    # pick is only known after the norms) K - 1 = 2 passes.
    floors = {"whole module": 2 * x_bytes, "decoder": x_bytes, "selection": 2 * x_bytes}
    return [
        Case(
            op="facecoresetnet",
            label=f"N={n} {part}",
            size=n,
            make_inputs=make[part],
            impls=impls[part],
            bytes_moved={"forward": floors[part]},
            backward=False,
            repeats=repeats,
            series=part,
        )
        for part in parts
    ]


def _memory_case() -> Case:
    """fusedset's decoder alone at N = 1e6 (the eager one would need several GB and minutes),
    one input: two 2 GB templates would not add anything."""
    eager, fast = _models()
    return Case(
        op="facecoresetnet",
        label=f"N={MEMORY_N} decoder",
        size=MEMORY_N,
        make_inputs=lambda device: [_decoder_inputs(eager, MEMORY_N, 0)],
        impls={FAST: _no_grad(fast.refine)},
        bytes_moved={"forward": 4 * MEMORY_N * WIDTH},
        backward=False,
        repeats=1,
        series="decoder",
    )


def cases(mode: str) -> list[Case]:
    if mode == "smoke":
        return _cases(1_000, 3, ("whole module", "decoder"))
    if mode == "quick":
        # one timed call at N = 1e5, where the eager module takes seconds
        return [
            *_cases(10_000, 3, ("whole module", "decoder")),
            *_cases(TARGET_N, 1, ("whole module", "decoder")),
        ]
    parts = ("whole module", "decoder", "selection")
    return [
        *_cases(1_000, 7, parts),
        *_cases(10_000, 7, parts),
        *_cases(TARGET_N, 3, parts),
        _memory_case(),
    ]


def summary(rows: list[Measurement]) -> list[str]:
    by_key = {(r.case, r.impl): r for r in rows}
    lines = []
    whole = by_key.get((f"N={TARGET_N} whole module", FAST))
    if whole is not None:
        ratio = by_key[(whole.case, EAGER)].median_s / whole.median_s
        decoder = by_key[(f"N={TARGET_N} decoder", FAST)]
        decoder_ratio = by_key[(decoder.case, EAGER)].median_s / decoder.median_s
        fast_s, eager_s = fresh_process(__name__, DEFAULT_ALLOCATOR)
        status = "met" if eager_s / fast_s >= TARGET_SPEEDUP else "MISSED"
        lines.append(
            f"target: whole module at N = {TARGET_N:,} with glibc's default allocator, in a "
            f"fresh process as a user's (where the issue's 1.9 s anchor was measured): "
            f"{fast_s * 1e3:.0f} ms vs {eager_s * 1e3:.0f} ms for the released-style module = "
            f"{eager_s / fast_s:.2f}x (goal >= {TARGET_SPEEDUP:.0f}x): {status}"
        )
        lines.append(
            f"with freed memory kept (the timings above; spares the eager module its page "
            f"faults): whole module {ratio:.1f}x, the decoder alone {decoder_ratio:.1f}x"
        )
    if any(r.size >= TARGET_N for r in rows):
        sizes = (TARGET_N, MEMORY_N)
        peaks = {
            part: ", ".join(
                f"N = {n:,}: {fresh_process(__name__, part, n)[0]:.1f} MiB" for n in sizes
            )
            for part in PEAK_PARTS
        }
        lines.append(
            f"fusedset, peak extra memory in a fresh process: the decoder {peaks['decoder']}; "
            f"the whole module {peaks['whole']}, the selection's state of 16 bytes a row on top "
            f"(the template at N = {MEMORY_N:,} is {4 * MEMORY_N * WIDTH / 2**20:,.0f} MiB)"
        )
    x_bytes = 4 * TARGET_N * WIDTH
    lines.append(
        f"roofline: one read of the N = {TARGET_N:,} template is {x_bytes / 1e6:.0f} MB; on an "
        f"H100 (3.35 TB/s) {h100_roofline_s(x_bytes) * 1e3:.3f} ms for the decoder, "
        f"{h100_roofline_s(2 * x_bytes) * 1e3:.3f} ms for the whole module (one selection "
        "pass and one attention pass; estimate, not measured)"
    )
    return lines


def _peak_mib(part: str, n: int) -> float:
    """The growth of the peak RSS over the RSS before one call of fusedset's whole module or
    decoder (`part`), the peak reset first (/proc/self/clear_refs) so that building the model
    and inputs does not count. The decoder's core is any 3 rows."""
    _, fast = _models()
    embeddings, norms = unit_template(n, 0)
    if part == "whole":
        call = partial(_no_grad(fast), embeddings, norms)
    else:
        template = embeddings.mul_(norms)
        call = partial(_no_grad(fast.refine), template[:, :3].clone(), template, norms[..., 0])
    return peak_extra_memory(call, "cpu") / 2**20


def _default_allocator_seconds() -> tuple[float, float]:
    """Median seconds of the whole module, fusedset's and the released-style one, taking turns,
    with glibc's allocator as a fresh process has it: each call maps and zeroes its large
    temporaries anew (the cost the released code has in a user's process)."""
    eager, fast = _models()
    inputs = [unit_template(TARGET_N, seed) for seed in range(2)]
    calls = {FAST: _no_grad(fast), EAGER: _no_grad(eager)}
    seconds = time_cpu(calls, inputs, warmup=1, repeats=5, keep_freed_memory=False)
    return seconds[FAST], seconds[EAGER]


if __name__ == "__main__":
    if sys.argv[1] == DEFAULT_ALLOCATOR:
        print(*_default_allocator_seconds())
    else:
        print(_peak_mib(sys.argv[1], int(sys.argv[2])))

"""fusedset.nn.FaceCoresetNet against the released-style eager module (the reference), fp32,
no_grad, one template of N frames: the whole module, the decoder alone (the cross-attention
with its key encoding: what the folded form replaces), and the selection both share until
fusedset.ops.quality_fps replaces it. Then the peak extra memory of the chunked decoder at N up
to 1,000,000, each in a fresh process (peak RSS
over the RSS before the call).

    python benchmarks/bench_facecoresetnet.py [--quick] [--threads T] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import Measurement, format_table, speedups, time_cpu, write_json

from fusedset.nn import FaceCoresetNet
from fusedset.reference import FaceCoresetNetReference

WIDTH = 512
TARGET_N = 100_000
TARGET_SPEEDUP = 20.0
FAST, EAGER = "fusedset", "released-style eager"


def _template(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit directions (1, N, C) and norms (1, N, 1) in the range of face-feature norms, built in
    place so that no temporary larger than the template is ever allocated."""
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.empty(1, n, WIDTH).normal_(generator=generator)
    embeddings /= torch.linalg.vector_norm(embeddings, dim=-1, keepdim=True)
    norms = torch.empty(1, n, 1).uniform_(5, 40, generator=generator)
    return embeddings, norms


def _models() -> tuple[FaceCoresetNetReference, FaceCoresetNet]:
    torch.manual_seed(0)
    eager = FaceCoresetNetReference().eval()
    fast = FaceCoresetNet().eval()
    fast.load_state_dict(eager.state_dict())
    return eager, fast


def run(quick: bool) -> list[Measurement]:
    eager, fast = _models()
    sizes = [10_000, TARGET_N] if quick else [1_000, 10_000, TARGET_N]
    rows = []
    for n in sizes:
        # Quick: one timed call each (after a warm-up below N = 1e5, where the eager module
        # takes seconds and a first call's page faults are lost in it).
        if quick:
            warmup, repeats = int(n < TARGET_N), 1
        else:
            warmup, repeats = 2, 5 if n >= TARGET_N else 9
        templates = [_template(n, seed) for seed in range(2)]
        decoder_inputs = []
        for embeddings, norms in templates:
            features, norms = embeddings * norms, norms.squeeze(-1)
            core = eager.select(features, norms).features
            decoder_inputs.append((core, features, norms))
        x_bytes = n * WIDTH * 4
        timed = {
            "whole module": ({EAGER: eager, FAST: fast}, templates, 4 * x_bytes),
            "decoder only": ({EAGER: eager.refine, FAST: fast.refine}, decoder_inputs, x_bytes),
            "selection (shared)": ({EAGER: eager.select}, [t[1:] for t in decoder_inputs], None),
        }
        with torch.no_grad():
            for part, (impls, inputs, floor) in timed.items():
                for impl, fn in impls.items():
                    seconds = time_cpu(fn, inputs, warmup=warmup, repeats=repeats)
                    rows.append(Measurement("facecoresetnet", f"N={n}", impl, part, seconds, floor))
    return rows


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> None:
    """Sets VmHWM (the peak RSS) to the current RSS (Linux >= 4.0), so that the transient peaks
    of building the models and the inputs do not hide the call's own."""
    Path("/proc/self/clear_refs").write_text("5")


def measure_memory(n: int, part: str) -> dict:
    """Run in a fresh process: the growth of the peak RSS over the inputs during one call."""
    eager, fast = _models()
    embeddings, norms = _template(n, 0)
    with torch.no_grad():
        embeddings *= norms  # the template, in place
        norms = norms.squeeze(-1)
        core = embeddings[:, :3].clone()
        _reset_peak_rss()
        baseline = _status_bytes("VmRSS")
        if part == "fast decoder":
            fast.refine(core, embeddings, norms)
        elif part == "eager decoder":
            eager.refine(core, embeddings, norms)
        else:
            fast.forward_features(embeddings)
    return {
        "n": n,
        "part": part,
        "template_mb": n * WIDTH * 4 / 2**20,
        "peak_extra_mb": (_status_bytes("VmHWM") - baseline) / 2**20,
    }


def memory_cases(quick: bool) -> list[tuple[int, str]]:
    cases = [(100_000, "fast decoder"), (1_000_000, "fast decoder")]
    if not quick:
        cases[1:1] = [(300_000, "fast decoder")]
        cases += [(100_000, "eager decoder"), (100_000, "fast whole module")]
    return cases


def run_memory(quick: bool, threads: int) -> list[dict]:
    results = []
    for n, part in memory_cases(quick):
        command = [sys.executable, __file__, "--measure-memory", str(n), part]
        command += ["--threads", str(threads)]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 1e4 and 1e5, one call each")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--measure-memory", nargs=2, metavar=("N", "PART"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda":
        print("facecoresetnet benchmark: CPU only for now, skipped")
        return 0
    torch.set_num_threads(args.threads)
    if args.measure_memory:
        print(json.dumps(measure_memory(int(args.measure_memory[0]), args.measure_memory[1])))
        return 0

    rows = run(args.quick)
    print(
        f"\nFaceCoresetNet, cpu, fp32, no_grad, B = 1, C = {WIDTH}, K = 3, "
        f"{args.threads} threads (speedups = eager time / fusedset time, same run)"
    )
    print(format_table(rows, [EAGER]))
    ratios = speedups(rows, FAST, EAGER)
    whole, decoder = (
        ratios[(f"N={TARGET_N}", "whole module")],
        ratios[(f"N={TARGET_N}", "decoder only")],
    )
    status = "met" if whole >= TARGET_SPEEDUP else "MISSED"
    print(
        f"target: whole module {whole:.1f}x faster than the released-style module at N = "
        f"{TARGET_N} (goal >= {TARGET_SPEEDUP:.0f}x): {status}; decoder alone {decoder:.1f}x. "
        "The selection is still the eager one in both (see 'selection (shared)')."
    )
    memory = run_memory(args.quick, args.threads)
    print(
        "\npeak extra memory over the inputs (max RSS delta, VmHWM - VmRSS, fresh process per row):"
    )
    for m in memory:
        print(
            f"  {m['part']:>18} N = {m['n']:>9,}: {m['peak_extra_mb']:8.1f} MB "
            f"(the template itself: {m['template_mb']:.0f} MB)"
        )
    path = args.out / "facecoresetnet.json"
    notes = {"target_speedup": whole, "decoder_speedup": decoder, "goal": TARGET_SPEEDUP}
    write_json(path, "facecoresetnet", "cpu", rows, {**notes, "memory": memory})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

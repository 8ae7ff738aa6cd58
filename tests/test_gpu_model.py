"""The GPU model's pieces, proven on known kernels and numbers; and the GPU check's refusal."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from fusedset.tools import gpu_model

from .helpers import TRITON_DEVICE

ROOT = Path(__file__).resolve().parents[1]
interpreted = pytest.mark.skipif(
    TRITON_DEVICE != "cpu", reason="counts the interpreter's loads and stores"
)


@interpreted
@pytest.mark.parametrize("n", [1, 300, 1024])
def test_count_sees_every_load_store_grid_torch_op_and_sync(n):
    pytest.importorskip("triton")
    from .compile_check_kernels import scale_clean

    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    y = torch.full_like(x, float("nan"))

    def call():
        scale_clean.fn[(-(-n // 256),)](x, y, n, BLOCK=256)
        total = (y - 2 * x).abs().sum()  # two elementwise ops and a reduction: 3 launches
        assert total.item() == 0  # a host synchronisation

    counted = gpu_model.count(call)
    assert counted.kernel_bytes == {"scale_clean": 2 * 4 * n}
    assert counted.grids == [("scale_clean", (-(-n // 256), 1, 1))]
    # mul: x in, out; sub: y and that in, out; abs: in, out; sum: in, a 0-d out.
    assert counted.torch_ops == 4
    assert counted.torch_bytes == 4 * (2 * n + 3 * n + 2 * n + n + 1)
    assert counted.syncs == 1
    assert counted.launches == 5


def test_resident_programs_per_sm_take_the_tightest_limit():
    h100 = gpu_model.GPUS[90]
    # 4 warps at 128 registers: 4 * 32 * 128 = 16384 registers a program, 4 fit in 65536.
    assert gpu_model.Resources(128, 0, 4).resident_per_sm(h100) == 4
    # Registers are allocated per warp in units of 256: 129 counts as 136.
    assert gpu_model.Resources(129, 0, 4).resident_per_sm(h100) == 3
    # 32 warps (1024 threads): at most 2 by threads.
    assert gpu_model.Resources(16, 0, 32).resident_per_sm(h100) == 2
    # Shared memory: 100 KiB + the 1 KiB reserved, twice in 228 KiB.
    assert gpu_model.Resources(32, 100 * 1024, 4).resident_per_sm(h100) == 2
    # Small programs: the 32-block limit.
    assert gpu_model.Resources(16, 0, 1).resident_per_sm(h100) == 32


@pytest.mark.parametrize(
    ("programs", "resident", "waves", "busy"),
    [
        (132, 1, 1, 1.0),
        (66, 4, 1, 0.5),  # half the SMs idle
        (264, 1, 2, 1.0),
        (133, 1, 2, (1 + 1 / 132) / 2),  # a last wave of one program
        (528, 4, 1, 1.0),
    ],
)
def test_busy_fraction_counts_the_idle_sms_of_a_partial_wave(programs, resident, waves, busy):
    got_waves, got_busy = gpu_model.busy_fraction(programs, resident, gpu_model.GPUS[90])
    assert got_waves == waves
    assert got_busy == pytest.approx(busy)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", gpu_model.STYLE_SHAPES)
def test_style_pool_mirror_reads_x_once_each_way_and_fills_the_gpu(shape, layout):
    b, c, h, w = shape
    x, rows = b * c * h * w * 4, b * c
    forward, forward_floor = gpu_model.style_pool_launches(shape, layout, backward=False)
    backward, backward_floor = gpu_model.style_pool_launches(shape, layout, backward=True)
    # Forward: x in; out (float32) and the saved statistics (float32) out.
    assert forward_floor == x + 2 * rows * 4 + 2 * rows * 4
    # Backward: grad, x and the saved statistics in, dx out, in one launch.
    assert backward_floor == 2 * x + 2 * rows * 4 + 2 * rows * 4
    assert [sink for _, sink, *_ in backward] == ["GradFromStats"]
    for launches, floor in ((forward, forward_floor), (backward, backward_floor)):
        moved = sum(loaded + stored for *_, loaded, stored in launches)
        assert floor <= moved <= 1.05 * floor
        assert max(grid for _, _, grid, *_ in launches) >= gpu_model.GPUS[90].sms


def test_compare_puts_a_bench_run_beside_the_model(tmp_path):
    model = [
        {
            "op": "cluster_accumulate",
            "form": "plain",
            "B": 1,
            "N": n,
            "modeled_s": t,
            "floor_bytes": 2560 * n,
        }
        for n, t in ((4096, 10e-6), (65536, 60e-6))
    ]
    bench = {
        "results": [
            {
                "op": "cluster_accumulate",
                "impl": "fusedset",
                "case": "N=34816",
                "size": 34816,
                "pass_": "forward",
                "median_s": 70e-6,
            },
            {  # no model of quality_fps_select's backward: no row
                "op": "quality_fps",
                "impl": "fusedset select",
                "case": "N=1e+05",
                "size": 100000,
                "pass_": "forward+backward",
                "median_s": 1e-3,
            },
            {
                "op": "cluster_accumulate",
                "impl": "eager",
                "case": "N=34816",
                "size": 34816,
                "pass_": "forward",
                "median_s": 1e-3,
            },
        ]
    }
    (tmp_path / "model.json").write_text(json.dumps(model))
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    (row,) = gpu_model.compare(str(tmp_path / "model.json"), str(tmp_path / "bench.json"))
    assert row["modeled_s"] == pytest.approx(35e-6)  # halfway between the two rows
    assert row["measured_over_modeled"] == pytest.approx(2.0)
    assert row["measured_gb_per_s"] == pytest.approx(2560 * 34816 / 70e-6 / 1e9)
    assert "| cluster_accumulate (fusedset) | N=34816 | forward | 70.0 | 35.0 | 2.00 |" in (
        gpu_model.compare_markdown([row])
    )


def _gpu_check(path: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": path}
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu-check.sh")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_gpu_check_refuses_without_nvidia_smi(tmp_path):
    result = _gpu_check(f"{tmp_path}:/usr/bin:/bin")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "gpu-check: no CUDA device on this machine (nvidia-smi not found); run it on a machine "
        "with an NVIDIA GPU"
    ]


def test_gpu_check_refuses_when_nvidia_smi_lists_no_gpu(tmp_path):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'No devices were found'\nexit 6\n")
    fake.chmod(0o755)
    result = _gpu_check(f"{tmp_path}:/usr/bin:/bin")
    assert result.returncode == 2
    assert "nvidia-smi lists no GPU" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1

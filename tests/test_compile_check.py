"""The Triton compile check, proven on two kernels of its own: one clean, one that spills."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

KERNELS = Path(__file__).with_name("compile_check_kernels.py")


def compile_check(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, "-m", "fusedset.tools.compile_check", *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=600,
    )


def test_clean_kernel_passes_for_every_config_and_arch():
    result = compile_check("--module", str(KERNELS), "--only", "scale_clean")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("scale_clean")]
    # two autotune configs x two architectures, each with its register count
    assert len(rows) == 4
    assert {"sm_80", "sm_90"} == {line.split()[3] for line in rows}
    assert all(line.split()[-1] == "ok" for line in rows)


@pytest.mark.slow
def test_spilling_kernel_fails():
    result = compile_check("--module", str(KERNELS), "--only", "spill_on_purpose", "--arch", "90")
    assert result.returncode == 1, result.stdout + result.stderr
    (row,) = [line for line in result.stdout.splitlines() if line.startswith("spill_on_purpose")]
    assert "FAIL spills" in row
    assert int(row.split()[5]) > 0


def test_unregistered_kernel_fails(tmp_path):
    module = tmp_path / "forgotten_kernel.py"
    module.write_text(
        "import triton\nimport triton.language as tl\n\n\n"
        "@triton.jit\ndef forgotten(x_ptr):\n    tl.store(x_ptr, 1.0)\n"
    )
    result = compile_check("--module", str(module), "--only", "nothing")
    assert result.returncode == 1
    assert "UNREGISTERED forgotten_kernel.forgotten" in result.stdout


def test_refuses_to_run_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "fusedset.tools.compile_check"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == 2
    assert "unset TRITON_INTERPRET" in result.stdout


@pytest.mark.slow
def test_cuda_cpp_kernels_of_the_extension_are_listed():
    import fusedset

    if not fusedset.backends()["cuda_kernels"]:
        pytest.skip("fusedset._C was built without CUDA kernels")
    result = compile_check("--arch", "80", "90")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if "CUDA C++" in line]
    kernels = {(row[0], row[-5]) for row in rows}
    for kernel in ("style_pool_contiguous_kernel", "style_pool_channels_last_kernel"):
        assert {(kernel, "sm_80"), (kernel, "sm_90")} <= kernels

"""The CUDA kernels compile to PTX without a GPU, and float32 kernels hold no .f64 instruction."""
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import SIMULATOR

pytest.importorskip("numba_cuda", reason='numba-cuda is not installed (pip install -e ".[cuda-tools]")')
pytestmark = pytest.mark.skipif(SIMULATOR, reason="compile_ptx does not exist under the simulator")


def test_ptx_command_reports_every_kernel_without_f64():
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0"}
    out = subprocess.run([sys.executable, "-m", "fastopt.kernels", "ptx", "--cc", "80", "--cc", "90"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [line.split() for line in out.stdout.splitlines()[1:-1]]
    kernels = {r[0] for r in rows}
    eight_bit = {"adam8bit", "lion8bit", "sgd8bit", "rmsprop8bit"}  # the rules with 8-bit state
    norms = {"norm_squares", "norm_max", "norm_power"}  # the reductions: layer passes that write nothing
    assert kernels == {"sgd", "adagrad", "rmsprop", "adam", "adadelta", "adamax", "nadam", "radam", "lion",
                       "lamb", "lars", "ema", "polyak"} | eight_bit | norms
    for row in rows:
        dtype, cc, lines, f64 = row[-4], row[-3], int(row[-2]), int(row[-1])
        assert cc in ("80", "90") and lines > 100
        if dtype == "float64":
            assert f64 > 0, row  # the float64 kernels really are float64: the count sees them
        else:
            assert f64 == 0, row
    # every rule in every storage format, the 16-bit ones also with master weights and stochastic rounding
    formats = {(r[0], r[-4]) for r in rows}
    every = ("float32", "float64", "bfloat16", "float16")
    assert {(k, d) for k in kernels - {"lamb", "lars"} - eight_bit for d in every} <= formats
    # 8-bit state: float32 and 16-bit params (no float64 form), each code map, masters and stochastic rounding
    assert {(k, d) for k in eight_bit for d in every[:1] + every[2:]} <= formats
    assert {(r[0], r[1].split(":")[1]) for r in rows if r[0] in eight_bit} == {
        (k, c) for k in eight_bit for c in ("fp8", "dynamic", "fp8+master+sr")}
    assert "float64" not in {r[-4] for r in rows if r[0] in eight_bit}
    assert {r[0] for r in rows if r[1].endswith("+master+sr")} == kernels - norms - {"lamb", "lars", "ema", "polyak"}
    assert "OK: no float32 or 16-bit kernel" in out.stdout


def leaky_math(p, g, lr, one):
    return p - lr * (1.0 - g)  # the bare 1.0 is a float64


def clean_math(p, g, lr, one):
    return p - lr * (one - g)


@pytest.mark.parametrize("math,leaks", [(leaky_math, True), (clean_math, False)])
def test_f64_count_catches_a_bare_literal(math, leaks):
    from fastopt.kernels._ptx import compile_kernel, f64_count
    from fastopt.kernels._rule import Rule
    rule = Rule(math.__name__, math, lambda h, step, lr: dict(lr=1e-3, one=1.0))
    scalars = rule.kernel_scalars({}, 1, None, np.dtype(np.float32))
    ptx = compile_kernel(rule.kernels, (), scalars, np.float32, (8, 0))
    assert (f64_count(ptx) > 0) == leaks


def test_every_cuda_kernel_is_cached_on_disk_under_its_own_name():
    """numba-cuda's own cache would hand one generated kernel to another (same file, name and
    bytecode): every kind of kernel goes through ``_engine.enable_cuda_cache``, keyed by its
    sources. (Building the dispatchers needs no GPU; the GPU report measures the cache.)"""
    from fastopt.kernels import RULES, _blockwise, _device, _reduce
    rule = RULES["adamw"][0]
    kernels = {"adam_cuda": rule.kernels.cuda(), "norm_squares_cuda_layers_float32":
               _reduce.NORM[_reduce.SQUARES].layers_cuda(np.float32), "adam_prologue": _device.prologue(rule),
               "adam_device_update": _device.update(rule), "adam_8bit_fp8_cuda": _blockwise.blockwise(rule.kernels,
                                                                                                     "fp8").cuda()}
    for name, dispatcher in kernels.items():
        assert type(dispatcher._cache).__name__ == "_RuleCudaCache", name
        assert dispatcher.py_func.__qualname__ == name

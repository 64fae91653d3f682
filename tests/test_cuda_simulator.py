"""Runs every `cuda`-marked test on Numba's CUDA simulator, in a child process (the
simulator must be chosen before Numba is imported), and reports the child's result."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CUDA

pytest.importorskip("numba_cuda", reason='numba-cuda is not installed (pip install -e ".[cuda-tools]")')


@pytest.mark.skipif(CUDA, reason="CUDA tests already run in this process (GPU or simulator)")
def test_cuda_tests_pass_on_the_simulator():
    here = Path(__file__).parent
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    # faulthandler_timeout: a test that runs past 10 minutes (the whole run takes about 9) dumps
    # every thread's stack, so a hung simulator block (256 Python threads at a barrier) says where
    command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "-p", "no:randomly",
               "-o", "faulthandler_timeout=600", str(here)]
    try:
        out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    except subprocess.TimeoutExpired as e:
        text = [x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr)]
        pytest.fail("the simulator run passed 1800 s; its output's end:\n" + text[0][-4000:] + text[1][-8000:])
    tail = "\n".join(out.stdout.splitlines()[-40:]) + out.stderr[-4000:]
    assert out.returncode == 0, "simulator run failed:\n" + tail
    assert " passed" in out.stdout and " failed" not in out.stdout, tail
    print(out.stdout.splitlines()[-1])

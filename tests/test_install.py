"""What a minimal install (no extras) does with the tools that need an extra."""
import subprocess
import sys


def test_ptx_check_without_numba_cuda_names_the_extra():
    code = ("import sys; sys.modules['numba_cuda'] = None\n"  # as if numba-cuda were not installed
            "from fastopt.kernels.__main__ import main\n"
            "main(['ptx'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert 'pip install -e ".[cuda-tools]"' in lines[-1] and "Traceback" not in out.stderr

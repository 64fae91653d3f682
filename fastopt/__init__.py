"""fastopt: fused optimizer update kernels for NumPy and CUDA arrays."""
from . import functional

__version__ = "0.1.0"

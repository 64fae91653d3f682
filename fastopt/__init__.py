"""fastopt: fused optimizer update kernels for NumPy and CUDA arrays."""
from . import functional, schedules
from .buffer import ParamBuffer

__version__ = "0.1.0"

"""In-place, fused update rules with PyTorch's semantics, state names and defaults.

Each call checks its arguments, computes the step's scalars on the host and runs one
fused pass over the arrays, on the CPU for NumPy arrays or on the GPU for CUDA arrays.
"""
from .kernels.adadelta import adadelta_
from .kernels.adagrad import adagrad_
from .kernels.adam import adam_, adamw_
from .kernels.adamax import adamax_
from .kernels.lion import lion_
from .kernels.nadam import nadam_
from .kernels.radam import radam_
from .kernels.rmsprop import rmsprop_
from .kernels.sgd import sgd_
from .layerwise import lamb_, lars_

__all__ = ["adadelta_", "adagrad_", "adam_", "adamax_", "adamw_", "lamb_", "lars_", "lion_", "nadam_", "radam_",
           "rmsprop_", "sgd_"]

"""fastopt: fused optimizer update kernels for NumPy and CUDA arrays."""
from . import functional, nn, preprocessing, schedules
from .averaging import EMA, PolyakAverage
from .buffer import ParamBuffer
from .checkpoint import load, save
from .clip import clip_grad_norm_, grad_norm
from .gradcheck import GradcheckReport, check_layer, gradcheck
from .layerwise import LAMB, LARS
from .lbfgs import LBFGS
from .newton import Newton
from .optimizer import Optimizer
from .optimizers import (
    OPTIMIZERS,
    SGD,
    Adadelta,
    Adagrad,
    Adam,
    Adam8bit,
    Adamax,
    AdamW,
    AdamW8bit,
    Lion,
    Lion8bit,
    NAdam,
    RAdam,
    RMSprop,
    RMSprop8bit,
    SGD8bit,
)

__version__ = "0.1.0"

__all__ = [
    "EMA",
    "LAMB",
    "LARS",
    "LBFGS",
    "OPTIMIZERS",
    "SGD",
    "Adadelta",
    "Adagrad",
    "Adam",
    "Adam8bit",
    "AdamW",
    "AdamW8bit",
    "Adamax",
    "GradcheckReport",
    "Lion",
    "Lion8bit",
    "NAdam",
    "Newton",
    "Optimizer",
    "ParamBuffer",
    "PolyakAverage",
    "RAdam",
    "RMSprop",
    "RMSprop8bit",
    "SGD8bit",
    "check_layer",
    "clip_grad_norm_",
    "functional",
    "grad_norm",
    "gradcheck",
    "load",
    "nn",
    "preprocessing",
    "save",
    "schedules",
]

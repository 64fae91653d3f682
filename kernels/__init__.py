"""fastopt.kernels: the bottom layer, one file per update rule (it imports nothing from fastopt).

Each rule file declares its :class:`~._rule.Rule` once: the element-wise math (compiled for
the CPU and for CUDA by :mod:`._engine`), the states it keeps, its hyper-parameters with
defaults and checks, its host-side scalars by name; the public in-place function (``adam_``)
is derived from it, and an independent float64 NumPy reference (``adam_reference``) sits
beside it.
"""
from . import adadelta, adagrad, adam, adamax, lion, nadam, radam, rmsprop, sgd

# public name -> (rule, in-place function, NumPy reference)
RULES = {
    "sgd": (sgd.SGD, sgd.sgd_, sgd.sgd_reference),
    "adagrad": (adagrad.ADAGRAD, adagrad.adagrad_, adagrad.adagrad_reference),
    "rmsprop": (rmsprop.RMSPROP, rmsprop.rmsprop_, rmsprop.rmsprop_reference),
    "adam": (adam.ADAM, adam.adam_, adam.adam_reference),
    "adamw": (adam.ADAMW, adam.adamw_, adam.adamw_reference),
    "adadelta": (adadelta.ADADELTA, adadelta.adadelta_, adadelta.adadelta_reference),
    "adamax": (adamax.ADAMAX, adamax.adamax_, adamax.adamax_reference),
    "nadam": (nadam.NADAM, nadam.nadam_, nadam.nadam_reference),
    "radam": (radam.RADAM, radam.radam_, radam.radam_reference),
    "lion": (lion.LION, lion.lion_, lion.lion_reference),
}

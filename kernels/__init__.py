"""fastopt.kernels: one file per update rule.

Each rule file holds the rule's element-wise math (compiled for the CPU and for CUDA by
:mod:`._loops`), its host-side scalars and argument checks, the public in-place function
(``adam_``) and an independent float64 NumPy reference (``adam_reference``).
"""
from . import adadelta, adagrad, adam, adamax, lion, nadam, radam, rmsprop, sgd

# public name -> (rule module, in-place function, NumPy reference)
RULES = {
    "sgd": (sgd, sgd.sgd_, sgd.sgd_reference),
    "adagrad": (adagrad, adagrad.adagrad_, adagrad.adagrad_reference),
    "rmsprop": (rmsprop, rmsprop.rmsprop_, rmsprop.rmsprop_reference),
    "adam": (adam, adam.adam_, adam.adam_reference),
    "adamw": (adam, adam.adamw_, adam.adamw_reference),
    "adadelta": (adadelta, adadelta.adadelta_, adadelta.adadelta_reference),
    "adamax": (adamax, adamax.adamax_, adamax.adamax_reference),
    "nadam": (nadam, nadam.nadam_, nadam.nadam_reference),
    "radam": (radam, radam.radam_, radam.radam_reference),
    "lion": (lion, lion.lion_, lion.lion_reference),
}

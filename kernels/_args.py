"""Hyper-parameter checks, with PyTorch's messages so errors read the same in both."""
import numbers


def nonneg(name, value, label=None):
    # `not 0.0 <= x` also rejects NaN
    if not isinstance(value, numbers.Real) or not 0.0 <= value < float("inf"):
        raise ValueError(f"Invalid {label or name} value: {value}")


def lr(value):
    if not isinstance(value, numbers.Real) or not 0.0 <= value < float("inf"):
        raise ValueError(f"Invalid learning rate: {value}")


def eps(value):
    if not isinstance(value, numbers.Real) or not 0.0 <= value < float("inf"):
        raise ValueError(f"Invalid epsilon value: {value}")


def betas(value):
    if len(value) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {value!r}")
    for i, b in enumerate(value):
        if not isinstance(b, numbers.Real) or not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {b}")


def unit(name, value):
    """A decay rate in [0, 1]."""
    if not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"Invalid {name} value: {value}")


def step(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"step must be a positive integer (the 1-based number of this update), got {value!r}")


def required(name, array, why):
    if array is None:
        raise ValueError(f"{name} is required {why}")

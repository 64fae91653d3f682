"""Bad input: an error that names the argument, raised before any array is written."""
import re

import numpy as np
import pytest

import fastopt.functional as F
from conftest import BACKENDS, to_backend, to_host


def _arrays(n=5, dtype=np.float32):
    rng = np.random.default_rng(0)
    return [rng.standard_normal(n).astype(dtype) for _ in range(4)]  # param, grad, exp_avg, exp_avg_sq


def _readonly(a):
    a = a.copy()
    a.flags.writeable = False
    return a


# (id, how to spoil the Adam call's arguments, exception, message fragment)
ARRAY_CASES = [
    ("grad-dtype", lambda a: a.__setitem__(1, a[1].astype(np.float64)), TypeError, "grad has dtype float64"),
    ("param-int", lambda a: a.__setitem__(0, a[0].astype(np.int32)), TypeError, "param has dtype int32"),
    ("param-f16", lambda a: a.__setitem__(0, a[0].astype(np.float16)), TypeError, "param has dtype float16"),
    ("state-shape", lambda a: a.__setitem__(3, np.zeros(6, np.float32)), ValueError, "exp_avg_sq has shape (6,)"),
    ("grad-2d", lambda a: a.__setitem__(1, a[1].reshape(5, 1)), ValueError, "grad has shape (5, 1)"),
    ("strided", lambda a: a.__setitem__(2, np.zeros(10, np.float32)[::2]), ValueError, "exp_avg is not C-contiguous"),
    ("readonly-param", lambda a: a.__setitem__(0, _readonly(a[0])), ValueError, "param is read-only"),
    ("readonly-state", lambda a: a.__setitem__(3, _readonly(a[3])), ValueError, "exp_avg_sq is read-only"),
    ("aliased", lambda a: a.__setitem__(3, a[2]), ValueError, "exp_avg and exp_avg_sq share memory"),
    ("list", lambda a: a.__setitem__(1, list(a[1])), TypeError, "grad must be a NumPy array or a CUDA array"),
]


@pytest.mark.parametrize("spoil,exc,message", [c[1:] for c in ARRAY_CASES], ids=[c[0] for c in ARRAY_CASES])
def test_bad_arrays_rejected_before_writing(spoil, exc, message):
    arrays = _arrays()
    spoil(arrays)
    before = [np.array(a, copy=True) for a in arrays]
    with pytest.raises(exc, match=message.replace("(", r"\(").replace(")", r"\)")):
        F.adam_(*arrays, step=1, lr=0.1)
    for a, b in zip(arrays, before):
        np.testing.assert_array_equal(np.asarray(a), b)


@pytest.mark.cuda
def test_cpu_and_gpu_arrays_not_mixed():
    arrays = _arrays()
    before = [a.copy() for a in arrays]
    mixed = [arrays[0], to_backend(arrays[1], "cuda"), arrays[2], arrays[3]]
    with pytest.raises(ValueError, match="grad is a CUDA array but param is a NumPy"):
        F.adam_(*mixed, step=1)
    on_gpu = [to_backend(a, "cuda") for a in arrays]
    on_gpu[2] = arrays[2]
    with pytest.raises(ValueError, match=r"exp_avg is a NumPy .* array but param is a CUDA"):
        F.adam_(*on_gpu, step=1)
    for a, b in zip(arrays, before):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(to_host(on_gpu[0]), before[0])


@pytest.mark.cuda
def test_aliased_device_arrays_rejected_before_writing():
    """The overlap check reads device addresses too (the simulator's: its host memory)."""
    param, grad, exp_avg, _ = (to_backend(a, "cuda") for a in _arrays())
    before = to_host(param)
    with pytest.raises(ValueError, match="exp_avg and exp_avg_sq share memory"):
        F.adam_(param, grad, exp_avg, exp_avg, step=1, lr=0.1)
    np.testing.assert_array_equal(to_host(param), before)


# (id, function, extra arguments, message); the arrays are valid, a hyper-parameter is not
HP_CASES = [
    ("neg-lr", F.adam_, dict(lr=-1e-3), "Invalid learning rate: -0.001"),
    ("nan-lr", F.sgd_, dict(lr=float("nan")), "Invalid learning rate: nan"),
    ("beta1", F.adam_, dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0: 1.0"),
    ("beta2", F.adamw_, dict(betas=(0.9, -0.1)), "Invalid beta parameter at index 1: -0.1"),
    ("eps", F.adam_, dict(eps=-1e-8), "Invalid epsilon value: -1e-08"),
    ("wd", F.adam_, dict(weight_decay=-1), "Invalid weight_decay value: -1"),
    ("momentum", F.sgd_, dict(lr=0.1, momentum=-0.5), "Invalid momentum value: -0.5"),
    ("nesterov-no-momentum", F.sgd_, dict(lr=0.1, nesterov=True), "Nesterov momentum requires a momentum"),
    ("nesterov-dampening", F.sgd_, dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True),
     "Nesterov momentum requires a momentum and zero dampening"),
    ("alpha", F.rmsprop_, dict(alpha=1.5), "Invalid alpha value: 1.5"),
    ("rho", F.adadelta_, dict(rho=-0.1), "Invalid rho value: -0.1"),
    ("lr-decay", F.adagrad_, dict(lr_decay=-1), "Invalid lr_decay value: -1"),
    ("momentum-decay", F.nadam_, dict(momentum_decay=-1), "Invalid momentum_decay value: -1"),
    ("lion-beta", F.lion_, dict(betas=(0.9, 1.5)), "Invalid beta parameter at index 1: 1.5"),
    ("step-0", F.adam_, dict(step=0), "step must be a positive integer"),
    ("step-float", F.radam_, dict(step=1.5), "step must be a positive integer"),
    ("amsgrad-state", F.adam_, dict(amsgrad=True), "max_exp_avg_sq is required when amsgrad=True"),
    ("sgd-buffer", F.sgd_, dict(lr=0.1, momentum=0.9), "momentum_buffer is required when momentum != 0"),
    ("rmsprop-centered", F.rmsprop_, dict(centered=True), "grad_avg is required when centered=True"),
    ("rmsprop-momentum", F.rmsprop_, dict(momentum=0.9), "momentum_buffer is required when momentum > 0"),
]

N_STATES = {F.sgd_: 0, F.adagrad_: 1, F.rmsprop_: 1, F.adam_: 2, F.adamw_: 2, F.adadelta_: 2,
            F.adamax_: 2, F.nadam_: 2, F.radam_: 2, F.lion_: 1, F.lamb_: 2, F.lars_: 1}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn,kwargs,message", [c[1:] for c in HP_CASES], ids=[c[0] for c in HP_CASES])
def test_bad_hyperparameters_rejected_before_writing(fn, kwargs, message, backend):
    host = _arrays()[: 2 + N_STATES[fn]]
    arrays = [to_backend(a, backend) for a in host]
    kwargs = {"step": 1, **kwargs}
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        fn(*arrays, **kwargs)
    for a, b in zip(arrays, host):
        np.testing.assert_array_equal(to_host(a), b)


# (id, function, extra arguments, message); a hyper-parameter of the wrong type: the optimizer
# classes' TypeError, not a truthy string read as True nor Python's or NumPy's own error
TYPE_CASES = [
    ("maximize-str", F.sgd_, dict(lr=0.1, maximize="False"), "maximize must be True or False, got 'False'"),
    ("bias-correction-str", F.adam_, dict(bias_correction="no"), "bias_correction must be True or False, got 'no'"),
    ("amsgrad-int", F.adam_, dict(amsgrad=1), "amsgrad must be True or False, got 1"),
    ("trust-clip-str", F.lars_, dict(trust_clip="yes"), "trust_clip must be True or False, got 'yes'"),
    ("lr-bool", F.sgd_, dict(lr=True), "lr must be a real number, got True"),
    ("lr-array", F.adam_, dict(lr=np.array([1e-3, 1e-3])), "lr must be a real number, got array([0.001, 0.001])"),
    ("dampening-str", F.sgd_, dict(lr=0.1, dampening="0.1"), "dampening must be a real number, got '0.1'"),
    ("lamb-betas-scalar", F.lamb_, dict(betas=0.9), "betas must be a pair of real numbers, got 0.9"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn,kwargs,message", [c[1:] for c in TYPE_CASES], ids=[c[0] for c in TYPE_CASES])
def test_wrongly_typed_hyperparameters_rejected_before_writing(fn, kwargs, message, backend):
    host = _arrays()[: 2 + N_STATES[fn]]
    arrays = [to_backend(a, backend) for a in host]
    with pytest.raises(TypeError, match=re.escape(message)):
        fn(*arrays, **{"step": 1, **kwargs})
    for a, b in zip(arrays, host):
        np.testing.assert_array_equal(to_host(a), b)

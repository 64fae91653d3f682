"""Every rule x backend x dtype x hyper-parameter set, against its float64 NumPy reference."""
import inspect

import numpy as np
import pytest

from cases import N_DRAWS, gradients, hparams, states
from conftest import BACKENDS, SIMULATOR, to_backend, to_host
from fastopt.kernels import RULES

STEPS = 50
# Sizes that are no multiple of a block or a SIMD width; 70001 crosses the CPU's parallel
# threshold. The simulator runs each GPU thread in Python, so it gets small sizes only.
SIZES = {"cpu": (1, 7, 4099, 70001), "cuda": (1, 7, 301) if SIMULATOR else (1, 7, 4099, 70001)}

# Tolerances. float64 kernels differ from the reference only in the order of operations
# (hoisted scalars, multiplying by 1/sqrt(bc2) rather than dividing): a few ulps per step,
# so 1e-9 relative leaves 4 orders of margin after 50 steps. float32 rounds every state
# update (unit roundoff 6e-8); over 50 steps the relative error of the states stays near
# 50 * 6e-8 = 3e-6, and of the parameters, which move by at most lr-sized steps, near that
# times the update size: 1e-4 relative and 1e-5 absolute (params start at unit scale) hold
# every case with margin. Lion takes sign(); a near-zero argument could flip it in float32, so
# the parameter check there allows a few elements to differ by 2*lr.
TOL = {np.float64: dict(rtol=1e-9, atol=1e-12), np.float32: dict(rtol=1e-4, atol=1e-5)}


def _cases():
    cases = []
    for rule in RULES:
        for i in range(N_DRAWS):
            cases.append(pytest.param(rule, i, id=f"{rule}-{i}"))
    return cases


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("rule,draw", _cases())
def test_matches_reference(rule, draw, dtype, backend):
    _, fn, reference = RULES[rule]
    hp = hparams(rule, draw)
    for n in SIZES[backend]:
        rng = np.random.default_rng(n)
        p0 = rng.standard_normal(n)
        ref_param, ref_states = p0.copy(), states(rule, n)
        param = to_backend(p0.astype(dtype), backend)
        state = [to_backend(s.astype(dtype), backend) for s in states(rule, n)]
        grads = gradients(STEPS, n, seed=n + draw)
        for step, g in enumerate(grads, start=1):
            reference(ref_param, g, *ref_states, step=step, **hp)
            fn(param, to_backend(g.astype(dtype), backend), *state, step=step, **hp)
        got = to_host(param)
        assert got.dtype == dtype
        tol = TOL[dtype]
        for name, a, b in zip(RULES[rule][0].states, state, ref_states):
            np.testing.assert_allclose(to_host(a), b, **tol, err_msg=f"{rule} {name} n={n} {hp}")
        if rule == "lion" and dtype == np.float32:
            off = ~np.isclose(got, ref_param, **tol)
            assert off.sum() <= max(2, n // 1000), f"lion param n={n}: {off.sum()} elements differ"
            np.testing.assert_allclose(got, ref_param, rtol=0, atol=2 * STEPS * hp.get("lr", 1e-4) + 1e-5)
        else:
            np.testing.assert_allclose(got, ref_param, **tol, err_msg=f"{rule} param n={n} {hp}")
        assert not np.allclose(got, p0), "the parameters did not move"


@pytest.mark.parametrize("rule", list(RULES))
def test_the_table_moves_every_option_off_its_default(rule):
    """An option the table never draws is never tested (SGD's dampening was not drawn: a
    wrong first-step buffer passed every test). Rules sharing one kernel (Adam, AdamW)
    pool their draws: the options reach the same compiled math."""
    module, fn, _ = RULES[rule]
    draws = [hparams(r, i) for r, (m, _, _) in RULES.items() if m.kernels is module.kernels for i in range(N_DRAWS)]
    options = {k: p.default for k, p in inspect.signature(fn).parameters.items()
               if p.kind is p.KEYWORD_ONLY and k != "step"}
    never = [k for k, default in options.items() if all(hp.get(k, default) == default for hp in draws)]
    assert not never, f"{rule}: no draw in tests/cases.py sets {never}"


# Lion by hand, from the paper's formula (Chen et al. 2023, Algorithm 2):
#   c = b1*m + (1-b1)*g;  p -= lr*(sign(c) + wd*p);  m = b2*m + (1-b2)*g
# lr=0.1, b1=0.9, b2=0.99: the second coordinate's momentum outweighs its gradient; the
# fourth's c has the sign opposite to b2*m + (1-b2)*g's, the last's the sign opposite to
# that of the c computed from the already updated m (the two usual misreadings); the fifth
# has c = 0 (sign 0: only the decay moves it).
LION_P = [1.0, -2.0, 0.5, 3.0, 0.4, 1.5]
LION_M = [0.2, -0.1, 0.0, 0.05, 0.0, -0.1]
LION_G = [1.0, 0.5, -0.2, -1.0, 0.0, 0.85]
LION_BY_HAND = [  # (hyper-parameters, p after, m after)
    (dict(weight_decay=0.5),  # c = [0.28, -0.04, -0.02, -0.055, 0, -0.005]; p *= 1 - 0.05
     [0.85, -1.8, 0.575, 2.95, 0.38, 1.525], [0.208, -0.094, -0.002, 0.0395, 0.0, -0.0905]),
    (dict(maximize=True),     # g -> -g: c = [0.08, -0.14, 0.02, 0.145, 0, -0.175]
     [0.9, -1.9, 0.4, 2.9, 0.4, 1.6], [0.188, -0.104, 0.002, 0.0595, 0.0, -0.1075]),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("hp,p_after,m_after", LION_BY_HAND, ids=["decay", "maximize"])
def test_lion_matches_a_step_computed_by_hand(hp, p_after, m_after, dtype, backend):
    """A check of Lion independent of lion_reference (a misreading shared by the kernel and
    the reference would pass test_matches_reference)."""
    _, fn, reference = RULES["lion"]
    kw = dict(step=1, lr=0.1, betas=(0.9, 0.99), **hp)
    tol = dict(rtol=1e-12, atol=1e-15) if dtype == np.float64 else dict(rtol=1e-6, atol=1e-7)
    p, m = to_backend(np.array(LION_P, dtype), backend), to_backend(np.array(LION_M, dtype), backend)
    fn(p, to_backend(np.array(LION_G, dtype), backend), m, **kw)
    np.testing.assert_allclose(to_host(p), p_after, **tol)
    np.testing.assert_allclose(to_host(m), m_after, **tol)
    ref_p, ref_m = np.array(LION_P), np.array(LION_M)
    reference(ref_p, np.array(LION_G), ref_m, **kw)
    np.testing.assert_allclose(ref_p, p_after, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(ref_m, m_after, rtol=1e-12, atol=1e-15)

"""CUDA steps decided on the device (issue 15, items 1-2): a guarded or clipped step, and
every step with ``capturable=True``, launches the norm reduction, the prologue and the
updates and copies nothing to the host; the step counts and the lr live on the device.

Run on the simulator (``tests/test_cuda_simulator.py``); sizes are small and odd, and steps
few, because the simulator runs every GPU thread in Python. Two helpers stand in for what
the simulator lacks: a ParamBuffer on the device (CuPy is not there), whose views the
optimizer recognises by their addresses.
"""
import types

import numpy as np
import pytest

import fastopt
from conftest import CUDA
from fastopt import buffer, schedules
from fastopt.kernels import _cuda

cuda = pytest.mark.cuda

SHAPES = [(13, 11), (37,)]  # 180 params in two tensors: odd sizes, two reduction launches
STEPS = 3
# rule -> hyper-parameters exercising its options (the per-step scalars differ between them)
RULES = {
    "adamw": dict(lr=0.01, betas=(0.8, 0.95), weight_decay=0.05),
    "sgd": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "rmsprop": dict(lr=0.01, alpha=0.9, momentum=0.5, centered=True),
}
# how the step decides: the guard, clipping, both
MODES = {"guard": dict(nonfinite="skip"), "clip": dict(nonfinite="propagate", max_grad_norm=0.5),
         "both": dict(nonfinite="skip", max_grad_norm=0.5)}


def _sim():
    from numba.cuda.simulator import kernel
    from numba.cuda.simulator.cudadrv import devicearray
    return kernel, devicearray


@pytest.fixture
def device_buffers(monkeypatch):
    """ParamBuffer(device="cuda") on the simulator: arenas of simulated device memory whose
    views the optimizer recognises by address, as it does CuPy's."""
    if not CUDA:
        pytest.skip("no CUDA device or simulator")
    from numba import config
    if config.ENABLE_CUDASIM:
        _, devicearray = _sim()

        class Raw(devicearray.FakeCUDAArray):
            @property
            def data(self):
                return types.SimpleNamespace(ptr=self._ary.ctypes.data)

        module = types.SimpleNamespace(empty=lambda n, dtype: Raw(np.empty(n, dtype)))
        real = buffer._array_module
        monkeypatch.setattr(buffer, "_array_module", lambda device: module if device == "cuda" else real(device))

    def make(arrays):
        buf = buffer.ParamBuffer(shapes=[a.shape for a in arrays], dtype=arrays[0].dtype, device="cuda")
        _write(buf.params, arrays)
        return buf
    return make


def _write(views, arrays):
    """Host arrays into device views: a simulated array's copy, CuPy's ``set`` on a GPU."""
    for view, a in zip(views, arrays):
        view.copy_to_device(a) if hasattr(view, "copy_to_device") else view.set(a)


class DeviceToHost:
    """Counts what would copy device memory to the host on a GPU: ``copy_to_host``, a
    scalar read of a device array outside a kernel, a host array given to a kernel (the
    simulator, as Numba on a GPU, copies it there and back)."""

    def __init__(self, monkeypatch):
        from numba import config
        if not config.ENABLE_CUDASIM:
            pytest.skip("counts the simulator's copies")
        kernel, devicearray = _sim()
        self.count, self.on = 0, True
        fake = devicearray.FakeCUDAArray
        copy, getitem, call = fake.copy_to_host, fake.__getitem__, kernel.FakeCUDAKernel.__call__

        def counted_copy(array, *args, **kwargs):
            self.count += self.on
            return copy(array, *args, **kwargs)

        def counted_getitem(array, idx):
            out = getitem(array, idx)
            if not kernel._kernel_context and not isinstance(out, fake):
                self.count += self.on
            return out

        def counted_call(k, *args):
            if not k._device and not kernel._kernel_context:
                self.count += self.on * sum(isinstance(a, np.ndarray) and a.ndim > 0 for a in args)
            return call(k, *args)
        monkeypatch.setattr(fake, "copy_to_host", counted_copy)
        monkeypatch.setattr(fake, "__getitem__", counted_getitem)
        monkeypatch.setattr(kernel.FakeCUDAKernel, "__call__", counted_call)

    def stop(self):
        """The count so far; later copies (reading the results) are not counted."""
        self.on = False
        return self.count


def _data(seed, nan_at=None):
    """Initial params and STEPS gradients; the gradient of step ``nan_at`` holds a NaN."""
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in SHAPES] for _ in range(STEPS)]
    if nan_at is not None:
        grads[nan_at][1][5] = np.nan
    return init, grads


def _host(a):
    return a if isinstance(a, np.ndarray) else a.copy_to_host() if hasattr(a, "copy_to_host") else a.get()


def _write_grads(buf, grads):
    _write(buf.grads, grads)


CASES = [(rule, mode, nan) for rule in RULES for mode in MODES for nan in (False, True)]


@cuda
@pytest.mark.parametrize("rule,mode,nan", CASES, ids=[f"{r}-{m}-{'nan' if n else 'finite'}" for r, m, n in CASES])
def test_a_device_decided_step_equals_the_cpu_step_and_copies_nothing(rule, mode, nan, device_buffers, monkeypatch):
    init, grads = _data(len(rule) + len(mode), nan_at=1 if nan else None)
    options = {**RULES[rule], **MODES[mode]}
    cpu = fastopt.OPTIMIZERS[rule](fastopt.ParamBuffer([a.copy() for a in init]), **options)
    buf = device_buffers(init)
    dev = fastopt.OPTIMIZERS[rule](buf, **options)
    _write_grads(buf, grads[0])
    dev.step()  # the first step allocates (host copies allowed): count the later ones
    copies = DeviceToHost(monkeypatch)
    for t, g in enumerate(grads):
        for view, x in zip(cpu._buffer.grads, g):
            view[...] = x
        cpu.step()
        if t:
            _write_grads(buf, g)
            dev.step()
    assert copies.stop() == 0 and dev._dev is not None
    skipping = nan and MODES[mode]["nonfinite"] == "skip"
    assert dev.steps == cpu.steps == STEPS - skipping
    assert dev.skipped_steps == cpu.skipped_steps == int(skipping)
    assert dev.last_step_skipped == cpu.last_step_skipped
    np.testing.assert_allclose(dev.last_grad_norm, cpu.last_grad_norm, rtol=1e-5)
    for a, b in zip(dev._buffer.params, cpu._buffer.params):
        np.testing.assert_allclose(_host(a), b, rtol=2e-5, atol=1e-6, equal_nan=True)
    if mode == "clip" and nan:  # propagate: a NaN norm spreads to every param, as on the CPU
        assert all(np.isnan(_host(a)).all() for a in dev._buffer.params)


@cuda
@pytest.mark.parametrize("mode", list(MODES))
def test_a_skipped_step_writes_nothing(mode, device_buffers, monkeypatch):
    init, grads = _data(3, nan_at=0)
    buf = device_buffers(init)
    opt = fastopt.OPTIMIZERS["adamw"](buf, **{**RULES["adamw"], **MODES[mode], "nonfinite": "skip"})
    _write_grads(buf, grads[1])
    opt.step()
    before = [_host(a).copy() for a in [buf.arena, *opt.arenas.values()]]
    _write_grads(buf, grads[0])
    copies = DeviceToHost(monkeypatch)
    opt.step()
    assert copies.stop() == 0
    after = [_host(a) for a in [buf.arena, *opt.arenas.values()]]
    for x, y in zip(before, after):
        np.testing.assert_array_equal(x.view(np.uint32), y.view(np.uint32))
    assert (opt.steps, opt.skipped_steps, opt.last_step_skipped) == (1, 1, True)
    assert np.isnan(opt.last_grad_norm)


@cuda
@pytest.mark.parametrize("rule,mode", [("adamw", "both"), ("sgd", "guard")])
def test_device_decided_steps_equal_host_decided_cuda_steps_bit_for_bit(rule, mode, device_buffers, monkeypatch):
    """The same reduction, the same float64 combination and scalars, rounded to float32 once:
    deciding on the device changes no bit. The host-decided steps copy the norm's partials
    to the host each step (the counter sees them)."""
    init, grads = _data(11, nan_at=1)
    runs, counts = [], []
    for device_decides in (True, False):
        if not device_decides:
            monkeypatch.setattr(fastopt.Optimizer, "_device_decides", lambda self, scaler=False: False)
        buf = device_buffers(init)
        opt = fastopt.OPTIMIZERS[rule](buf, **{**RULES[rule], **MODES[mode]})
        _write_grads(buf, grads[0])
        opt.step()
        copies = DeviceToHost(monkeypatch)
        for g in grads[1:]:
            _write_grads(buf, g)
            opt.step()
        counts.append(copies.stop())
        assert (opt._dev is not None) == device_decides
        runs.append([_host(a) for a in [buf.arena, *opt.arenas.values()]] + [opt.last_grad_norm, opt.steps])
    assert counts[0] == 0 and counts[1] >= len(grads) - 1
    for x, y in zip(*runs):
        np.testing.assert_array_equal(x, y)


@cuda
@pytest.mark.parametrize("mode", ["scaler-only", "guard", "clip"])
def test_an_amp_scalers_scale_and_inf_flag_are_read_on_the_device(mode, device_buffers, monkeypatch):
    """GradScaler's ``grad_scale`` and ``found_inf`` as torch's fused optimizers take them:
    on CUDA the prologue reads them (no copy to the host, even with no guard nor clipping);
    on the CPU the host reads them. Both runs get the scaled gradients; step 1's inf flag
    skips it everywhere."""
    from numba import cuda as numba_cuda
    init, grads = _data(5)
    loss_scale = np.float32(1024.0)
    options = {**RULES["adamw"], **MODES.get(mode, dict(nonfinite="propagate"))}
    cpu = fastopt.AdamW(fastopt.ParamBuffer([a.copy() for a in init]), **options)
    buf = device_buffers(init)
    dev = fastopt.AdamW(buf, **options)
    on_device = numba_cuda.to_device(np.array([loss_scale]))
    flags = [np.array([v], np.float32) for v in (0.0, 1.0, 0.0)]
    device_flags = [numba_cuda.to_device(f) for f in flags]
    copies = None
    for t, g in enumerate(grads):
        scaled = [x * loss_scale for x in g]
        for view, x in zip(cpu._buffer.grads, scaled):
            view[...] = x
        cpu.step(loss_scale=np.array([loss_scale]), found_inf=flags[t])
        _write_grads(buf, scaled)
        if t == 1:  # the first step allocates (host copies allowed): count the later ones
            copies = DeviceToHost(monkeypatch)
        dev.step(loss_scale=on_device, found_inf=device_flags[t])
    assert copies.stop() == 0 and dev._dev is not None
    assert (dev.steps, dev.skipped_steps) == (cpu.steps, cpu.skipped_steps) == (STEPS - 1, 1)
    assert not dev.last_step_skipped and not cpu.last_step_skipped
    for a, b in zip(dev._buffer.params, cpu._buffer.params):
        np.testing.assert_allclose(_host(a), b, rtol=2e-5, atol=1e-6)
    if mode != "scaler-only":  # the norm of the unscaled gradients
        np.testing.assert_allclose(dev.last_grad_norm, cpu.last_grad_norm, rtol=1e-5)
        assert cpu.last_grad_norm == pytest.approx(fastopt.clip.grad_norm(grads[-1]), rel=1e-6)


@cuda
@pytest.mark.parametrize("mode", ["guard", "clip"])
def test_no_norm_before_a_first_step_the_scaler_skips(mode, device_buffers):
    """A first step skipped by the scaler's inf flag computes no norm on the CPU: None there
    and on the device alike (the device's status slot held NaN for "none yet")."""
    init, grads = _data(7)
    options = {**RULES["adamw"], **MODES[mode]}
    cpu = fastopt.AdamW(fastopt.ParamBuffer([a.copy() for a in init]), **options)
    buf = device_buffers(init)
    dev = fastopt.AdamW(buf, **options)
    _write_grads(buf, grads[0])
    scaler = dict(loss_scale=np.ones(1, np.float32), found_inf=np.ones(1, np.float32))
    cpu.step(**scaler)
    dev.step(**scaler)
    assert cpu.last_grad_norm is None and dev.last_grad_norm is None
    assert dev.last_step_skipped and dev.skipped_steps == 1


def test_an_amp_scaler_value_must_be_one_element():
    opt = fastopt.AdamW(fastopt.ParamBuffer([np.zeros(3, np.float32)]))
    for name in ("loss_scale", "found_inf"):
        with pytest.raises(ValueError, match=f"{name} must be a one-element array"):
            opt.step(**{name: np.ones(2, np.float32)})
    assert opt.steps == 0


def _host_lr(t):  # a callable only the host evaluates: its steps are decided on the host
    return 0.02


# per step: (an AMP scaler given, its found_inf, an edit of the group before the step). The device
# decides a step given a scaler; the host one with neither a scaler nor a guard or clipping, or
# with an lr only it can evaluate
SWITCHES = {
    "device-host-device": [(True, 0, None), (False, 0, None), (True, 0, None)],
    "host-edit-device": [(True, 0, None), (False, 0, ("weight_decay", 0.5)), (True, 0, None)],
    "host-skip-device": [(True, 0, None), (True, 1, ("lr", _host_lr)), (True, 0, ("lr", 0.01))],
}


@cuda
@pytest.mark.parametrize("switch", SWITCHES)
def test_steps_decided_on_the_host_and_on_the_device_alternate_as_on_the_cpu(switch, device_buffers):
    """The step counts, the skip count and the settings edited before a step decided on the
    host carry over to the steps the device decides after it."""
    init, grads = _data(3)
    options = dict(lr=0.01, weight_decay=0.0, nonfinite="propagate")
    cpu = fastopt.AdamW(fastopt.ParamBuffer([a.copy() for a in init]), **options)
    buf = device_buffers(init)
    dev = fastopt.AdamW(buf, **options)
    for (scaler, found_inf, edit), g in zip(SWITCHES[switch], grads):
        for opt in (cpu, dev):
            if edit:
                opt.param_groups[0][edit[0]] = edit[1]
        for view, x in zip(cpu._buffer.grads, g):
            view[...] = x
        _write_grads(buf, g)
        kwargs = dict(loss_scale=np.ones(1, np.float32), found_inf=np.array([found_inf], np.float32)) if scaler \
            else {}
        cpu.step(**kwargs)
        dev.step(**kwargs)
    assert (dev.steps, dev.skipped_steps) == (cpu.steps, cpu.skipped_steps)
    assert dev.state_dict()["state"][0]["step"] == cpu.state_dict()["state"][0]["step"]
    for a, b in zip(dev._buffer.params, cpu._buffer.params):
        np.testing.assert_allclose(_host(a), b, rtol=1e-6, atol=1e-7)


@cuda
def test_state_dict_reads_the_device_step_counts(device_buffers):
    init, grads = _data(5, nan_at=2)
    buf = device_buffers(init)
    opt = fastopt.OPTIMIZERS["adamw"](buf, **RULES["adamw"])
    for g in grads:
        _write_grads(buf, g)
        opt.step()
    state = opt.state_dict()
    assert {e["step"] for e in state["state"].values()} == {STEPS - 1.0}
    again = fastopt.OPTIMIZERS["adamw"](device_buffers(init), **RULES["adamw"])
    again.load_state_dict(state)
    assert again.steps == STEPS - 1


# -- capturable=True ---------------------------------------------------------------------

class Recorder:
    """Records the kernel launches of one step (kernel, configuration, arguments) so that
    they can be replayed as a CUDA graph replays them: the same arguments every time."""

    def __init__(self, monkeypatch):
        self.launches, self.on = [], False
        configured = _cuda._configured

        def recording(kernel, grid, threads, stream):
            launcher = configured(kernel, grid, threads, stream)
            if not self.on:
                return launcher

            def launch(*args):
                self.launches.append((launcher, args))
                launcher(*args)
            return launch
        monkeypatch.setattr(_cuda, "_configured", recording)
        monkeypatch.setattr(_cuda, "_BY_SIZE", {})  # configured launchers would bypass the recording

    def replay(self):
        for launcher, args in self.launches:
            launcher(*args)


@cuda
def test_capturable_steps_replayed_equal_ordinary_steps(device_buffers, monkeypatch):
    """One step recorded and replayed (a graph's replay) with new gradients written into the
    same grad arena: the step counts advance and the warm-up + cosine schedule moves on the
    device; every param and state bit equals that of ordinary steps."""
    steps = 7
    rng = np.random.default_rng(2)
    init = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in SHAPES] for _ in range(steps)]
    grads[4][0][0, 0] = np.inf  # skipped on the device: the count and schedule stay
    lr = schedules.warmup_cosine(0.05, 2, 5, final=0.001)
    options = dict(lr=lr, betas=(0.8, 0.95), weight_decay=0.05, max_grad_norm=2.0, capturable=True)
    plain_buf, graph_buf = device_buffers(init), device_buffers(init)
    plain = fastopt.AdamW(plain_buf, **options)
    graph = fastopt.AdamW(graph_buf, **options)
    for g in grads:
        _write_grads(plain_buf, g)
        plain.step()
    _write_grads(graph_buf, grads[0])
    graph.step()  # warm-up step: allocates the state (torch's capturable needs one too)
    recorder = Recorder(monkeypatch)
    copies = DeviceToHost(monkeypatch)
    _write_grads(graph_buf, grads[1])
    recorder.on = True
    graph.step()
    recorder.on = False
    assert len(recorder.launches) == len(SHAPES) + 2  # a reduction per tensor, the prologue, one update
    for g in grads[2:]:
        _write_grads(graph_buf, g)
        recorder.replay()
    assert copies.stop() == 0
    assert graph.steps == plain.steps == steps - 1 and graph.skipped_steps == plain.skipped_steps == 1
    assert graph.lr == plain.lr == lr(steps - 1)
    for x, y in zip([graph_buf.arena, *graph.arenas.values()], [plain_buf.arena, *plain.arenas.values()]):
        np.testing.assert_array_equal(_host(x), _host(y))


@cuda
def test_capturable_steps_equal_the_cpu_with_a_schedule(device_buffers):
    init, grads = _data(8)
    lr = schedules.warmup_cosine(0.05, 1, 3)
    cpu = fastopt.SGD(fastopt.ParamBuffer([a.copy() for a in init]), lr=lr, momentum=0.9)
    buf = device_buffers(init)
    dev = fastopt.SGD(buf, lr=lr, momentum=0.9, capturable=True, nonfinite="propagate")
    for g in grads:
        for view, x in zip(cpu._buffer.grads, g):
            view[...] = x
        cpu.step()
        _write_grads(buf, g)
        dev.step()
    assert dev._dev is not None and dev.steps == cpu.steps and dev.lr == cpu.lr
    for a, b in zip(dev._buffer.params, cpu._buffer.params):
        np.testing.assert_allclose(_host(a), b, rtol=1e-6, atol=1e-7)


# -- capturable=True refused where a step would need the host: named errors ----------------
@pytest.mark.parametrize("options,names", [
    (dict(lr=0.01), "CPU"),
    (dict(lr=lambda t: 0.01), "lr is a callable"),
    (dict(lr=schedules.join([schedules.constant(0.01), lambda t: 0.001], [3])), "lr is a callable"),
])
def test_capturable_is_refused_with_a_named_reason(options, names):
    with pytest.raises(ValueError, match=names) as e:
        fastopt.AdamW([np.zeros(5, np.float32)], **options, capturable=True)
    assert "capturable=True" in str(e.value)


@cuda
def test_a_host_only_lr_set_after_construction_is_refused_before_any_launch():
    from numba import cuda as numba_cuda
    opt = fastopt.AdamW([numba_cuda.to_device(np.ones(7, np.float32))], lr=0.01, capturable=True)
    opt.param_groups[0]["lr"] = lambda t: 0.01
    with pytest.raises(ValueError, match="param group 0: lr is a callable"):
        opt.step([numba_cuda.to_device(np.ones(7, np.float32))])
    assert opt.launches == 0 and opt.steps == 0

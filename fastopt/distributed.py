"""Past one machine: ZeRO stage 1 (sharded optimizer state) and data-parallel steps over MPI.

``ShardedOptimizer(fastopt.AdamW, buf, comm=MPI.COMM_WORLD, lr=1e-3)`` keeps, on each of the
R ranks of ``comm``, the optimizer state of one contiguous slice of the ParamBuffer's arena
(1/R of it) and steps the whole model with every rank's gradient averaged in:

1. ``Reduce_scatter_block`` of the grad arena (SUM): rank r receives the summed gradient of
   its slice only, then divides it by R (sum, then average);
2. with ``nonfinite`` "skip" / "raise" or ``max_grad_norm``: each rank reduces its slice
   (the params' spans only, as one process does: neither the alignment gaps between params
   nor the tail padding count) to ``sum g**2`` and a non-finite flag, and one
   ``Allreduce`` of these two numbers gives every rank the global norm and flag, hence the
   same decision: skip, raise, or clip (the factor is applied inside the update kernel, as on
   one process);
3. the wrapped optimizer's fused update of the slice: one launch per param group, over the
   pieces of the params that fall in the slice;
4. ``Allgather`` of the updated slices into the arena.

Shards: the arena of N elements is cut into R slices of S = ceil(N / R) elements, S rounded
up to a cache line (16 float32) so that every slice starts aligned; rank r owns
``[r S, min((r + 1) S, N))``. The R S - N elements past the arena are padding: zeros in the
staging buffers (a rule leaves zero params with zero gradients at zero), never in a norm
(the norm covers the params' spans), never written back. The state of rank r is the
wrapped optimizer's over its pieces: 1/R of one process's, up to one cache line.

Reduction order: the sum over ranks is MPI's (MPICH picks its reduce-scatter algorithm by
message size and R; for R = 2 the sum is exact to order, for R >= 3 it may differ from rank
order in the last bit); for the same R and sizes the order is fixed, so runs repeat bit for
bit. The norm's partials are summed by the Allreduce in float64.

Buffers go through mpi4py's buffer interface (no pickling). A CuPy-backed buffer is passed
to MPI directly when the library reports CUDA support (``MPI.Query_cuda_support()``), and
staged through host copies otherwise (correct, but two extra PCIe copies per step).

Failures: with ``timeout`` (seconds, default 300) every collective is non-blocking and waited
for with a deadline: a rank that never joins (stopped, hung, or killed where the launcher
does not clean up) makes the others raise :class:`CollectiveTimeout`; they should then call
``comm.Abort()`` (``fastopt train`` does), since MPI cannot finish a collective a member will
never join. A rank that dies under ``mpiexec`` (Hydra) is noticed by the launcher itself,
which kills the other ranks at once (``BAD TERMINATION ... CLEANING UP REMAINING PROCESSES``).

Checkpoints: :func:`save_sharded` writes one file per rank (its state slice and param slice)
and then one manifest that names them (file, range, size, SHA-256) and is published by one
rename; :func:`load_sharded` checks all of it on every rank before anything is written and
re-shards when the number of ranks differs.

This module imports without mpi4py; using it without mpi4py raises :class:`MPIUnavailable`.
"""
import contextlib
import hashlib
import io
import json
import math
import os
import threading
import time
import uuid

import numpy as np

from .buffer import ALIGN, ParamBuffer, _cupy, find_segment
from .checkpoint import atomic_write, carried_problems
from .clip import NormPlan, clip_coefficient
from .kernels import _formats
from .optimizer import MASTER, GuardOptions, Optimizer

MANIFEST_FORMAT = "fastopt-sharded-checkpoint-1"
SHARD_FORMAT = "fastopt-shard-1"
DEFAULT_TIMEOUT = 300.0


class MPIUnavailable(ImportError):
    """mpi4py (and an MPI library) is not installed: ``pip install fastopt[mpi]``."""


class NotShardable(TypeError):
    """The optimizer's rule needs more than element-wise state (LAMB's and LARS's per-tensor
    norms cross shard boundaries), or the params are not views of one ParamBuffer."""


class CollectiveTimeout(RuntimeError):
    """A collective did not complete within the timeout: another rank died, hung or stopped."""


class ShardError(ValueError):
    """A sharded checkpoint is missing a shard, or a shard does not match its manifest."""


def mpi():
    """mpi4py's ``MPI`` module, or :class:`MPIUnavailable` naming the install."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise MPIUnavailable(f"fastopt.distributed needs mpi4py and an MPI library ({e}): "
                             'pip install "fastopt[mpi]" (mpi4py and the mpich wheel)') from None
    return MPI


def in_mpi_launch():
    """Whether this process was started by an MPI launcher with more than one rank (Hydra,
    Open MPI, Slurm's PMI): the environment tells, without initializing MPI."""
    for key in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "PMIX_SIZE"):
        value = os.environ.get(key)
        if value is not None:
            try:
                return int(value) > 1
            except ValueError:
                continue
    return False


def shard_bounds(n, ranks, dtype):
    """``(S, [(lo, hi) per rank])``: slices of S elements, S = ceil(n / ranks) rounded up to
    a cache line, the last ones cut at ``n`` (possibly empty)."""
    align = ALIGN // np.dtype(dtype).itemsize
    per_rank = -(-n // ranks)
    size = -(-per_rank // align) * align
    return size, [(min(r * size, n), min((r + 1) * size, n)) for r in range(ranks)]


class ShardedOptimizer(GuardOptions):
    """``cls`` (a :class:`fastopt.Optimizer` with element-wise state: SGD, Adam, AdamW,
    Lion, ...) over ``params`` (a ParamBuffer, or param groups of its views, as ``cls``
    takes them), its state sharded over ``comm``'s ranks. ``*args`` and ``**kwargs`` are
    ``cls``'s (``lr``, ``betas``, ``max_grad_norm``, ``nonfinite``, ...). Every rank
    builds it with the same model and arguments, writes its own gradient into the buffer's
    grad arena and calls :meth:`step` (a collective).

    ``timeout``: seconds a collective may wait for the other ranks before
    :class:`CollectiveTimeout` (None: MPI's blocking calls, which wait forever).
    ``timings`` accumulates seconds per phase (reduce_scatter, norm, update, allgather)."""

    def __init__(self, cls, params, *args, comm=None, timeout=DEFAULT_TIMEOUT, **kwargs):
        MPI = mpi()
        self._MPI = MPI
        if not (isinstance(cls, type) and issubclass(cls, Optimizer) and cls.rule is not None):
            raise NotShardable(f"{getattr(cls, '__name__', cls)!r} is not a fastopt.Optimizer class with a rule")
        from .layerwise import LAMB, LARS
        if issubclass(cls, (LAMB, LARS)):
            raise NotShardable(f"{cls.__name__} scales each tensor by a ratio of per-tensor norms, which cross "
                               "shard boundaries: it cannot be sharded here (use an element-wise rule: SGD, "
                               "Adam, AdamW, Lion, ...)")
        if kwargs.get("state_bits") == 8:
            raise NotShardable("state_bits=8: 8-bit blockwise state is laid out per tensor, not per element, so "
                               "it cannot be cut into shards here (shard 32-bit or 16-bit state)")
        self.max_grad_norm = kwargs.pop("max_grad_norm", None)  # checked (GuardOptions)
        self.nonfinite = kwargs.pop("nonfinite", "skip")
        self.cls, self.comm = cls, comm if comm is not None else MPI.COMM_WORLD
        self.timeout = timeout
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        groups = self._user_groups(params)
        buf = self.buffer
        if buf.dtype == _formats.BFLOAT16:
            raise NotShardable("bfloat16 params: MPI has no bfloat16 sum to average the gradients with (use "
                               "float32 or float16 params, or float32 params with state_dtype='bfloat16')")
        self.xp = np if buf.device == "cpu" else _cupy()
        self.dtype = buf.dtype
        self.n = int(buf.arena.size)
        self.shard_size, self.bounds = shard_bounds(self.n, self.size, self.dtype)
        self.lo, self.hi = self.bounds[self.rank]
        S, total = self.shard_size, self.shard_size * self.size
        xp = self.xp
        # the rank's slice of the params (copied from the arena before each update, updated in
        # place by the wrapped optimizer) and of the averaged gradient; both S long, zero past the arena
        self.param_shard, self.grad_shard = xp.zeros(S, self.dtype), xp.zeros(S, self.dtype)
        self.param_shard[:self.hi - self.lo] = buf.arena[self.lo:self.hi]
        padded = total != self.n
        self._grad_send = xp.zeros(total, self.dtype) if padded else None
        self._param_recv = xp.zeros(total, self.dtype) if padded else None
        self._stage = buf.device != "cpu" and not _cuda_aware(MPI)
        # the wrapped optimizer over the pieces of each group's params that fall in the slice
        self._grads, self._group_pieces = [], []  # every piece's gradient; pieces per group
        self._pieces = []  # per piece, in the wrapped optimizer's order: (param index, lo, hi) in the arena
        inner_groups = []
        for group, indices in groups:
            params, grads = [], []
            for i in indices:
                o, size = buf.offsets[i], int(np.prod(buf.shapes[i], dtype=np.int64))
                a, b = max(o, self.lo), min(o + size, self.hi)
                if a < b:
                    params.append(self.param_shard[a - self.lo:b - self.lo])
                    grads.append(self.grad_shard[a - self.lo:b - self.lo])
                    self._pieces.append((i, a, b))
            if not params:  # no element of this group here: an empty piece keeps the group (and its steps)
                params.append(xp.zeros(0, self.dtype))
                grads.append(xp.zeros(0, self.dtype))
                self._pieces.append((None, 0, 0))
            inner_groups.append({**group, "params": params})
            self._grads += grads
            self._group_pieces.append(len(params))
        self.inner = cls(inner_groups, *args, **kwargs, max_grad_norm=None, nonfinite="propagate")
        # laid out whether guarded or not: the guard or clipping may be turned on between steps
        self._norm_plan = NormPlan([g for g in self._grads if g.size])
        self.lock = threading.RLock()
        self.last_grad_norm, self.last_step_skipped, self.skipped_steps = None, False, 0
        self.timings = dict.fromkeys(("reduce_scatter", "norm", "update", "allgather"), 0.0)
        self._groups = groups

    @classmethod
    def from_optimizer(cls_, opt, comm=None, timeout=DEFAULT_TIMEOUT):
        """The sharded twin of ``opt`` (an optimizer over a ParamBuffer's views that has not
        stepped yet): same class, param groups, hyper-parameters and options."""
        fixed = opt.rule.fixed
        groups = [{k: v for k, v in g.items() if k not in fixed} for g in opt.param_groups]
        return cls_(type(opt), groups, comm=comm, timeout=timeout, max_grad_norm=opt.max_grad_norm,
                    nonfinite=opt.nonfinite)

    # -- data parallel: what a training loop needs besides the step ---------------------------
    def local_batch(self, *arrays):
        """This rank's contiguous slice of a global batch (rank r: rows [r n / R, (r + 1) n / R))."""
        n = len(arrays[0])
        lo, hi = n * self.rank // self.size, n * (self.rank + 1) // self.size
        return tuple(a[lo:hi] for a in arrays)

    def sum_over_ranks(self, values):
        """``values`` (a float64 host array) summed over the ranks, in place (one Allreduce)."""
        out = np.empty_like(values)
        self._collective("allreduce of the metrics", self.comm.Iallreduce, self.comm.Allreduce, values, out,
                         self._MPI.SUM, staged=False)
        values[...] = out
        return values

    def _user_groups(self, params):
        """``[(group dict without params, [segment index of each param])]``; sets ``buffer``."""
        if isinstance(params, ParamBuffer):
            params = [{"params": params}]
        params = list(params)
        if params and not isinstance(params[0], dict):
            params = [{"params": params}]
        self.buffer, out, seen = None, [], set()
        for k, group in enumerate(params):
            arrays = group["params"]
            if isinstance(arrays, ParamBuffer):
                arrays = arrays.params
            indices = []
            for a in ([arrays] if hasattr(arrays, "shape") else list(arrays)):
                found = find_segment(a)
                if found is None or (self.buffer is not None and found[0] is not self.buffer):
                    raise NotShardable(f"param group {k}: a sharded optimizer takes the views of one ParamBuffer "
                                       "(its arena is what is cut into shards)")
                self.buffer = found[0]
                if found[1] in seen:
                    raise ValueError(f"param group {k}: param {found[1]} of the buffer is listed twice")
                seen.add(found[1])
                indices.append(found[1])
            out.append(({key: v for key, v in group.items() if key != "params"}, indices))
        if self.buffer is None:
            raise ValueError("params is empty: the optimizer got no parameters")
        return out

    @property
    def _guarded(self):
        return self.max_grad_norm is not None or self.nonfinite != "propagate"

    # -- what the wrapped class offers -------------------------------------------------------
    @property
    def param_groups(self):
        """The wrapped optimizer's groups (their ``params`` are this rank's pieces); edit
        hyper-parameters here as on one process, the same way on every rank."""
        return self.inner.param_groups

    @property
    def lr(self):
        return self.inner.lr

    @property
    def lrs(self):
        return self.inner.lrs

    @property
    def steps(self):
        return self.inner.steps

    @property
    def launches(self):
        return self.inner.launches

    @property
    def defaults(self):
        return self.inner.defaults

    @property
    def rule(self):
        return self.cls.rule

    def zero_grad(self):
        self.buffer.zero_grad()

    def state_bytes(self):
        """Bytes of optimizer state this rank holds (its arenas; 0 before the first step)."""
        return sum(int(a.nbytes) for a in (self.inner.arenas or {}).values())

    def comm_bytes_per_step(self):
        """Bytes one rank sends per step (reduce-scatter + allgather, ring algorithms:
        (R - 1) S elements each; the norm's 16-byte allreduce aside)."""
        return 2 * (self.size - 1) * self.shard_size * self.dtype.itemsize

    # -- the step ------------------------------------------------------------------------------
    def step(self):
        """One data-parallel update (a collective: every rank calls it)."""
        with self.lock:
            self._step()

    def _step(self):
        MPI, t = self._MPI, time.perf_counter()
        arena, grad_arena = self.buffer.arena, self.buffer.grad_arena
        send = grad_arena
        if self._grad_send is not None:
            self._grad_send[:self.n] = grad_arena
            send = self._grad_send
        self._collective("reduce-scatter of the gradients", self.comm.Ireduce_scatter_block,
                         self.comm.Reduce_scatter_block, send, self.grad_shard, MPI.SUM)
        self.grad_shard /= self.dtype.type(self.size)  # the sum, then the average
        t1 = time.perf_counter()
        self.timings["reduce_scatter"] += t1 - t
        scale = 1.0
        if self._guarded:
            local, finite = self._norm_plan.norm(2.0) if self._norm_plan.arrays else (0.0, True)
            mine = np.array([local * local, 0.0 if finite else 1.0])
            both = np.empty(2)
            self._collective("allreduce of the gradient norm", self.comm.Iallreduce, self.comm.Allreduce,
                             mine, both, MPI.SUM, staged=False)
            total, finite = math.sqrt(both[0]) if both[1] == 0 else math.nan, both[1] == 0
            self.last_grad_norm = total
            self.timings["norm"] += time.perf_counter() - t1
            if not finite and self.nonfinite == "raise":
                raise FloatingPointError("a gradient holds inf or NaN (nonfinite='raise'): nothing was updated "
                                         "on any rank")
            if not finite and self.nonfinite == "skip":
                self.last_step_skipped = True
                self.skipped_steps += 1
                return
            if self.max_grad_norm is not None:
                scale = clip_coefficient(total, self.max_grad_norm)  # applied inside the update kernel
        t2 = time.perf_counter()
        # the arena is the params' truth between steps (a checkpoint load, an EMA swap may write it)
        self.param_shard[:self.hi - self.lo] = arena[self.lo:self.hi]
        self.inner.step(self._grads, grad_scale=scale)
        self.last_step_skipped = False
        t3 = time.perf_counter()
        self.timings["update"] += t3 - t2
        recv = arena if self._param_recv is None else self._param_recv
        self._collective("allgather of the parameters", self.comm.Iallgather, self.comm.Allgather,
                         self.param_shard, recv)
        if self._param_recv is not None:
            arena[...] = self._param_recv[:self.n]
        self.timings["allgather"] += time.perf_counter() - t3

    def _collective(self, what, nonblocking, blocking, send, recv, *op, staged=True):
        """Run one collective on ``send`` -> ``recv``: host-staged for device arrays without a
        CUDA-aware MPI; with a deadline (:class:`CollectiveTimeout`) when ``timeout`` is set."""
        if staged and self._stage:
            host_recv = np.empty(recv.shape, recv.dtype)
            self._collective(what, nonblocking, blocking, send.get(), host_recv, *op, staged=False)
            recv.set(host_recv)
            return
        if self.timeout is None:
            blocking(send, recv, *op)
            return
        request = nonblocking(send, recv, *op)
        wait(request, self.timeout, f"rank {self.rank} of {self.size}: the {what} (step {self.inner.steps + 1})")

    # -- state --------------------------------------------------------------------------------
    def _shard_state(self):
        """``(export, {state name: this rank's S-element slice of the state arena})``."""
        export = self.inner.export_state()
        local = {}
        for name, arena in export["arenas"].items():
            out = np.zeros(self.shard_size, _staged_dtype(self, name))
            for (i, a, b), off in zip(self._pieces, export["offsets"]):
                if i is not None:
                    out[a - self.lo:b - self.lo] = arena[off:off + b - a]
            local[name] = out
        return export, local

    def state_dict(self):
        """The state dict one process running ``cls`` over the whole buffer would have (same
        layout, param indices and values), gathered from every rank: a collective, and it
        holds the whole state on every rank (for big models use :func:`save_sharded`)."""
        with self.lock:
            export, local = self._shard_state()
            full = {}
            for name in sorted(local):
                recv = np.empty(self.shard_size * self.size, local[name].dtype)
                self._collective(f"allgather of state {name!r}", self.comm.Iallgather, self.comm.Allgather,
                                 local[name], recv, staged=False)
                full[name] = recv[:self.n]
            buf, state, groups, first = self.buffer, {}, [], 0
            for k, ((_, indices), g, t, restart, running) in enumerate(zip(
                    self._groups, self.inner.param_groups, export["steps"], export["restarts"], export["running"])):
                kept = self.inner.saved_states(k, restart)  # as one process's state dict keeps them
                kept.add(MASTER)  # float16 params' float32 copy, as one process's state dict holds it
                # params numbered in group order, as one process over these groups numbers them
                ids = list(range(first, first + len(indices)))
                first += len(indices)
                groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": ids})
                if t:
                    for j, i in zip(ids, indices):
                        o, shape = buf.offsets[i], buf.shapes[i]
                        size = int(np.prod(shape, dtype=np.int64))
                        state[j] = {"step": float(t), **{n: full[n][o:o + size].reshape(shape).copy()
                                                         for n in sorted(kept) if n in full}, **running}
            return {"state": state, "param_groups": groups, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict):
        """Load a state dict of ``cls`` over the whole buffer (one process's, or
        :meth:`state_dict`'s): each rank takes its slice. A collective: every rank checks
        (as ``cls.load_state_dict`` does) before any rank writes."""
        with self.lock:
            problem, pieces = None, None
            try:
                pieces = self._pieces_state_dict(state_dict)
                checked = self.inner._read_state_dict(pieces)
            except (ValueError, TypeError, KeyError) as e:
                problem = e
            self._agree(problem, "the state dict")
            self.inner.restore(*checked)
            skipped = checked[4]  # checked with the rest; counted by the wrapper (its inner optimizer never skips)
            if skipped is not None:
                self.skipped_steps = skipped

    def _pieces_state_dict(self, sd):
        """A full state dict cut to this rank's pieces (the wrapped optimizer's layout)."""
        groups, state = sd["param_groups"], sd["state"]
        if len(groups) != len(self._groups):
            raise ValueError(f"the state dict has {len(groups)} param groups, this optimizer {len(self._groups)}")
        buf, new_groups, new_state, j = self.buffer, [], {}, 0
        for k, (saved, (_, indices)) in enumerate(zip(groups, self._groups)):
            listed = list(saved["params"])
            if len(listed) != len(indices):
                raise ValueError(f"param group {k} has {len(listed)} params in the state dict, {len(indices)} here")
            entries = {i: state.get(s, state.get(str(s))) for s, i in zip(listed, indices)}
            ids = []
            for i, a, b in self._pieces[j:j + self._group_pieces[k]]:
                entry = entries.get(i) if i is not None else next((e for e in entries.values() if e), None)
                out = {}
                for name, value in (entry or {}).items():
                    if name == "step" or value is None or name in self.inner.rule.running:
                        out[name] = value  # a count, or a running scalar (NAdam's mu_product): every piece's
                        continue
                    value = np.asarray(value)
                    if i is None:
                        out[name] = value.reshape(-1)[:0]
                        continue
                    if tuple(value.shape) != tuple(buf.shapes[i]):
                        raise ValueError(f"state {name!r} of param {i} has shape {tuple(value.shape)}, the param "
                                         f"{tuple(buf.shapes[i])}")
                    o = buf.offsets[i]
                    out[name] = value.reshape(-1)[a - o:b - o]
                new_state[j] = out
                ids.append(j)
                j += 1
            new_groups.append({**saved, "params": ids})
        return {"state": new_state, "param_groups": new_groups, "skipped_steps": sd.get("skipped_steps")}

    def _agree(self, problem, what):
        """Every rank learns whether any rank found a problem; all raise if one did."""
        flags = np.zeros(self.size, np.int32)
        mine = np.array([1 if problem is not None else 0], np.int32)
        self._collective("allgather of a check", self.comm.Iallgather, self.comm.Allgather, mine, flags,
                         staged=False)
        if problem is not None:
            raise type(problem)(f"rank {self.rank}: {problem}") from None
        if flags.any():
            bad = ", ".join(str(r) for r in np.nonzero(flags)[0])
            raise ShardError(f"rank(s) {bad} found a problem with {what} (see their error); nothing was written")

    def __repr__(self):
        return (f"ShardedOptimizer({self.cls.__name__}, rank {self.rank} of {self.size}, "
                f"arena [{self.lo}, {self.hi}) of {self.n})")


def wait(request, timeout, what):
    """Wait for ``request`` at most ``timeout`` seconds (spinning on ``Test`` for the first
    millisecond, then sleeping up to 1 ms between tests: the cores may be shared)."""
    start = time.perf_counter()
    pause = 0.0
    while not request.Test():
        elapsed = time.perf_counter() - start
        if elapsed > timeout:
            raise CollectiveTimeout(f"{what} did not complete in {timeout:g} s: another rank died, hung or "
                                    "stopped before joining it (call comm.Abort() to end the job)")
        if elapsed > 1e-3:
            pause = min(1e-3, pause * 2 or 1e-5)
            time.sleep(pause)


def _cuda_aware(MPI):
    try:
        return bool(MPI.Query_cuda_support())
    except (AttributeError, NotImplementedError):
        return False


# -- checkpoints ---------------------------------------------------------------------------------
def manifest_path(folder, name="optimizer"):
    return os.path.join(os.fspath(folder), f"{name}.manifest.json")


def save_sharded(folder, opt, name="optimizer"):
    """Write ``opt``'s state (and the params) to ``folder``: a collective. Each rank writes
    ``<name>.<tag>.rank<r>-of-<R>.npz`` (its state slice and param slice, atomically), then
    rank 0 publishes ``<name>.manifest.json`` (one atomic rename) naming every shard with its
    range, size and SHA-256, and removes the shards of the manifest it replaced. A crash
    before the rename leaves the previous checkpoint whole. Returns the manifest's path."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    with opt.lock:
        tag = np.frombuffer(uuid.uuid4().hex[:16].encode(), np.uint8).copy() if opt.rank == 0 \
            else np.zeros(16, np.uint8)
        _bcast(opt, tag)
        tag = tag.tobytes().decode()
        export, local = opt._shard_state()
        lo, hi = opt.lo, opt.hi
        arrays = {f"state.{k}": v[:hi - lo] for k, v in local.items()}
        arrays["params"] = np.asarray(opt.param_shard[:hi - lo]) if opt.xp is np else opt.param_shard[:hi - lo].get()
        meta = {"format": SHARD_FORMAT, "tag": tag, "rank": opt.rank, "ranks": opt.size, "lo": lo, "hi": hi}
        arrays["meta"] = np.array(json.dumps(meta))
        file = f"{name}.{tag}.rank{opt.rank}-of-{opt.size}.npz"
        problem, digest = None, np.zeros(40, np.uint8)
        try:
            data = io.BytesIO()
            np.savez(data, **arrays)
            data = data.getvalue()
            atomic_write(os.path.join(folder, file), lambda f: f.write(data))
            digest[:8] = np.frombuffer(np.int64(len(data)).tobytes(), np.uint8)
            digest[8:] = np.frombuffer(hashlib.sha256(data).digest(), np.uint8)
        except OSError as e:
            problem = e
        opt._agree(problem, "writing the shards")
        digests = np.zeros((opt.size, 40), np.uint8)
        opt._collective("allgather of the shard digests", opt.comm.Iallgather, opt.comm.Allgather, digest, digests,
                        staged=False)
        path = manifest_path(folder, name)
        problem = None
        if opt.rank == 0:
            try:
                old = _read_json(path) if os.path.exists(path) else None
                shards = [{"file": f"{name}.{tag}.rank{r}-of-{opt.size}.npz", "rank": r, "lo": a, "hi": b,
                           "bytes": int(np.frombuffer(digests[r, :8].tobytes(), np.int64)[0]),
                           "sha256": digests[r, 8:].tobytes().hex()} for r, (a, b) in enumerate(opt.bounds)]
                manifest = {"format": MANIFEST_FORMAT, "tag": tag, "rule": opt.cls.__name__,
                            "dtype": opt.dtype.name, "ranks": opt.size, "arena_size": opt.n,
                            "shard_size": opt.shard_size, "shapes": [list(s) for s in opt.buffer.shapes],
                            "offsets": [int(o) for o in opt.buffer.offsets], "steps": export["steps"],
                            "restarts": export["restarts"], "running": export["running"],
                            "started": export["started"],
                            "groups": export["groups"], "group_params": [list(ix) for _, ix in opt._groups],
                            "skipped_steps": opt.skipped_steps, "states": sorted(local), "shards": shards}
                text = json.dumps(manifest, indent=1).encode()
                atomic_write(path, lambda f: f.write(text))
                if isinstance(old, dict) and old.get("tag") != tag:
                    for s in old.get("shards", []):
                        if isinstance(s, dict) and isinstance(s.get("file"), str) and "/" not in s["file"]:
                            with contextlib.suppress(OSError):  # already gone: nothing to remove
                                os.unlink(os.path.join(folder, s["file"]))
            except (OSError, ValueError) as e:
                problem = e
        opt._agree(problem, "writing the manifest")
        return path


def _bcast(opt, array):
    """Rank 0's ``array`` (host) to every rank, with the optimizer's deadline."""
    if opt.timeout is None:
        opt.comm.Bcast(array, root=0)
    else:
        wait(opt.comm.Ibcast(array, root=0), opt.timeout, f"rank {opt.rank}: the broadcast of the save tag")


def _read_json(path):
    with open(path, "rb") as f:
        return json.loads(f.read())


def load_sharded(folder, opt, name="optimizer"):
    """Restore ``opt`` (state, step counts, hyper-parameters, params) from :func:`save_sharded`'s
    files in ``folder``, with this run's number of ranks (the same as the save's, or not:
    each rank reads the saved shards that overlap its slice). A collective. Every rank checks
    the manifest against the optimizer and the shards it reads against the manifest (present,
    size, SHA-256, tag, ranges, array shapes); if any rank finds a problem, every rank raises
    :class:`ShardError` before anything is written."""
    folder = os.fspath(folder)
    with opt.lock:
        problem, restored = None, None
        try:
            restored = _read_shards(folder, opt, name)
        except (ShardError, OSError, ValueError, KeyError, TypeError) as e:
            problem = e if isinstance(e, ShardError) else ShardError(f"{manifest_path(folder, name)}: {e}")
        opt._agree(problem, "the sharded checkpoint")
        merged, steps, arrays, params, skipped, restarts, running, started = restored
        opt.inner.restore(merged, steps, arrays, restarts, running=running, started=started)
        opt.param_shard[:opt.hi - opt.lo] = params if opt.xp is np else opt.xp.asarray(params)
        opt.skipped_steps = skipped
        recv = opt.buffer.arena if opt._param_recv is None else opt._param_recv
        opt._collective("allgather of the parameters", opt.comm.Iallgather, opt.comm.Allgather, opt.param_shard, recv)
        if opt._param_recv is not None:
            opt.buffer.arena[...] = opt._param_recv[:opt.n]


def _staged_dtype(opt, state):
    """The dtype a state travels and is saved in: a float32 master copy as float32, bfloat16
    state as float32 (exactly; MPI and .npz have no bfloat16), any other in the params' dtype
    (that of the state arenas)."""
    if state == MASTER or opt.inner.state_dtype == _formats.BFLOAT16:
        return np.dtype(np.float32)
    return np.dtype(opt.inner.state_dtype)


def _read_shards(folder, opt, name):
    """``(merged groups, steps, {(piece, state): values}, param slice, skipped steps, restarts,
    running values, started states)``, all
    checked; a ShardError names the first problem. Writes nothing."""
    path = manifest_path(folder, name)
    if not os.path.isfile(path):
        raise ShardError(f"{path} is missing: no sharded checkpoint named {name!r} in {folder}")
    m = _read_json(path)
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise ShardError(f"{path} is not a sharded checkpoint manifest (format {m.get('format')!r})")
    problems = []
    expect = {"rule": opt.cls.__name__, "dtype": opt.dtype.name, "arena_size": opt.n,
              "shapes": [list(s) for s in opt.buffer.shapes], "offsets": [int(o) for o in opt.buffer.offsets],
              "group_params": [list(ix) for _, ix in opt._groups]}
    problems += [f"{k} is {m.get(k)!r} there, {v!r} here" for k, v in expect.items() if m.get(k) != v]
    if problems:
        raise ShardError(f"{path} does not fit this optimizer: " + "; ".join(problems))
    merged = opt.inner.merged_groups(m["groups"], f"{path}: ")
    needed = sorted({s for g in merged for s in opt.inner.states_needed(g)})
    lacking = [s for s in needed if s not in m["states"]]
    if lacking:
        raise ShardError(f"{path}: state {', '.join(lacking)} is missing (the saved options need it)")
    lo, hi = opt.lo, opt.hi
    states = {s: np.zeros(hi - lo, _staged_dtype(opt, s)) for s in m["states"]}
    params = np.zeros(hi - lo, opt.dtype)
    covered = 0
    for s in m["shards"]:
        a, b = max(s["lo"], lo), min(s["hi"], hi)
        if a >= b:
            continue
        file = os.path.join(folder, s["file"])
        if not os.path.isfile(file):
            raise ShardError(f"shard {s['rank']} of {m['ranks']} ({file}) is missing")
        with open(file, "rb") as f:
            data = f.read()
        if len(data) != s["bytes"] or hashlib.sha256(data).hexdigest() != s["sha256"]:
            raise ShardError(f"shard {s['rank']} ({file}) does not match the manifest: {len(data)} bytes, SHA-256 "
                             f"{hashlib.sha256(data).hexdigest()[:12]}..., the manifest says {s['bytes']} bytes, "
                             f"{s['sha256'][:12]}... (another save's shard, or damaged)")
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("tag") != m["tag"] or (meta.get("lo"), meta.get("hi")) != (s["lo"], s["hi"]):
                raise ShardError(f"shard {s['rank']} ({file}) is from another save (tag {meta.get('tag')!r}, "
                                 f"the manifest's {m['tag']!r})")
            for key, out in [(f"state.{n}", states[n]) for n in m["states"]] + [("params", params)]:
                want = out.dtype
                if key not in z.files:
                    raise ShardError(f"shard {s['rank']} ({file}) has no {key}")
                v = z[key]
                if v.shape != (s["hi"] - s["lo"],) or v.dtype != want:
                    raise ShardError(f"shard {s['rank']} ({file}): {key} is {v.dtype}{list(v.shape)}, not "
                                     f"{want}[{s['hi'] - s['lo']}]")
                out[a - lo:b - lo] = v[a - s["lo"]:b - s["lo"]]
        covered += b - a
    if covered != hi - lo:
        raise ShardError(f"{path}: the shards cover {covered} of the {hi - lo} elements of rank {opt.rank}'s slice")
    arrays = {}
    for j, (i, a, b) in enumerate(opt._pieces):
        if i is not None:
            for n in m["states"]:
                arrays[(j, n)] = states[n][a - lo:b - lo]
    problems = carried_problems(m, len(merged), opt.inner.rule.states)
    if problems:
        raise ShardError(f"{path}: " + "; ".join(problems))
    return (merged, m["steps"], arrays, params, int(m.get("skipped_steps", 0)), m.get("restarts"), m.get("running"),
            m.get("started"))

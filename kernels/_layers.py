"""The runner of the engine's layer passes: many tensors laid out once as contiguous *bases*
and one chunk table (:func:`._reduce.chunk_table`), then one pass per call, whatever the
pass does: the global norm and guard (:mod:`._reduce`), LAMB's moments and norms, an
update scaled per tensor. A chunk is the unit of work of a CPU thread or a CUDA block, and
of a partial result: a tensor's totals are its chunks' partials added in table order, so
the same bits on every run.

On the CPU a pass is one compiled call over typed lists; on CUDA one launch per base (one
per run of an arena, one per tensor for separate arrays), on the stream of the arrays'
producer.
"""
import numpy as np

from . import _dispatch
from ._engine import entry_point
from ._formats import compute_dtype
from ._reduce import CHUNK, SQUARES, chunk_table, segment_sums

CUDA_CHUNK = 1 << 12  # elements per block on CUDA: 32 per thread; a 1e7-param model gives ~2.5k blocks


def flat(a):
    """``a`` as a 1-D view."""
    n = a.size if isinstance(a.size, int) else a.numel()  # torch's size is a method
    return a.reshape(n)


class Layers:
    """Tensors as the layer passes take them.

    ``bases``: contiguous arrays (flattened here); ``states``: name -> list of bases laid out
    like ``bases`` (None for a state not used); ``spans[t] = (base, start, size)`` places
    tensor t (default: tensor t is base t, whole); ``grads``: the gradients' bases when they
    are fixed (a ParamBuffer's grad arena), else None and each call gives them; ``like``: an
    array of the kind and dtype of the bases, when there are none; ``chunk``: elements per
    chunk, ``(on the CPU, on CUDA)``.
    """

    def __init__(self, bases, states, spans=None, grads=None, like=None, chunk=(CHUNK, CUDA_CHUNK)):
        like = bases[0] if bases else like
        self.dtype = np.dtype(_dispatch._Array("params[0]", like).dtype)
        self.cpu = isinstance(like, np.ndarray)
        self.bases = [flat(a) for a in bases]
        self.states = {k: None if v is None else [flat(a) for a in v] for k, v in states.items()}
        self.grads = None if grads is None else [flat(a) for a in grads]
        self.spans = spans if spans is not None else [(b, 0, int(a.size)) for b, a in enumerate(self.bases)]
        self.n_tensors = len(self.spans)
        self.chunks = chunk_table([n for _, _, n in self.spans], chunk[0] if self.cpu else chunk[1],
                                  [(b, s) for b, s, _ in self.spans])
        self.sums = None    # (k, n_chunks): the per-chunk results of the last pass that reduced k values
        self.totals = None  # CPU: their totals over all chunks, in chunk order
        n = self.chunks.shape[0]
        if not n:
            return
        if self.cpu:
            from numba.typed import List
            self.parallel = sum(s[2] for s in self.spans) >= _dispatch.PARALLEL_THRESHOLD
            self.typed = {k: None if v is None else List(v) for k, v in
                          dict(params=self.bases, grads=self.grads, **self.states).items()}
        else:
            from numba import cuda
            # per base, its rows, with column 0 naming the slot its partial results go to
            self.rows = []
            for b in range(len(self.bases)):
                slots = np.nonzero(self.chunks[:, 0] == b)[0]
                if slots.size:
                    table = self.chunks[slots].copy()
                    table[:, 0] = slots
                    self.rows.append((b, cuda.to_device(table)))

    def views(self, bases):
        """Each tensor's flat view of ``bases`` (laid out like the params' bases)."""
        return [bases[b][s:s + n] for b, s, n in self.spans]

    def fixed_grads(self):
        """The gradients as the kernels take them, when fixed at construction."""
        return self.typed["grads"] if self.cpu and self.chunks.shape[0] else self.grads

    def per_tensor(self, sums):
        """Each tensor's total of the per-chunk ``sums`` (added in chunk order); a row of
        totals per row of a 2-D ``sums``."""
        if not isinstance(sums, np.ndarray):
            sums = sums.copy_to_host()
        sums = sums.astype(np.float64)
        if sums.ndim == 2:
            return np.stack([self.per_tensor(row) for row in sums]) if len(sums) else np.zeros((0, self.n_tensors))
        return segment_sums(sums, self.chunks, self.n_tensors, SQUARES)

    def run(self, kernels, grads, c, per_tensor=None):
        """One layer pass of the engine's ``kernels`` over the tensors: ``grads`` as the
        kernels take them (a typed list on the CPU; None: the pass reads none), ``per_tensor``
        the host values of its per-tensor scalars, one row per scalar (or one value per tensor
        for one). A pass that reduces leaves its per-chunk results in ``self.sums`` (float64 on
        the CPU, the math's dtype on CUDA, where they stay on the device). Returns the launches."""
        n = self.chunks.shape[0]
        if per_tensor is not None:
            per_tensor = np.ascontiguousarray(per_tensor, self.dtype).reshape(len(kernels.per_tensor), -1)
        k = len(kernels.sums)
        if k and (self.sums is None or self.sums.shape[0] != k):
            if self.cpu:
                self.sums = np.zeros((k, n))
            else:
                from numba import cuda
                self.sums = cuda.device_array((k, n), compute_dtype(self.dtype))
        sums = self.sums if k else None
        grads = grads if kernels.reads_grad else None
        if self.cpu:
            t = self.typed
            self.totals = kernels.layers_cpu(self.parallel)(t["params"], grads, *(t[s] for s in kernels.states),
                                                            self.chunks, per_tensor, c, sums)
            return 1
        if per_tensor is not None:
            from numba import cuda
            per_tensor = cuda.to_device(per_tensor)
        arrays = [self.bases, grads, *(self.states[s] for s in kernels.states)]
        return self.launch(kernels.layers_cuda(self.dtype), arrays, per_tensor, c, sums)

    def bind(self, kernels, c):
        """A pass of ``kernels`` that reads no gradient and takes no per-tensor values, with
        its scalars ``c`` fixed (a norm): a function of no argument that runs it as
        :meth:`run` does. On the CPU the arguments are built once and, after the first call,
        the compiled code is called directly: a tiny model's guard costs about a microsecond."""
        if not self.cpu:
            return lambda: self.run(kernels, None, c)
        sums = np.zeros((len(kernels.sums), self.chunks.shape[0]))
        t = self.typed
        args = (t["params"], None, *(t[s] for s in kernels.states), self.chunks, None, c, sums)
        dispatcher, compiled = kernels.layers_cpu(self.parallel), None

        def run():
            nonlocal compiled
            if compiled is None:
                self.totals = dispatcher(*args)
                compiled = entry_point(dispatcher, args)
            else:
                self.totals = compiled(*args)
            self.sums = sums
            return 1
        return run

    def launch(self, kernel, arrays, *rest):
        """``kernel(*arrays of base b, rows of base b, *rest)`` for every base (CUDA), on the
        stream of the bases' producer; ``arrays`` are per-base lists (or None). The device
        views of the arrays are converted once and reused (``_dispatch.device_views``).
        Returns the launches."""
        from . import _cuda
        stream = self.stream()
        for b, rows in self.rows:
            args = _dispatch.device_views([None if a is None else a[b] for a in arrays])
            _cuda.launch(kernel, rows.shape[0], stream, *args, rows, *rest)
        return len(self.rows)

    def stream(self):
        """CUDA: the stream the bases' producer launches on now (0 on the simulator)."""
        from numba import config, cuda
        return 0 if config.ENABLE_CUDASIM else _dispatch._stream_of(self.bases[0], cuda)

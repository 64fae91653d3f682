"""The CUDA pieces every kernel shares (imported only when a GPU array, or the PTX check,
needs them: numba-cuda is an optional dependency): the grid-stride loop around a rule's
math, the one block tree reduction, and the one launch configuration of the block-per-chunk
kernels (norms, LAMB, LARS)."""
import warnings

from numba import config, cuda  # a module global: the simulator swaps it for its own

THREADS = 128  # threads per block of a block-per-chunk kernel (a power of two: the tree halves it)
MAX_BLOCKS = 1024
STRIDE_THREADS = 256  # threads per block of a grid-stride element kernel
SIM_GRID = (2, 16)    # the simulator runs each thread in Python: few threads, strided


def make_cuda_loop(apply, n_states):
    """The grid-stride CUDA loop around ``apply`` for a math of ``n_states`` states: any grid
    covers any size, and the simulator stays fast on a small grid."""
    states = "".join(f"s{k}, " for k in range(n_states))
    src = (f"def cuda_loop(param, grad, {states}master, c):\n"
           f"    for i in range(cuda.grid(1), param.size, cuda.gridsize(1)):\n"
           f"        apply(i, param, grad, {states}master, c, 0)\n")
    scope = {"cuda": cuda, "apply": apply}  # cuda a global of the kernel: the simulator swaps it
    exec(compile(src, __file__, "exec"), scope)  # noqa: S102 - generated from the state count alone
    return scope["cuda_loop"]


# how the CUDA layer kernel reduces a returned value ``y`` into a thread's accumulator (see
# _engine.REDUCTIONS); the block then adds the threads' accumulators up (a maximum in row 0)
_ACCUMULATE = {"squares": "a{j} += y{j} * y{j}", "sum": "a{j} += y{j}", "max": "a{j} = max(a{j}, abs(y{j}))",
               "nonfinite": "a{j} += y{j} - y{j}"}


def make_cuda_layers(apply, n_states, n_tensor, sums, dtype_name):
    """The layer kernel around ``apply`` (see ``_engine``): one block per chunk row
    ``(slot, start, stop, tensor)`` of one base, grid-stride over rows; the tensor's
    per-tensor scalars read once per chunk; each thread reduces the math's returned values
    in ``dtype_name`` (the math's dtype), each by its kind in ``sums``, the block adds them
    up with :func:`tree_reduce` (the maximum for a first ``"max"``), and thread 0 writes
    them to column ``slot`` of ``sums``."""
    from numba import types
    n_sums = len(sums)
    s = "".join(f"s{k}, " for k in range(n_states))
    w = "".join(f"w{j}, " for j in range(n_tensor))
    lines = [f"def layers_kernel(param, grad, {s}rows, per_tensor, c, sums):"]
    if n_sums:
        lines.append(f"    sh = cuda.shared.array(({n_sums}, THREADS), acc)")
    lines += ["    tid = cuda.threadIdx.x",
              "    for k in range(cuda.blockIdx.x, rows.shape[0], cuda.gridDim.x):"]
    lines += [f"        w{j} = per_tensor[{j}, rows[k, 3]]" for j in range(n_tensor)]
    lines += [f"        a{j} = acc(0)" for j in range(n_sums)]
    lines.append("        for i in range(rows[k, 1] + tid, rows[k, 2], THREADS):")
    call = f"apply(i, param, grad, {s}{w}c)"
    if n_sums:
        y = [f"y{j}" for j in range(n_sums)]
        lines.append(f"            {', '.join(y)}{',' if n_sums == 1 else ''} = {call}")
        lines += ["            " + _ACCUMULATE[kind].format(j=j) for j, kind in enumerate(sums)]
        lines += [f"        sh[{j}, tid] = a{j}" for j in range(n_sums)]
        lines += [f"        tree_reduce(sh, tid, {sums[0] == 'max'})", "        if tid == 0:"]
        lines += [f"            sums[{j}, rows[k, 0]] = sh[{j}, 0]" for j in range(n_sums)]
        lines.append("        cuda.syncthreads()")
    else:
        lines.append(f"            {call}")
    scope = {"cuda": cuda, "apply": apply, "acc": getattr(types, dtype_name), "THREADS": THREADS,
             "tree_reduce": tree_reduce}
    exec(compile("\n".join(lines) + "\n", __file__, "exec"), scope)  # noqa: S102 - generated from the counts alone
    return scope["layers_kernel"]


def _tree_reduce(sh, tid, max_first):
    """Reduce each row of the shared array ``sh`` (rows, THREADS) into its column 0 with a
    fixed tree: the same additions in the same order on every run. Row 0 takes the maximum
    when ``max_first``, every other row the sum. Every thread of the block calls it."""
    cuda.syncthreads()
    step = sh.shape[1] // 2
    while step > 0:
        if tid < step:
            for r in range(sh.shape[0]):
                if r == 0 and max_first:
                    sh[0, tid] = max(sh[0, tid], sh[0, tid + step])
                else:
                    sh[r, tid] += sh[r, tid + step]
        cuda.syncthreads()
        step //= 2


tree_reduce = cuda.jit(device=True)(_tree_reduce)


def blocks(n_chunks):
    """Blocks for a block-per-chunk kernel over ``n_chunks`` chunks (the kernel strides over
    chunks): few on the simulator, which runs each thread in Python."""
    return max(1, min(n_chunks, SIM_GRID[0] if config.ENABLE_CUDASIM else MAX_BLOCKS))


def launch(kernel, n_chunks, stream, *args):
    """``kernel[blocks(n_chunks), THREADS, stream](*args)``: the launch of every
    block-per-chunk kernel."""
    _configured(kernel, blocks(n_chunks), THREADS, stream)(*args)


def launch_stride(kernel, n, stream, *args):
    """The launch of a grid-stride element kernel over ``n`` elements: enough blocks of
    ``STRIDE_THREADS`` to cover them, at most 32 per multiprocessor (the loop strides over the
    rest); the simulator's small grid."""
    launcher = _BY_SIZE.get((kernel, n, stream))
    if launcher is None:
        if config.ENABLE_CUDASIM:
            grid, threads = SIM_GRID
        else:
            grid, threads = max(1, min(-(-n // STRIDE_THREADS), 32 * _sm_count())), STRIDE_THREADS
        launcher = _BY_SIZE[(kernel, n, stream)] = _configured(kernel, grid, threads, stream)
    launcher(*args)


# (kernel, grid, threads, stream) -> kernel[grid, threads, stream], and (kernel, n, stream) -> the
# same for a grid-stride kernel over n elements: a step re-launches the same configurations, and
# configuring one costs an object, a warnings filter and (grid-stride) a device query
_CONFIGURED, _BY_SIZE = {}, {}


def _configured(kernel, grid, threads, stream):
    key = (kernel, grid, threads, stream)
    launcher = _CONFIGURED.get(key)
    if launcher is None:
        # small models give small grids: Numba's occupancy warning (given when configuring) is expected
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Gg]rid size.*")
            launcher = _CONFIGURED[key] = kernel[grid, threads, stream]
    return launcher


def _sm_count():
    return cuda.get_current_device().MULTIPROCESSOR_COUNT

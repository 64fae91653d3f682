"""The CUDA pieces every kernel shares (imported only when a GPU array, or the PTX check,
needs them: numba-cuda is an optional dependency): the grid-stride loop around a rule's
math, the one block tree reduction, and the one launch configuration of the block-per-chunk
kernels (norms, LAMB, LARS)."""
import warnings

from numba import config, cuda  # a module global: the simulator swaps it for its own

THREADS = 128  # threads per block of a block-per-chunk kernel (a power of two: the tree halves it)
MAX_BLOCKS = 1024


def make_cuda_loop(apply, n_states):
    """The grid-stride CUDA loop around ``apply`` for a math of ``n_states`` states: any grid
    covers any size, and the simulator stays fast on a small grid."""
    states = "".join(f"s{k}, " for k in range(n_states))
    src = (f"def cuda_loop(param, grad, {states}c):\n"
           f"    for i in range(cuda.grid(1), param.size, cuda.gridsize(1)):\n"
           f"        apply(i, param, grad, {states}c)\n")
    scope = {"cuda": cuda, "apply": apply}  # cuda a global of the kernel: the simulator swaps it
    exec(compile(src, __file__, "exec"), scope)  # noqa: S102 - generated from the state count alone
    return scope["cuda_loop"]


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
    return max(1, min(n_chunks, 2 if config.ENABLE_CUDASIM else MAX_BLOCKS))


def launch(kernel, n_chunks, stream, *args):
    """``kernel[blocks(n_chunks), THREADS, stream](*args)``: the launch of every
    block-per-chunk kernel. Small models give small grids; Numba's occupancy warning about
    them is expected and silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Gg]rid size.*")
        kernel[blocks(n_chunks), THREADS, stream](*args)


def make_reduce(dtype_name, modes):
    """The norm reduction of ``_reduce``: one block per chunk ``(start, stop)``, the sum of
    ``|x|**p`` (or max) and the non-finite check ``sum(x * 0)`` per chunk, in the arrays' dtype."""
    from numba import types
    acc = getattr(types, dtype_name)
    squares, maximum = modes

    def reduce_chunks(x, starts, stops, mode, p, zero, totals, checks):
        sh = cuda.shared.array((2, THREADS), acc)
        tid = cuda.threadIdx.x
        for k in range(cuda.blockIdx.x, starts.size, cuda.gridDim.x):
            total, check = zero, zero
            for i in range(starts[k] + tid, stops[k], THREADS):
                v = x[i]
                check += v * zero
                if mode == squares:
                    total += v * v
                elif mode == maximum:
                    total = max(total, abs(v))
                else:
                    total += abs(v) ** p
            sh[0, tid] = total
            sh[1, tid] = check
            tree_reduce(sh, tid, mode == maximum)
            if tid == 0:
                totals[k] = sh[0, 0]
                checks[k] = sh[1, 0]
            cuda.syncthreads()
    return reduce_chunks

"""The CUDA loop around a rule's math (imported only when a GPU array, or the PTX
check, needs it: numba-cuda is an optional dependency)."""
from numba import cuda  # a module global: the simulator swaps it for its own


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


def make_reduce(dtype_name, threads, modes):
    """The block reduction of ``_reduce`` (here, where ``cuda`` is a module global)."""
    from numba import types
    acc = getattr(types, dtype_name)
    squares, maximum = modes

    def reduce_chunks(x, starts, stops, mode, p, zero, totals, checks):
        tot_sh = cuda.shared.array(threads, acc)
        chk_sh = cuda.shared.array(threads, acc)
        tid = cuda.threadIdx.x
        for k in range(cuda.blockIdx.x, starts.size, cuda.gridDim.x):
            total, check = zero, zero
            for i in range(starts[k] + tid, stops[k], threads):
                v = x[i]
                check += v * zero
                if mode == squares:
                    total += v * v
                elif mode == maximum:
                    total = max(total, abs(v))
                else:
                    total += abs(v) ** p
            tot_sh[tid] = total
            chk_sh[tid] = check
            cuda.syncthreads()
            step = threads // 2
            while step > 0:  # a fixed tree: the same sums in the same order on every run
                if tid < step:
                    if mode == maximum:
                        tot_sh[tid] = max(tot_sh[tid], tot_sh[tid + step])
                    else:
                        tot_sh[tid] += tot_sh[tid + step]
                    chk_sh[tid] += chk_sh[tid + step]
                cuda.syncthreads()
                step //= 2
            if tid == 0:
                totals[k] = tot_sh[0]
                checks[k] = chk_sh[0]
            cuda.syncthreads()
    return reduce_chunks

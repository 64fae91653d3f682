"""The CUDA loop around a rule's math (imported only when a GPU array, or the PTX
check, needs it: numba-cuda is an optional dependency)."""
from numba import cuda  # a module global: the simulator swaps it for its own


def make_cuda_loop(apply):
    def cuda_loop(param, grad, s0, s1, s2, c):
        # Grid-stride: any grid covers any size, and the simulator stays fast on a small grid.
        for i in range(cuda.grid(1), param.size, cuda.gridsize(1)):
            apply(i, param, grad, s0, s1, s2, c)
    return cuda_loop

"""Compile CUDA code for a given compute capability without a GPU (PTX reports)."""
from contextlib import contextmanager


@contextmanager
def _target_cc(cc):
    """Device functions ask the current device for its compute capability; without a GPU,
    answer with the target's."""
    import numba.cuda.dispatcher as dispatcher

    class _Target:
        compute_capability = cc

    saved = dispatcher.get_current_device
    dispatcher.get_current_device = lambda: _Target
    try:
        yield
    finally:
        dispatcher.get_current_device = saved

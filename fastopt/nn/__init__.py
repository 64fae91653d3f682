"""fastopt.nn: a small forward/backward core with hand-derived gradients, one code path for
NumPy (CPU) and CuPy (GPU) arrays, and every parameter and gradient in one ParamBuffer.

    model = Sequential(Conv2d(1, 8, 3, padding=1), ReLU(), MaxPool2d(2), Flatten(),
                       Linear(8 * 14 * 14, 10), dtype=np.float32, device="cpu", seed=0)
    logits = model(x)                                  # (N, 10)
    loss, dlogits = softmax_cross_entropy(logits, y)
    model.backward(dlogits)                            # overwrites model.buffer.grads
    fastopt.functional.adam_(model.buffer.arena, model.buffer.grad_arena, m, v, step=t)
"""
from . import init
from .conv import AvgPool2d, Conv2d, MaxPool2d
from .layers import Dropout, Flatten, Linear, ReLU, Sigmoid, Tanh, WeightLayer
from .losses import l2_penalty, mae_loss, mse_loss, softmax_cross_entropy
from .module import Layer, Sequential
from .norm import BatchNorm1d, BatchNorm2d

__all__ = ["AvgPool2d", "BatchNorm1d", "BatchNorm2d", "Conv2d", "Dropout", "Flatten", "Layer", "Linear", "MaxPool2d",
           "ReLU", "Sequential", "Sigmoid", "Tanh", "WeightLayer", "init", "l2_penalty", "mae_loss", "mse_loss",
           "softmax_cross_entropy"]

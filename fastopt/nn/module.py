"""The layer protocol and ``Sequential``, which owns the model's one ``ParamBuffer``.

A layer declares its parameters (``param_shapes``), is handed views into the model's arenas
(``bind``), keeps in ``forward`` what its ``backward`` needs, and in ``backward`` OVERWRITES
its gradient views (``grads[name][...] = ...``) and returns d(loss)/d(input). Overwriting,
not accumulating, means one backward pass leaves exactly this batch's gradient in
``model.buffer.grad_arena``: no ``zero_grad`` between steps, and no gradient array is
allocated per step.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from ..buffer import ParamBuffer, _array_module
from ..kernels._formats import BFLOAT16, BY_NAME
from ._array import to_numpy

if TYPE_CHECKING:
    from numpy.typing import DTypeLike


class _Unbuilt(dict):
    """The params / grads of a layer not yet placed in a model: empty, and a clear error on use."""

    def __init__(self, owner: str) -> None:
        super().__init__()
        self.owner = owner

    def __missing__(self, name: str) -> np.ndarray:
        raise RuntimeError(f"{self.owner} has no parameters yet: build it inside a Sequential "
                           f"(which allocates them in the model's ParamBuffer)")


class Layer:
    """Base class. Subclasses override ``forward`` and ``backward`` and, when they have
    parameters, ``param_shapes`` and ``init_params``.

    ``params`` / ``grads``: dicts name -> view into the model's arena / grad arena.
    ``nonlinearity``: set on activation layers; a weight layer's default init is chosen from
    the first non-``transparent`` layer after it.
    """

    nonlinearity = None
    transparent = False  # pooling, reshaping, normalization, dropout: seen through when choosing an init

    def __init__(self) -> None:
        self.params, self.grads = _Unbuilt(type(self).__name__), _Unbuilt(type(self).__name__)
        self.training = True

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Ordered dict name -> shape of this layer's parameters."""
        return {}

    def init_params(self, rng: np.random.Generator, nonlinearity: str) -> dict[str, np.ndarray]:
        """Dict name -> float64 host array: the initial values (``nonlinearity`` follows the layer)."""
        return {}

    def bind(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        """Take ``params`` / ``grads`` (name -> view into the model's arena / grad arena) as this layer's."""
        self.params, self.grads = params, grads

    def build_state(self, xp: ModuleType, dtype: np.dtype) -> None:
        """Allocate non-parameter state (BatchNorm's running statistics)."""

    def buffers(self) -> dict[str, np.ndarray]:
        """Dict name -> array of non-parameter state, checkpointed beside the parameters."""
        return {}

    def reseed(self, seed: int) -> None:
        """Restart the layer's random stream (Dropout), for reproducible runs and gradient checks."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        """The layer's output for input ``x``, keeping what ``backward`` needs."""
        raise NotImplementedError

    def backward(self, dout: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        """Overwrite this layer's gradient views from ``dout`` (d(loss)/d(output)) and return
        d(loss)/d(input), or None when ``need_dx`` is False (default True)."""
        raise NotImplementedError

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)

    def train(self, mode: bool = True) -> Layer:
        """Training mode (``mode=True``, the default) or evaluation mode (False); returns the layer."""
        self.training = bool(mode)
        return self

    def eval(self) -> Layer:
        """Evaluation mode (``train(False)``); returns the layer."""
        return self.train(False)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Sequential(Layer):
    """``Sequential(*layers, dtype=np.float32, device="cpu", seed=0)``: the layers in order,
    built at once: every parameter is a view into ONE ``ParamBuffer`` (``model.buffer``),
    named ``"{index}.{name}"`` as in PyTorch (``"0.weight"``, ``"0.bias"``, ``"4.weight"``),
    initialized in place from ``np.random.default_rng(seed)`` with each layer's default for
    the activation that follows it.

    ``model(x)`` / ``model.forward(x)`` casts ``x`` to the model's dtype and device.
    ``model.backward(dout)`` overwrites ``model.buffer.grads`` with d(loss)/d(params) and
    returns d(loss)/d(x) (``need_dx=False`` skips that last product and returns None).

    ``storage``: the dtype the parameters and gradients are kept in, when narrower than
    ``dtype`` (``"bfloat16"``, ``"float16"``; None: ``dtype``), as mixed-precision training
    keeps them: ``model.buffer`` (what the optimizer updates) holds them in ``storage``; the
    layers compute in ``dtype`` on a copy that ``forward`` refreshes from the buffer, and
    ``backward`` rounds the gradients into ``storage`` (to nearest even). bfloat16 is
    ml_dtypes' (NumPy): CPU only.
    """

    def __init__(self, *layers: Layer, dtype: DTypeLike = np.float32, device: str = "cpu",
                 seed: int = 0, storage: DTypeLike | None = None) -> None:
        super().__init__()
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer) or isinstance(layer, Sequential):
                raise TypeError(f"layers[{i}] must be a fastopt.nn layer (not a Sequential), "
                                f"got {type(layer).__name__}")
        if len({id(layer) for layer in layers}) != len(layers):
            raise ValueError("layers must be distinct objects: a layer instance holds its own views and caches")
        self.layers = list(layers)
        self.dtype = np.dtype(dtype)
        self.storage = _storage(storage, self.dtype, device)
        self.device = device
        self._xp = _array_module(device)
        names, shapes = [], []
        for i, layer in enumerate(self.layers):
            for name, shape in layer.param_shapes().items():
                names.append(f"{i}.{name}")
                shapes.append(tuple(shape))
        self.buffer = ParamBuffer(shapes=shapes, names=names, dtype=self.storage, device=device)
        # the layers' params and grads: the buffer's own views, or a compute-dtype copy of them
        self._compute = self.buffer if self.storage == self.dtype else \
            ParamBuffer(shapes=shapes, names=names, dtype=self.dtype, device=device)
        rng = np.random.default_rng(seed)
        pairs = iter(zip(self._compute.params, self._compute.grads, self.buffer.params))
        for i, layer in enumerate(self.layers):
            layer.build_state(self._xp, self.dtype)
            own = [(name, *next(pairs)) for name in layer.param_shapes()]
            if own:
                values = layer.init_params(rng, self._nonlinearity_after(i))
                for name, _, _, stored in own:
                    stored[...] = self._xp.asarray(values[name], dtype=self.storage)
                layer.bind({name: p for name, p, _, _ in own}, {name: g for name, _, g, _ in own})
        self.reseed(int(rng.integers(2**31)))
        self.params = dict(zip(names, self.buffer.params))
        self.grads = dict(zip(names, self.buffer.grads))
        self._first_with_params = next((i for i, layer in enumerate(self.layers) if layer.params),
                                       len(self.layers))

    def _nonlinearity_after(self, i: int) -> str:
        for layer in self.layers[i + 1:]:
            if layer.nonlinearity is not None:
                return layer.nonlinearity
            if not layer.transparent:
                break
        return "linear"

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = self._xp.asarray(x, dtype=self.dtype)
        if self._compute is not self.buffer:  # the optimizer wrote the stored params since
            for work, stored in zip(self._compute.params, self.buffer.params):  # the arenas' paddings differ
                work[...] = stored
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dout: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        """Overwrite every parameter gradient; return d(loss)/d(input), or None with
        ``need_dx=False`` (the layers below the first parameter then do no work)."""
        dout = self._xp.asarray(dout, dtype=self.dtype)
        stop = 0 if need_dx else self._first_with_params
        for i in range(len(self.layers) - 1, stop - 1, -1):
            dout = self.layers[i].backward(dout, need_dx=need_dx or i > stop)
        if self._compute is not self.buffer:
            for stored, work in zip(self.buffer.grads, self._compute.grads):
                stored[...] = work
        return dout if need_dx else None

    def train(self, mode: bool = True) -> Sequential:
        """Set every layer's mode (``mode=True``, the default: training); returns the model."""
        super().train(mode)
        for layer in self.layers:
            layer.train(mode)
        return self

    def reseed(self, seed: int) -> None:
        """Reseed every layer's random stream from one ``np.random.default_rng(seed)``."""
        rng = np.random.default_rng(seed)
        for layer in self.layers:
            layer.reseed(int(rng.integers(2**31)))

    def buffers(self) -> dict[str, np.ndarray]:
        """Dict ``"{index}.{name}"`` -> array of the layers' non-parameter state (the live arrays)."""
        return {f"{i}.{k}": v for i, layer in enumerate(self.layers) for k, v in layer.buffers().items()}

    def state_dict(self) -> dict[str, np.ndarray]:
        """Host (NumPy) copies of every parameter and buffer, by name: a checkpoint, with
        PyTorch's names and layouts for the same layers (no ``num_batches_tracked``)."""
        state = {name: to_numpy(p).copy() for name, p in self.params.items()}
        state.update({name: to_numpy(b).copy() for name, b in self.buffers().items()})
        return state

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Copy arrays (NumPy, CuPy or anything ``asarray`` takes) into the parameters and
        buffers in place; the arena and every view stay the same objects. ``strict`` (default
        True): the names must match the model's exactly (KeyError otherwise), but for the
        ``num_batches_tracked`` of PyTorch's BatchNorm, which is ignored; False copies the
        names both have."""
        targets = {**self.params, **self.buffers()}
        # torch counts batches for its momentum=None (a cumulative average); a fastopt
        # BatchNorm's momentum is always a number, so the count means nothing here
        counts = {k[:-len("running_mean")] + "num_batches_tracked" for k in targets if k.endswith(".running_mean")}
        missing = sorted(set(targets) - set(state))
        unexpected = sorted(set(state) - set(targets) - counts)
        if strict and (missing or unexpected):
            raise KeyError(f"state does not match the model: missing {missing}, unexpected {unexpected}")
        for name in set(targets) & set(state):
            value = state[name]
            if self._xp is np:  # np.asarray refuses CuPy arrays: fetch them to the host first
                value = to_numpy(value)
            value = self._xp.asarray(value, dtype=self.storage if name in self.params else self.dtype)
            if value.shape != targets[name].shape:
                raise ValueError(f"state[{name!r}] has shape {value.shape}, the model has {targets[name].shape}")
            targets[name][...] = value

    def __getitem__(self, i: int) -> Layer:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[Layer]:
        return iter(self.layers)

    def __repr__(self) -> str:
        inner = "\n".join(f"  ({i}) {layer!r}" for i, layer in enumerate(self.layers))
        kept = f" (params and grads kept in {self.storage.name})" if self.storage != self.dtype else ""
        return f"Sequential(\n{inner}\n) on {self.device}, {self.dtype.name}{kept}, {self.buffer.numel:,} parameters"


def _storage(storage, dtype, device):
    """The parameters' stored dtype: ``dtype`` or a narrower float (named errors otherwise)."""
    if storage is None:
        return dtype
    name = str(np.dtype(storage) if not isinstance(storage, str) else storage)
    if name not in BY_NAME or (BY_NAME[name].itemsize >= dtype.itemsize and BY_NAME[name] != dtype):
        raise ValueError(f"storage must be None or a float narrower than dtype {dtype.name} "
                         f"({', '.join(n for n, d in BY_NAME.items() if d.itemsize < dtype.itemsize)}), "
                         f"got {storage!r}")
    if BY_NAME[name] == BFLOAT16 and device != "cpu":
        raise ValueError("storage='bfloat16' is NumPy's (ml_dtypes): device must be 'cpu'")
    return BY_NAME[name]

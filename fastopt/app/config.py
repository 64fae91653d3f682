"""Every setting of a training run, and the error a bad combination of settings raises."""
import dataclasses
from dataclasses import dataclass, field


class UsageError(ValueError):
    """A bad combination of settings; the message names the flag (the CLI prints it as one line)."""


@dataclass
class Config:
    """Every setting of a training run (the CLI flags, with their defaults). The defaults (conv,
    Adam at 3e-3, batch 32, 15 epochs) reach about 98% test accuracy on the digits."""

    model: str = "conv"
    optimizer: str = "adam"
    lr: float = None              # None: DEFAULT_LR[optimizer]
    hyper: dict = field(default_factory=dict)  # optimizer hyper-parameters given explicitly (momentum, betas...)
    schedule: str = "constant"
    warmup_steps: int = None      # warmup_cosine: None = 5% of the steps
    decay_rate: float = 0.5       # step: factor per drop; exp, inverse_time: factor after one epoch
    decay_every: int = None       # step: epochs between drops; None = a third of the epochs
    final_lr: float = 0.0         # cosine, warmup_cosine: the lr at the last step
    max_grad_norm: float = None
    nonfinite: str = "skip"       # the optimizer's guard; on CUDA "skip" is decided on the device (no sync)
    ema: float = None
    precision: str = "fp32"       # the params' and grads' storage: fp32 (as --dtype), bf16 or fp16 (compute in float32)
    master_weights: bool = False  # bf16/fp16: the optimizer keeps float32 copies of the params
    stochastic_rounding: bool = False  # bf16/fp16: params (and 16-bit state) rounded stochastically
    state_dtype: str = None       # the optimizer state's dtype; None: the params'
    state_bits: int = None        # 8: 8-bit blockwise optimizer state (adam, adamw, lion, sgd, rmsprop)
    state_code: str = None        # with state_bits 8: the code map, "fp8" (the optimizer's default) or "dynamic"
    batch_size: int = 32
    epochs: int = 15
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    threads: int = 1              # BLAS and Numba threads while training (see prepare.thread_limits)
    data: str = None              # None: scikit-learn's digits; else MNIST IDX folder or .npz
    limit: int = None             # use at most this many training and test examples
    l2: float = None              # model "logreg" (app.fullbatch): L2 strength; None = DEFAULT_L2
    iterations: int = None        # model "logreg": full-batch iterations; None = DEFAULT_ITERATIONS
    out: str = "runs/train"
    checkpoint: bool = False
    resume: bool = False
    progress: bool = True
    distributed: bool = False     # data parallel over MPI (also when started by mpiexec -n R, R > 1)

    def as_dict(self):
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

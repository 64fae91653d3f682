"""Storage formats: how the kernels read an array's elements as numbers and write them back.

The math of every rule runs in float32 (float64 for float64 params); an array may store its
elements as float64, float32, bfloat16 or float16. Numba's CPU target has no 16-bit float
arithmetic, so a 16-bit array reaches the kernels as its bits, viewed without a copy:

    bfloat16 -> uint16   (``ml_dtypes.bfloat16``, the dtype JAX uses, or torch.bfloat16)
    float16  -> int16    (NumPy's, CuPy's, torch's float16)

The integer type of the view names the format (the kernels are typed on it), and
:func:`load` / :func:`store` convert with bit operations that compile alike for the CPU and
for CUDA (a bit cast, shifts, one float32 add or subtract for float16's subnormals): no
float64, and the CPU loops still vectorize. Rounding is to nearest even, as NumPy's and
torch's casts; :func:`store` with a ``noise`` word rounds stochastically instead (unbiased:
a value is rounded up with probability equal to its distance from the value below).

Outside a compiled kernel (the CUDA simulator runs kernels in Python) the same functions
run as plain NumPy code with the same results.
"""
import numpy as np
from numba import types
from numba.extending import intrinsic, overload, register_jitable

try:
    import ml_dtypes
    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml-dtypes is a dependency
    BFLOAT16 = None

FLOAT16 = np.dtype(np.float16)
#: a 16-bit format -> the integer dtype its bits travel as
BITS = {FLOAT16: np.dtype(np.int16), **({BFLOAT16: np.dtype(np.uint16)} if BFLOAT16 is not None else {})}
#: the formats by name, as users and state dicts name them
BY_NAME = {"float64": np.dtype(np.float64), "float32": np.dtype(np.float32), "float16": FLOAT16,
           **({"bfloat16": BFLOAT16} if BFLOAT16 is not None else {})}
FLOATS = tuple(BY_NAME.values())


def kernel_view(a):
    """``a`` as the kernels see it: a 16-bit float array (NumPy, CuPy, Numba device array)
    viewed as its bits, without a copy; any other array, or None, as it is."""
    bits = BITS.get(_dtype_or_none(getattr(a, "dtype", None)))
    return a if bits is None else a.view(bits)


def _dtype_or_none(dtype):
    """``dtype`` as a NumPy dtype, or None for None (NumPy would say float64) or a torch dtype."""
    if dtype is None:
        return None
    try:
        return np.dtype(dtype)
    except TypeError:  # a torch dtype
        return None


_COMPUTE = {}  # dtype (as given) -> its compute dtype: asked at every step, np.dtype(...) costs


def compute_dtype(dtype):
    """The dtype the math runs in for arrays stored as ``dtype``: float64 stays, every
    narrower float computes in float32."""
    found = _COMPUTE.get(dtype)
    if found is None:
        found = np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)
        _COMPUTE[dtype] = found
    return found


def kernel_dtype(dtype):
    """The dtype the kernels see for ``dtype`` (a dtype or its name; its bits for a 16-bit float)."""
    dtype = np.dtype(BY_NAME.get(dtype, dtype) if isinstance(dtype, str) else dtype)
    return BITS.get(dtype, dtype)


def format_of(kernel_dtype_):
    """The stored dtype behind a kernel dtype (inverse of :func:`kernel_dtype`)."""
    for fmt, bits in BITS.items():
        if bits == kernel_dtype_:
            return fmt
    return np.dtype(kernel_dtype_)


# -- bit casts: Python functions for the simulator and the host, intrinsics when compiled ---

def f32_from_bits(bits):
    """The float32 whose bits are the low 32 of ``bits``."""
    return np.array(int(bits) & 0xFFFFFFFF, np.uint32).view(np.float32)[()]


def bits_from_f32(x):
    """The bits of the float32 ``x``, as a uint32."""
    return np.array(x, np.float32).view(np.uint32)[()]


@intrinsic
def _f32_from_bits(typingctx, bits):
    def codegen(context, builder, signature, args):
        value = args[0]
        if bits.bitwidth > 32:
            value = builder.trunc(value, context.get_value_type(types.uint32))
        return builder.bitcast(value, context.get_value_type(types.float32))
    return types.float32(bits), codegen


@intrinsic
def _bits_from_f32(typingctx, x):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.uint32))
    return types.uint32(types.float32), codegen


@intrinsic
def _f32_from_bf16_bits(typingctx, bits):
    """bfloat16 bits -> float32: the high half of its bits (exact), in 32-bit words."""
    def codegen(context, builder, signature, args):
        from llvmlite import ir
        i32 = ir.IntType(32)
        word = builder.zext(builder.trunc(args[0], ir.IntType(16)), i32)
        return builder.bitcast(builder.shl(word, ir.Constant(i32, 16)), ir.FloatType())
    return types.float32(bits), codegen


@intrinsic
def _bf16_bits_from_f32(typingctx, x, noise):
    """float32 -> bfloat16 bits, in 32-bit words (the vectorizer's unit): to nearest even,
    or with ``noise`` (a uint32) up with probability (its low 16 bits) / 2**16; a NaN stays a
    quiet NaN of the same sign. A float64 is first rounded to float32."""
    def codegen(context, builder, signature, args):
        from llvmlite import ir
        i32 = ir.IntType(32)

        def c(v):
            return ir.Constant(i32, v)
        value = args[0] if x == types.float32 else builder.fptrunc(args[0], ir.FloatType())
        b = builder.bitcast(value, i32)
        if isinstance(noise, (types.NoneType, types.Omitted)):
            add = builder.add(c(0x7FFF), builder.and_(builder.lshr(b, c(16)), c(1)))
        else:
            add = builder.and_(builder.trunc(args[1], i32) if args[1].type.width > 32 else args[1], c(0xFFFF))
        rounded = builder.lshr(builder.add(b, add), c(16))
        nan = builder.or_(builder.lshr(b, c(16)), c(0x40))
        isnan = builder.fcmp_unordered("uno", value, value)
        return builder.trunc(builder.select(isnan, nan, rounded), ir.IntType(16))
    return types.uint16(x, noise), codegen


@intrinsic
def _f32_from_half_bits(typingctx, bits):
    """float16 bits -> float32 by the hardware conversion (x86 F16C, CUDA cvt.f32.f16): exact."""
    def codegen(context, builder, signature, args):
        from llvmlite import ir
        h = args[0] if bits.bitwidth == 16 else builder.trunc(args[0], ir.IntType(16))
        return builder.fpext(builder.bitcast(h, ir.HalfType()), ir.FloatType())
    return types.float32(bits), codegen


@intrinsic
def _half_bits_from_f32(typingctx, x):
    """float32 -> float16 bits by the hardware conversion: round to nearest even."""
    def codegen(context, builder, signature, args):
        from llvmlite import ir
        value = args[0] if x == types.float32 else builder.fptrunc(args[0], ir.FloatType())
        return builder.bitcast(builder.fptrunc(value, ir.HalfType()), ir.IntType(16))
    return types.int16(x), codegen


def _has_f16c():
    try:
        from llvmlite import binding
        return bool(binding.get_host_cpu_features().get("f16c", False))
    except Exception:  # pragma: no cover - no feature list: the bit form is always right
        return False


#: float16 through the hardware conversions (they vectorize; the bit form did not) where the
#: host CPU has them; CUDA always has them. Both give the same bits (tests check the bit form).
HALF_HARDWARE = _has_f16c()


@overload(f32_from_bits, target="generic")
def _f32_from_bits_impl(bits):
    return lambda bits: _f32_from_bits(bits)


@overload(bits_from_f32, target="generic")
def _bits_from_f32_impl(x):
    return lambda x: _bits_from_f32(x)


# the constants of Giesen's branch-light conversions (float_to_half_fast3_rtne, half_to_float)
_U = np.uint32
_F16_MAX = _U((127 + 16) << 23)          # 65536.0: at or above, float16 is inf
_F32_INF = _U(255 << 23)
_SUBNORMAL = _U(113 << 23)                # 2**-14, float16's smallest normal
_DENORM_MAGIC = _U(((127 - 15) + (23 - 10) + 1) << 23)
_REBIAS = _U((127 - 15) << 23)
_SHIFTED_EXP = _U(0x7C00 << 13)


# Every path is computed and one is selected by arithmetic (no branch, which Numba's IR
# would keep): the CPU loops stay vectorized.

def _pick(condition, a, b):
    """``a if condition else b`` for unsigned words, without a branch (a mask, not a
    multiply: AVX2 has no 64-bit multiply, and Numba widens these words to 64 bits)."""
    return b ^ ((a ^ b) & (_U(0) - _U(condition)))


def _load_bf16(bits):
    return f32_from_bits(_U(bits) << _U(16))


def _load_f16(bits):
    h = _U(bits) & _U(0xFFFF)
    o = (h & _U(0x7FFF)) << _U(13)
    exp = _SHIFTED_EXP & o
    normal = o + _REBIAS
    special = normal + _REBIAS  # inf, NaN
    tiny = bits_from_f32(f32_from_bits(normal + _U(1 << 23)) - f32_from_bits(_SUBNORMAL))  # zero, subnormal
    o = _pick(exp == _SHIFTED_EXP, special, _pick(exp == _U(0), tiny, normal))
    return f32_from_bits(o | ((h & _U(0x8000)) << _U(16)))


def _store_bf16(x, noise):
    b = bits_from_f32(np.float32(x))
    if noise is None:
        rounded = (b + _U(0x7FFF) + ((b >> _U(16)) & _U(1))) >> _U(16)  # to nearest, ties to even
    else:
        rounded = (b + (_U(noise) & _U(0xFFFF))) >> _U(16)       # up with probability (low bits) / 2**16
    nan = (b >> _U(16)) | _U(0x40)                                # a quiet NaN of the same sign
    return np.uint16(_pick(x != x, nan, rounded))


def _store_f16(x, noise):
    f = bits_from_f32(np.float32(x))
    sign = f & _U(0x80000000)
    f = f ^ sign
    big = _pick(f > _F32_INF, _U(0x7E00), _U(0x7C00))
    if noise is None:
        # a float16 subnormal or zero: a float add rounds at its exponent
        tiny = bits_from_f32(f32_from_bits(f) + f32_from_bits(_DENORM_MAGIC)) - _DENORM_MAGIC
        normal = (f + _U(0xFFF) + ((f >> _U(13)) & _U(1)) - _REBIAS) >> _U(13)
    else:  # below 2**-14 the spacing is 2**-24: add noise below it, then truncate
        scaled = f32_from_bits(f) * np.float32(16777216.0)  # exact: a power of two
        whole = np.float32(np.int32(scaled))
        up = np.float32(_U(noise) & _U(0xFFFFFF)) < (scaled - whole) * np.float32(16777216.0)
        tiny = _U(np.int32(whole)) + _U(up)
        normal = (f + (_U(noise) & _U(0x1FFF)) - _REBIAS) >> _U(13)
        # rounded up past float16's largest finite value (x in (65504, 65536)): kept at it, so
        # that a finite value never becomes inf by chance
        normal = _pick(normal < _U(0x7C00), normal, _U(0x7BFF))
    o = _pick(f >= _F16_MAX, big, _pick(f < _SUBNORMAL, tiny, normal))
    return np.int16(o | (sign >> _U(16)))


# -- what the kernels call ----------------------------------------------------------------

def load(array, i):
    """Element ``i`` of ``array`` as the math sees it: a float32 (or float64) number."""
    with np.errstate(over="ignore"):  # the unselected paths of a select may wrap
        if array.dtype == np.uint16:
            return _load_bf16(array[i])
        if array.dtype == np.int16:
            return _load_f16(array[i])
    return array[i]


def store(array, i, value, noise=None):
    """Write ``value`` as element ``i`` of ``array`` in its format; ``noise``: None (to
    nearest even) or a random 32-bit word (stochastic rounding)."""
    with np.errstate(over="ignore", invalid="ignore"):
        if array.dtype == np.uint16:
            array[i] = _store_bf16(value, noise)
        elif array.dtype == np.int16:
            array[i] = _store_f16(value, noise)
        else:
            array[i] = value


def noise(key, index, stream):
    """The random 32-bit word that rounds element ``index`` of the ``stream``-th array a
    launch writes; ``key`` (from :func:`rounding_key`) None: no noise, round to nearest."""
    if key is None:
        return None
    return np.uint32(_hash32(int(key), int(index), int(stream)))


_M32 = 0xFFFFFFFF


def _hash32(key, index, stream):
    """murmur3's 32-bit finalizer of the key, the index and the stream mixed in 32-bit words
    (Python ints: the reference of the compiled :func:`_hash32_compiled`)."""
    x = ((index & _M32) * 0x9E3779B9 + (index >> 32 & _M32) * 0x7FEB352D + ((key & _M32) ^ (key >> 32 & _M32))
         + stream * 0x85EBCA6B) & _M32
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & _M32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


@intrinsic
def _hash32_compiled(typingctx, key, index, stream):
    def codegen(context, builder, signature, args):
        from llvmlite import ir
        i32 = ir.IntType(32)

        def c(v):
            return ir.Constant(i32, v)

        def low(v):
            return builder.trunc(v, i32) if v.type.width > 32 else builder.zext(v, i32) if v.type.width < 32 else v

        def high(v):
            return builder.trunc(builder.lshr(v, ir.Constant(v.type, 32)), i32) if v.type.width > 32 else c(0)
        k, i, s = args
        x = builder.add(builder.mul(low(i), c(0x9E3779B9)), builder.mul(high(i), c(0x7FEB352D)))
        x = builder.add(builder.add(x, builder.xor(low(k), high(k))), builder.mul(low(s), c(0x85EBCA6B)))
        x = builder.xor(x, builder.lshr(x, c(16)))
        x = builder.mul(x, c(0x85EBCA6B))
        x = builder.xor(x, builder.lshr(x, c(13)))
        x = builder.mul(x, c(0xC2B2AE35))
        return builder.xor(x, builder.lshr(x, c(16)))
    return types.uint32(key, index, stream), codegen


def rounding_key(seed, step, offset=0):
    """The key of one launch: a counter-based hash of (seed, step, the launch's first
    element), so a run's rounding is reproducible and a resumed run rounds as the uninterrupted one."""
    return _mix(_mix(seed, step, 1), offset, 2)


_U64 = np.uint64


def _mix(key, index, stream):
    """splitmix64's finalizer of ``key + index * golden + stream * another odd constant``."""
    with np.errstate(over="ignore"):
        z = _U64(key) + _U64(index) * _U64(0x9E3779B97F4A7C15) + _U64(stream) * _U64(0xD1B54A32D192ED03)
        z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
        return z ^ (z >> _U64(31))


@overload(noise, target="generic")
def _noise_impl(key, index, stream):
    if isinstance(key, types.NoneType):
        return lambda key, index, stream: None
    return lambda key, index, stream: _hash32_compiled(key, index, stream)


def _is_bits(t, name):
    return isinstance(t, types.Array) and str(t.dtype) == name


@overload(load, target="generic")
def _load_impl(array, i):
    if _is_bits(array, "uint16"):
        return lambda array, i: _f32_from_bf16_bits(array[i])
    if _is_bits(array, "int16"):
        if HALF_HARDWARE:
            return lambda array, i: _f32_from_half_bits(array[i])
        return lambda array, i: _load_f16(array[i])
    return lambda array, i: array[i]


@overload(store, target="generic")
def _store_impl(array, i, value, noise=None):
    if _is_bits(array, "uint16"):
        def store_bf16(array, i, value, noise=None):
            array[i] = _bf16_bits_from_f32(value, noise)
        return store_bf16
    if _is_bits(array, "int16"):
        if HALF_HARDWARE and (noise is None or isinstance(noise, (types.NoneType, types.Omitted))):
            def store_f16_nearest(array, i, value, noise=None):
                array[i] = _half_bits_from_f32(value)
            return store_f16_nearest

        def store_f16(array, i, value, noise=None):
            array[i] = _store_f16(value, noise)
        return store_f16

    def store_float(array, i, value, noise=None):
        array[i] = value
    return store_float


_pick, _load_bf16, _load_f16, _store_bf16, _store_f16 = map(
    register_jitable, (_pick, _load_bf16, _load_f16, _store_bf16, _store_f16))

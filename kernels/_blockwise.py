"""8-bit blockwise optimizer state (Dettmers et al., "8-bit Optimizers via Block-wise
Quantization", ICLR 2022): a state array is cut into blocks of ``BLOCK`` = 256 values; each
block keeps one float32 scale, its absolute maximum ``absmax``, and one 8-bit code per value,

    x  ~  decode(code) * absmax,        decode: 256 values in [-1, 1] (signed) or [0, 1] (unsigned)

signed codes for states that change sign (first moments, momentum buffers), unsigned for
the second moments (``exp_avg_sq``, ``max_exp_avg_sq``, ``square_avg``). Two code maps:

* ``"fp8"`` (the default): a small float relative to the block scale, computed with bit
  operations, no table. Magnitude ``y = |x| / absmax`` in [0, 1] is stored with ``M = 3``
  mantissa bits and exponents ``emin .. 0`` (``emin = -14`` signed, with a sign bit; ``-30``
  unsigned), subnormal below ``2**emin``: ``decode(e * 8 + m) = 2**(emin - 1 + e) * (1 + m/8)``
  (``e >= 1``), ``m * 2**(emin - 3)`` (``e = 0``). Relative error <= 1/16 per value, over
  ``2**-17`` (signed) and ``2**-33`` (unsigned) of the block's range; 1 is exact, so the
  block's absmax round-trips exactly. Encoding is a float add (the subnormal range rounds
  at its spacing in hardware) or an integer add on the float's bits: it vectorizes.
* ``"dynamic"``: the paper's dynamic tree map (bitsandbytes' ``create_dynamic_map``): for
  decade ``i = 0..6``, ``2**i`` (signed, mirrored) or ``2**(i+1)`` (unsigned) values evenly
  spaced in ``10**(i-6) * [0.1, 1]``, plus 0 and 1. Decoding is a table read; encoding a
  branch-free binary search over the 255 midpoints (eight gathers). The signed map holds
  +1 but not -1 (as the paper's): a block whose absmax is negative comes back 0.8% short.

One fused pass per block (:func:`make_cpu` / :func:`make_cuda`): decode each state with
the block's old scale, run the rule's own math (the ``Rule`` declaration's function,
unchanged), write the parameter, find each state's new absmax, encode with it. On the CPU
a thread owns whole blocks: the new state values wait in a per-chunk scratch row (in L1,
allocated once per chunk of blocks, not per block) until the block's maximum is known, and
are encoded in the loop that updates the next block (the update waits on the divider, the
encoding does not: the two overlap). On CUDA a thread block is a quantization block: each
thread keeps its values in registers and the maxima meet in shared memory.

:func:`quantize` / :func:`dequantize` are the host (NumPy) forms, used to convert 32-bit
state in and out; ``reference_*`` are float64 NumPy references for the tests.
"""
import textwrap

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic, overload, register_jitable

from ._engine import _CPU_OPTIONS, _compile_factory, _enable_cache, cuda_salt, enable_cuda_cache
from ._formats import bits_from_f32, f32_from_bits, load, noise, store

BLOCK = 256            # values per quantization block (one float32 scale each)
MIN_SIZE = 4096        # tensors below this keep 32-bit state, as bitsandbytes
PREFETCH_AHEAD = 2048  # elements between a block and the data the CPU pass prefetches for (measured)
CODES = ("fp8", "dynamic")
DEFAULT_CODE = "fp8"
#: the states that have an 8-bit form: signed (True) or unsigned (False) code
SIGNED = {"exp_avg": True, "momentum_buffer": True, "grad_avg": True,
          "exp_avg_sq": False, "max_exp_avg_sq": False, "square_avg": False}
#: the rules (by kernel name) with an 8-bit form; AdamW runs Adam's kernels
RULES = ("adam", "lion", "sgd", "rmsprop")

_F = np.float32
_U = np.uint32
_I = np.int64  # the normal-range encode subtracts: signed words, no wrap-around

# -- the fp8-like code: M mantissa bits, exponents emin..0 relative to the block scale --------
_M = 3
_EMIN_S, _EMIN_U = -14, -30


def _fp8_constants(emin):
    bias = _I((127 + emin - 1) << 23)                       # the bits of 2**(emin - 1), code 0's exponent
    magic = _F(2.0 ** (emin - _M + 23))                     # ulp = 2**(emin - M): the subnormal spacing
    return bias, magic, _I(np.array(magic).view(np.uint32)), _F(2.0 ** emin), _I((1 - emin) << _M)


_BIAS_S, _MAGIC_S, _MAGIC_BITS_S, _SMALLEST_S, _TOP_S = _fp8_constants(_EMIN_S)
_BIAS_U, _MAGIC_U, _MAGIC_BITS_U, _SMALLEST_U, _TOP_U = _fp8_constants(_EMIN_U)
_ONE = _F(1.0)
_FLT_MAX = _F(np.finfo(np.float32).max)
_ZERO = _F(0.0)
_ROUND = _I(1 << (22 - _M))
_SHIFT = _I(23 - _M)
_SUB_CODES = _I(1 << _M)
_EXP_ONE = _I(1 << 23)


def _fp8_encode_mag(y, bias, magic, magic_bits, smallest, top):
    """The code of ``y`` in [0, 1] (clamped): to nearest (ties up in the normal range)."""
    y = y if y < _ONE else _ONE
    normal = (_I(bits_from_f32(y)) - bias + _ROUND) >> _SHIFT
    tiny = _I(bits_from_f32(y + magic)) - magic_bits  # the float add rounds at the subnormal spacing
    code = tiny if y < smallest else normal
    return code if code < top else top


def _fp8_decode_mag(code, bias, smallest):
    bits = (_I(code) << _SHIFT) + bias
    normal = f32_from_bits(bits)
    tiny = f32_from_bits(bits + _EXP_ONE) - smallest  # 2**emin * (1 + m/8) - 2**emin = m * 2**(emin-3)
    return tiny if _I(code) < _SUB_CODES else normal


# Python forms (the simulator, the host) and, compiled, LLVM intrinsics in 32-bit words: Numba
# widens integer arithmetic to 64 bits, which halves the SIMD lanes of every step. The CPU pass
# is bound by vector instructions (not memory) at 2 threads, so the intrinsics take the fewest:
# no clamps that cannot fire (x / absmax <= 1 up to the rounding of 1 / absmax, and a value a
# few ulps above 1 still rounds to the top code), one compare-and-select for the subnormal
# range, the sign moved with one mask. For |x * inv_scale| <= 1 they give the Python forms'
# codes and values, bit for bit (tests/test_state8bit.py).

def fp8_encode_signed(x, inv_scale):
    y = _F(x * inv_scale)
    mag = _fp8_encode_mag(abs(y), _BIAS_S, _MAGIC_S, _MAGIC_BITS_S, _SMALLEST_S, _TOP_S)
    return np.uint8(mag | (_I(128) if y < _ZERO else _I(0)))


def fp8_decode_signed(code, scale):
    v = _F(_fp8_decode_mag(_I(code) & _I(127), _BIAS_S, _SMALLEST_S) * scale)
    return -v if _I(code) >= _I(128) else v


def fp8_encode_unsigned(x, inv_scale):
    return np.uint8(_fp8_encode_mag(_F(x * inv_scale), _BIAS_U, _MAGIC_U, _MAGIC_BITS_U, _SMALLEST_U, _TOP_U))


def fp8_decode_unsigned(code, scale):
    return _F(_fp8_decode_mag(_I(code), _BIAS_U, _SMALLEST_U) * scale)


def _encode_intrinsic(signed):
    bias, magic, magic_bits, smallest = (
        (_BIAS_S, _MAGIC_S, _MAGIC_BITS_S, _SMALLEST_S) if signed else (_BIAS_U, _MAGIC_U, _MAGIC_BITS_U, _SMALLEST_U))

    @intrinsic
    def encode(typingctx, x, inv):
        def codegen(context, builder, signature, args):
            from llvmlite import ir
            i32, f32 = ir.IntType(32), ir.FloatType()

            def c(v):
                return ir.Constant(i32, int(v) & 0xFFFFFFFF)
            y = builder.fmul(args[0], args[1])
            b = builder.bitcast(y, i32)
            ab = builder.and_(b, c(0x7FFFFFFF)) if signed else b
            a = builder.bitcast(ab, f32)
            normal = builder.lshr(builder.add(ab, c(int(_ROUND) - int(bias))), c(_SHIFT))
            tiny = builder.sub(builder.bitcast(builder.fadd(a, ir.Constant(f32, float(magic))), i32), c(magic_bits))
            code = builder.select(builder.fcmp_ordered("<", a, ir.Constant(f32, float(smallest))), tiny, normal)
            if signed:  # the float's sign bit becomes the code's
                code = builder.or_(code, builder.and_(builder.lshr(b, c(24)), c(128)))
            return builder.trunc(code, ir.IntType(8))
        return types.uint8(types.float32, types.float32), codegen
    return encode


def _decode_intrinsic(signed):
    bias, smallest = (_BIAS_S, _SMALLEST_S) if signed else (_BIAS_U, _SMALLEST_U)

    @intrinsic
    def decode(typingctx, code, scale):
        def codegen(context, builder, signature, args):
            from llvmlite import ir
            i32, f32 = ir.IntType(32), ir.FloatType()

            def c(v):
                return ir.Constant(i32, int(v) & 0xFFFFFFFF)
            w = args[0] if args[0].type.width == 8 else builder.trunc(args[0], ir.IntType(8))
            if signed:  # sign-extended and shifted: the code's sign bit lands on the float's
                t = builder.shl(builder.sext(w, i32), c(_SHIFT))
                bits = builder.add(builder.and_(t, c(127 << _SHIFT)), c(bias))
                sub = builder.icmp_unsigned("==", builder.and_(t, c(120 << _SHIFT)), c(0))
            else:
                t = builder.shl(builder.zext(w, i32), c(_SHIFT))
                bits = builder.add(t, c(bias))
                sub = builder.icmp_unsigned("<", t, c(_SUB_CODES << _SHIFT))
            normal = builder.bitcast(bits, f32)
            # 2**emin * (1 + m/8) - 2**emin = m * 2**(emin-3), exact
            tiny = builder.fma(normal, ir.Constant(f32, 2.0), ir.Constant(f32, -float(smallest)))
            v = builder.select(sub, tiny, normal)
            if signed:
                v = builder.bitcast(builder.or_(builder.bitcast(v, i32), builder.and_(t, c(0x80000000))), f32)
            return builder.fmul(v, args[1])
        return types.float32(code, types.float32), codegen
    return decode


def _register(py, fn):
    @overload(py, target="generic")
    def _impl(a, b):
        return lambda a, b: fn(a, b)


for _py, _make, _signed in ((fp8_encode_signed, _encode_intrinsic, True),
                            (fp8_encode_unsigned, _encode_intrinsic, False),
                            (fp8_decode_signed, _decode_intrinsic, True),
                            (fp8_decode_unsigned, _decode_intrinsic, False)):
    _register(_py, _make(_signed))


@register_jitable
def fp8_enc_s(x, inv_scale):
    return fp8_encode_signed(x, inv_scale)


@register_jitable
def fp8_dec_s(code, scale):
    return fp8_decode_signed(code, scale)


@register_jitable
def fp8_enc_u(x, inv_scale):
    return fp8_encode_unsigned(x, inv_scale)


@register_jitable
def fp8_dec_u(code, scale):
    return fp8_decode_unsigned(code, scale)


# -- the dynamic (tree) map of the paper ----------------------------------------------------

def dynamic_map(signed):
    """The 256 values of the dynamic map, ascending (bitsandbytes' ``create_dynamic_map`` with
    ``max_exponent_bits=7``): per decade ``i`` of ``10**(i-6) * [0.1, 1]`` the midpoints of
    ``2**i`` (signed, and their negatives) or ``2**(i+1)`` (unsigned) equal intervals; 0 and 1."""
    data = []
    for i in range(7):
        items = 2 ** i + 1 if signed else 2 ** (i + 1) + 1
        bounds = np.linspace(0.1, 1, items, dtype=np.float32)
        means = (bounds[:-1] + bounds[1:]) / 2
        data += list(10.0 ** (i - 6) * means.astype(np.float64))
        if signed:
            data += list(-(10.0 ** (i - 6)) * means.astype(np.float64))
    data += [0.0, 1.0]
    assert len(data) == 256
    return np.array(sorted(np.float32(data)), np.float32)


_DYN_S, _DYN_U = dynamic_map(True), dynamic_map(False)
# the search keys: the 255 midpoints (in float32), padded with +inf to a power of two
_MID_S = np.append((_DYN_S[:-1] + _DYN_S[1:]) / _F(2), _F(np.inf)).astype(np.float32)
_MID_U = np.append((_DYN_U[:-1] + _DYN_U[1:]) / _F(2), _F(np.inf)).astype(np.float32)


@register_jitable
def _search(mid, y):
    """The number of midpoints below ``y``: the index of the nearest map value (8 steps, no branch)."""
    k = 0
    for step in (128, 64, 32, 16, 8, 4, 2, 1):
        k = k + step if mid[k + step - 1] < y else k
    return k


@register_jitable
def dynamic_encode_signed(x, inv_scale):
    y = x * inv_scale
    y = y if y < _ONE else _ONE
    return np.uint8(_search(_MID_S, y))


@register_jitable
def dynamic_decode_signed(code, scale):
    return _DYN_S[code] * scale


@register_jitable
def dynamic_encode_unsigned(x, inv_scale):
    y = x * inv_scale
    y = y if y < _ONE else _ONE
    return np.uint8(_search(_MID_U, y))


@register_jitable
def dynamic_decode_unsigned(code, scale):
    return _DYN_U[code] * scale


#: code name -> signed -> (encode(x, 1/absmax) -> uint8, decode(code, absmax) -> float32)
CODEC = {"fp8": {True: (fp8_enc_s, fp8_dec_s), False: (fp8_enc_u, fp8_dec_u)},
         "dynamic": {True: (dynamic_encode_signed, dynamic_decode_signed),
                     False: (dynamic_encode_unsigned, dynamic_decode_unsigned)}}


def code_table(code, signed):
    """The 256 decoded values of a code map (by code), float64: the reference's view of it."""
    if code == "dynamic":
        return (_DYN_S if signed else _DYN_U).astype(np.float64)
    _, decode = CODEC[code][signed]
    table = np.array([decode(np.uint8(c), _ONE) for c in range(256)], np.float64)
    top = int(_TOP_S if signed else _TOP_U)
    unused = np.arange(256) % (128 if signed else 256) > top
    return np.where(unused, np.inf, table)  # codes above 1 are never written


# -- host conversions -----------------------------------------------------------------------

def n_blocks(n):
    return -(-int(n) // BLOCK)


def _host_forms(code, signed):
    encode, decode = CODEC[code][signed]
    enc, dec, inv = njit(**_CPU_OPTIONS)(encode), njit(**_CPU_OPTIONS)(decode), njit(**_CPU_OPTIONS)(inv_scale)
    finite = njit(**_CPU_OPTIONS)(finite_scale)

    @njit(**_CPU_OPTIONS)
    def quant(x, codes, absmax):
        for b in range(absmax.size):
            lo, hi = b * BLOCK, min(b * BLOCK + BLOCK, x.size)
            m = _ZERO
            for i in range(lo, hi):
                a = abs(x[i])
                m = a if a > m else m
            m = finite(m)
            absmax[b] = m
            s = inv(m)
            for i in range(lo, hi):
                codes[i] = enc(x[i], s)

    @njit(**_CPU_OPTIONS)
    def dequant(codes, absmax, out):
        for i in range(codes.size):
            out[i] = dec(codes[i], absmax[i // BLOCK])
    return quant, dequant


_HOST = {}


def _host(code, signed):
    if (code, signed) not in _HOST:
        _HOST[code, signed] = _host_forms(code, signed)
    return _HOST[code, signed]


def quantize(x, signed, code=DEFAULT_CODE):
    """``(codes uint8, absmax float32 per block)`` of the values ``x`` (flat, rounded to float32 first)."""
    x = np.ascontiguousarray(np.asarray(x, np.float32).reshape(-1))
    codes, absmax = np.empty(x.size, np.uint8), np.empty(n_blocks(x.size), np.float32)
    _host(code, signed)[0](x, codes, absmax)
    return codes, absmax


def dequantize(codes, absmax, signed, code=DEFAULT_CODE):
    """The float32 values of ``codes`` (flat) with their blocks' ``absmax``."""
    codes = np.ascontiguousarray(codes).reshape(-1)
    out = np.empty(codes.size, np.float32)
    _host(code, signed)[1](codes, np.ascontiguousarray(absmax, np.float32), out)
    return out


def reference_quantize(x, signed, code=DEFAULT_CODE):
    """Float64 NumPy reference: absmax per block, then the code of the nearest map value."""
    x = np.asarray(x, np.float64).reshape(-1)
    nb = n_blocks(x.size)
    padded = np.zeros(nb * BLOCK)
    padded[:x.size] = x
    absmax = np.abs(padded.reshape(nb, BLOCK)).max(axis=1)
    y = padded / np.repeat(np.where(absmax > 0, absmax, 1.0), BLOCK)
    table = code_table(code, signed)
    codes = np.abs(y[:, None] - table[None, :]).argmin(axis=1).astype(np.uint8)
    return codes[:x.size], absmax.astype(np.float32)


def reference_dequantize(codes, absmax, signed, code=DEFAULT_CODE):
    table = code_table(code, signed)
    return table[np.asarray(codes).reshape(-1)] * np.repeat(np.asarray(absmax, np.float64), BLOCK)[:codes.size]


# -- the fused kernels ----------------------------------------------------------------------

_CPU_BLOCK = """
            cur = b < b1
            lo = np.uint64(b * block_size)
            hi = np.uint64(min(b * block_size + block_size, n)) if cur else lo
            plo = lo - np.uint64(block_size)
            phi = np.uint64(min(b * block_size, n)) if b > b0 else plo
{row_offsets}
            if cur:
                # the hardware prefetchers alone left the pass ~15% short of its speed at 2 threads
                # (many streams, each crossing a page every 4 blocks)
                far = hi + np.uint64(ahead)
                for k in range(np.uint64(0), np.uint64(block_size), np.uint64(16)):  # a line: 16 floats
                    prefetch(param, far + k)
                    prefetch(grad, far + k)
{prefetch_codes}
            # decode with the old scales, the rule's math, store p, keep the new states in the
            # scratch rows (in L1) and their maxima: an integer maximum of the float bits with the
            # sign cleared vectorizes where a float one needs fast-math (a NaN wins: the block's
            # scale becomes NaN, as the state would be)
{olds}
            if hi - lo == np.uint64(block_size) and phi - plo == np.uint64(block_size):
                for j in range(np.uint64(0), np.uint64(block_size)):
                    i = lo + j
{update}
{encode_codes}
{copy}
            else:  # the first and last blocks of a chunk, a tensor's short last block
                for i in range(lo, hi):
                    j = i - lo
{update}
                for i in range(plo, phi):
                    j = i - plo
{encode_states}
            if cur:  # the new scales, for the encoding in the next iteration
{scales}
"""

_CPU_TEMPLATE = """
def make(math, load, store, jit, prange, item, noise, np, inv, finite, abs_bits, from_bits, prefetch, ahead,
         block_size, wide{codecs}):
    # Indices are unsigned (no negative-index wrap-around, which stops the vectorizer) and
    # the arrays are whole, never sliced per block: a slice costs an atomic reference count,
    # which all threads would bounce between them on every block. The loops of a block are
    # here, not in functions of their own: a call per block (LLVM declined to inline it)
    # passed every argument through the stack.
    @jit
    def chunk(param, grad, {qa}master, b0, b1, c, base, scratch, codes):
        wide()
        n = param.size
        rows = np.uint64({n_rows} * block_size)  # one block's new states; scratch holds two such sets
{inv_init}
        # Block b's update runs in one loop with the encoding of block b - 1 (its scale known
        # since the previous iteration): the divider (sqrt, division of the update) is the
        # bottleneck of the update and the encoding needs none, so the two overlap; an encode
        # loop of its own left the divider idle. The last iteration only encodes. The codes of
        # block b - 1 wait in a row of ``codes`` and are copied after the loop: written straight
        # into the code array that the same loop reads (block b), LLVM's overlap check sent every
        # block down the scalar loop (5x slower).
        # Blocks go in pairs, so that which set of scratch rows a block writes (and which the
        # encoding reads) is a constant in each copy of the block's code: with offsets that
        # depend on the block, LLVM checked the scratch rows against each other on every block.
        b = b0
        while b <= b1:
            w, v = np.uint64(0), rows  # block b writes the first set, block b - 1's is the second
{block_first}            b += 1
            if b <= b1:
                w, v = rows, np.uint64(0)
{block_second}                b += 1

    def multi_loop(params, grads, {qas}masters, table, c):
        # table[k] = (tensor, first block, end block): a thread owns whole blocks
        for k in prange(table.shape[0]):
            t = table[k, 0]
            scratch = np.empty(2 * {n_rows} * block_size, np.float32)  # once per chunk of blocks
            codes = np.empty({n_rows} * block_size, np.uint8)
            chunk(params[t], grads[t], {items}item(masters, t), table[k, 1], table[k, 2], c, t << 32, scratch, codes)

    return multi_loop
"""


def _states_args(n):
    return "".join(f"q{k}, a{k}, " for k in range(n))


def generate_cpu(n_states, scalar_positions):
    """The CPU source for a math of ``n_states`` states (each as codes ``q`` and per-block
    scales ``a``, or both None) with its scalars at ``scalar_positions`` of the kernel tuple."""
    key = 1 + len(scalar_positions)
    ks = range(n_states)

    def each(text, indent, empty="pass"):  # text per state k, "{k}" its number
        return textwrap.indent("\n".join(text.replace("{k}", str(k)) for k in ks) or empty, " " * indent)

    xs = "".join(f"x{k}, " for k in ks)
    call = (f"p, {xs or '_,'} = math(load(master, i) if master is not None else load(param, i), g, {xs}"
            + ", ".join(f"c[{1 + p}]" for p in scalar_positions) + ")").replace("p, _, = math(", "p = math(")
    update = "\n".join([
        "g = load(grad, i) * c[0]",
        each("x{k} = dec{k}(q{k}[i], old{k}) if q{k} is not None else g", 0, ""),
        call,
        "if master is not None:\n    store(master, i, p)\n    store(param, i, p)",  # nearest: the master is exact
        f"else:\n    store(param, i, p, noise(c[{key}], base + np.int64(i), 0))",
        each("if q{k} is not None:\n    scratch[w{k} + j] = x{k}\n    a = abs_bits(x{k})\n"
             "    m{k} = a if a > m{k} else m{k}", 0, "")]).replace("\n\n", "\n")
    encode = "if q{k} is not None:\n    %s = enc{k}(scratch[v{k} + j], inv{k})"
    block = _CPU_BLOCK.lstrip("\n").format(
        row_offsets=each("w{k}, v{k} = w + np.uint64({k} * block_size), v + np.uint64({k} * block_size)\n"
                         "c{k} = np.uint64({k} * block_size)", 12),
        olds=each("old{k} = a{k}[b] if q{k} is not None and cur else c[0]\nm{k} = np.int32(0)", 12),
        update=textwrap.indent(update, " " * 20),
        encode_codes=each(encode % "codes[c{k} + j]", 20),
        encode_states=each(encode % "q{k}[i]", 20),
        copy=each("if q{k} is not None:\n    for j in range(np.uint64(0), np.uint64(block_size)):\n"
                  "        q{k}[plo + j] = codes[c{k} + j]", 16),
        scales=each("if q{k} is not None:\n    m = finite(from_bits(m{k}))\n    a{k}[b] = m\n    inv{k} = inv(m)", 16),
        prefetch_codes=textwrap.indent(
            "for k in range(np.uint64(0), np.uint64(block_size), np.uint64(64)):  # a line: 64 codes\n"
            + each("if q{k} is not None:\n    prefetch(q{k}, far + k)", 4), " " * 16) if n_states else "")
    return _CPU_TEMPLATE.format(
        block_first=block, block_second=textwrap.indent(block, " " * 4),
        codecs="".join(f", enc{k}, dec{k}" for k in ks),
        qa=_states_args(n_states),
        inv_init=each("inv{k} = np.float32(0.0)", 8),
        qas="".join(f"q{k}s, a{k}s, " for k in ks),
        items="".join(f"item(q{k}s, t), item(a{k}s, t), " for k in ks),
        n_rows=max(n_states, 1))


@intrinsic
def prefetch(typingctx, array, index):
    """Ask for the cache line of ``array[index]`` ahead of use (x86 ``prefetcht0``); it never
    faults, so an index past the end is harmless."""
    def codegen(context, builder, signature, args):
        from llvmlite import ir
        from numba.core import cgutils
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                            "llvm.prefetch.p0i8")
        # read, keep in all levels, data cache
        builder.call(fn, [builder.bitcast(builder.gep(data, [args[1]]), i8p), ir.Constant(i32, 0),
                          ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return types.void(array, index), codegen


@intrinsic
def wide_vectors(typingctx):
    """Let LLVM vectorize the calling function with 512-bit registers where the CPU has them
    (AVX-512): its default on such CPUs is 256 bits, the right choice for memory-bound loops,
    but this pass is bound by vector instructions, and 512-bit ones halve their count.
    Without AVX-512 the attributes change nothing; the values are the same bits either way
    (elementwise math, an exact integer maximum). Measured, AdamW 8-bit at 1e7 on 2 threads:
    4.51 -> 4.16 ms. llvmlite knows no string attributes: they go into its set directly."""
    def codegen(context, builder, signature, args):
        attributes = builder.function.attributes
        if isinstance(attributes, set):  # a llvmlite whose attribute set is no set: a hint lost, nothing else
            for attribute in ('"prefer-vector-width"="512"', '"min-legal-vector-width"="512"'):
                set.add(attributes, attribute)
        return context.get_dummy_value()
    return types.void(), codegen


@register_jitable
def abs_bits(x):
    """The bits of ``|x|`` (float32) as an int32: their order is the values' (a NaN above all)."""
    return np.int32(bits_from_f32(x) & _U(0x7FFFFFFF))


@register_jitable
def from_bits(m):
    return f32_from_bits(_U(m))


def _item(arrays, t):
    """``arrays[t]``, or None where the state slot is unused."""


@overload(_item)
def _item_impl(arrays, t):
    if isinstance(arrays, types.NoneType):
        return lambda arrays, t: None
    return lambda arrays, t: arrays[t]


_CUDA_TEMPLATE = '''
def make(math, load, store, noise, float32, inv, finite, block_size{codecs}):
    def kernel(param, grad, {qa}master, c):
        # a thread block per quantization block (block_size threads): values in registers,
        # the block's maxima meet in shared memory
        sh = cuda.shared.array(({n_rows}, block_size), float32)
        tid = cuda.threadIdx.x
        n = param.size
        for b in range(cuda.blockIdx.x, (n + block_size - 1) // block_size, cuda.gridDim.x):
            i = b * block_size + tid
            inside = i < n
{inits}
            if inside:
                g = load(grad, i) * c[0]
{loads}
                p, {outs} = math(load(master, i) if master is not None else load(param, i), g, {ins}{scalars})
                if master is not None:  # the master copy keeps the exact value: the param is its nearest rounding
                    store(master, i, p)
                    store(param, i, p)
                else:
                    store(param, i, p, noise(c[{key}], i, 0))
{shares}
            cuda.syncthreads()  # every thread has read the old scales and shared its value
            s = block_size // 2
            while s > 0:
                if tid < s:
{reduce}
                cuda.syncthreads()
                s //= 2
{encode}
            cuda.syncthreads()  # the maxima are read before the next block reuses the rows
    return kernel
'''


def generate_cuda(n_states, scalar_positions):
    key = 1 + len(scalar_positions)
    ks = range(n_states)
    return _CUDA_TEMPLATE.format(
        codecs="".join(f", enc{k}, dec{k}" for k in ks),
        qa=_states_args(n_states),
        n_rows=max(n_states, 1),
        inits="\n".join(f"            x{k} = float32(0.0)" for k in ks) or "            pass",
        loads="\n".join(f"                x{k} = dec{k}(q{k}[i], a{k}[b]) if q{k} is not None else g" for k in ks)
        or "                pass",
        outs="".join(f"x{k}, " for k in ks) or "_,",
        ins="".join(f"x{k}, " for k in ks),
        scalars=", ".join(f"c[{1 + p}]" for p in scalar_positions),
        key=key,
        shares="\n".join(f"            if q{k} is not None:\n                sh[{k}, tid] = abs(x{k})" for k in ks)
        or "            pass",
        reduce="\n".join(f"                    if q{k} is not None:\n                        u = sh[{k}, tid + s]\n"
                         f"                        sh[{k}, tid] = u if u > sh[{k}, tid] else sh[{k}, tid]" for k in ks)
        or "                    pass",
        encode="\n".join(f"            if q{k} is not None:\n                m{k} = finite(sh[{k}, 0])\n"
                         f"                if inside:\n                    q{k}[i] = enc{k}(x{k}, inv(m{k}))\n"
                         f"                if tid == 0:\n                    a{k}[b] = m{k}" for k in ks)
        or "            pass").replace("p, _, = math(", "p = math(")


@register_jitable
def finite_scale(m):
    """A block's scale: its absmax, float32's largest value for an inf one (an overflowed
    square of a huge gradient: 1 / inf would encode the whole block as 0 and decode it as
    0 * inf = NaN; this way the inf element decodes as that largest value and the others as 0).
    NaN stays NaN (nonfinite="propagate" asked for it)."""
    return m if m <= _FLT_MAX or m != m else _FLT_MAX


@register_jitable
def inv_scale(m):
    """``1 / absmax``, 0 for an all-zero block (its codes then encode 0)."""
    return _ONE / m if m > _ZERO else _ZERO


class Blockwise:
    """The 8-bit forms of one rule's :class:`~._engine.Kernels` with code map ``code``:
    ``cpu(parallel)(params, grads, *(codes, scales) per state, masters, table, c)`` over typed
    lists (a state's lists None: not kept), ``cuda()`` over one tensor ``(param, grad, *(codes,
    scales), master, c)``, launched with ``BLOCK`` threads a block."""

    def __init__(self, kernels, code=DEFAULT_CODE):
        if code not in CODES:
            raise ValueError(f"code must be one of {', '.join(map(repr, CODES))}, got {code!r}")
        self.kernels, self.code = kernels, code
        unknown = [s for s in kernels.states if s not in SIGNED]
        if unknown:
            raise ValueError(f"{kernels.name}: no 8-bit form for states {unknown}")
        self.signed = tuple(SIGNED[s] for s in kernels.states)
        self._cpu, self._cuda = {}, None
        sc = kernels.scalars  # where the constant flags sit in the kernel tuple
        self._false_flags = frozenset(1 + sc.order.index(n) for n in sc.constant if n in sc.flags)

    def _codecs(self):
        return [f for s in self.signed for f in CODEC[self.code][s]]

    def cpu(self, parallel):
        """The CPU pass; call it with :meth:`cpu_scalars` of the kernel tuple."""
        if parallel not in self._cpu:
            n, jit = len(self.kernels.states), njit(**_CPU_OPTIONS)
            make = _compile_factory(generate_cpu(n, self.kernels._positions))
            # "contract": a * b + c in one FMA (the pass is bound by vector instructions); the
            # 8-bit state rounds far more than the last bit this moves
            math = njit(fastmath={"contract"}, **_CPU_OPTIONS)(self.kernels.math)
            loop = make(math, load, store, jit, prange, _item, noise, np, jit(inv_scale), jit(finite_scale),
                        jit(abs_bits), jit(from_bits), prefetch, PREFETCH_AHEAD, BLOCK, wide_vectors,
                        *[jit(f) for f in self._codecs()])
            kind = "parallel" if parallel else "serial"
            self._cpu[parallel] = _enable_cache(njit(parallel=parallel, **_CPU_OPTIONS)(loop),
                                                f"{self.kernels.name}_8bit_{self.code}_{kind}",
                                                self.kernels._salt + _SALT)
        return self._cpu[parallel]

    def cpu_scalars(self, c):
        """The kernel tuple ``c`` with each constant flag that is False passed as None: the
        math's branch on it is pruned when it compiles (one specialization per set of options).
        A runtime False flag still costs its branch: the vectorizer computes both sides, such
        as the division of a proximal step nobody asked for."""
        return tuple(None if k in self._false_flags and v is False else v for k, v in enumerate(c))

    def cuda_loop(self):
        """The Python CUDA kernel (not compiled), for ``cuda.jit`` or ``compile_ptx``."""
        from numba import cuda, float32
        n, dev = len(self.kernels.states), cuda.jit(device=True)
        scope = {"__name__": __name__, "cuda": cuda}  # cuda a global of the kernel: the simulator swaps it
        exec(compile(generate_cuda(n, self.kernels._positions), __file__, "exec"), scope)  # noqa: S102
        return scope["make"](dev(self.kernels.math), load, store, noise, float32, dev(inv_scale), dev(finite_scale),
                             BLOCK,
                    *[dev(f) for f in self._codecs()])

    def cuda(self):
        if self._cuda is None:
            from numba import cuda
            self._cuda = enable_cuda_cache(cuda.jit(self.cuda_loop()), f"{self.kernels.name}_8bit_{self.code}_cuda",
                                           cuda_salt(self.kernels._salt + _SALT))
        return self._cuda

    def launch_cuda(self, arrays, scalars):
        """Launch on one tensor's CUDA arrays ``(param, grad, *(codes, scales), master)``."""
        from numba import config, cuda

        from ._dispatch import _stream_of, device_views
        flat = device_views(arrays)
        if config.ENABLE_CUDASIM:
            stream, blocks = 0, 2
        else:
            stream, blocks = _stream_of(arrays[0], cuda), min(n_blocks(flat[0].size), 65535)
        self.cuda()[max(1, min(blocks, n_blocks(flat[0].size))), BLOCK, stream](*flat, scalars)


_BLOCKWISE = {}


def blockwise(kernels, code=DEFAULT_CODE):
    """The (cached) :class:`Blockwise` of ``kernels`` with ``code``."""
    key = (id(kernels), code)
    if key not in _BLOCKWISE:
        _BLOCKWISE[key] = Blockwise(kernels, code)
    return _BLOCKWISE[key]


def _source_salt():
    import hashlib
    import inspect
    import sys
    return hashlib.sha256(inspect.getsource(sys.modules[__name__]).encode()).hexdigest()


_SALT = _source_salt()


def block_table(sizes, chunk_blocks=128):
    """Rows ``(tensor, first block, end block)`` for every tensor of ``sizes`` that is not
    None: whole blocks, at most ``chunk_blocks`` a row, so threads share a big tensor."""
    rows = []
    for t, n in enumerate(sizes):
        if n is None:
            continue
        nb = n_blocks(n)
        rows += [(t, b, min(b + chunk_blocks, nb)) for b in range(0, nb, chunk_blocks)]
    return np.array(rows, np.int64).reshape(-1, 3)


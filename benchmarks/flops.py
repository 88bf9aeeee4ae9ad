"""FLOPs of a JAX function counted from its jaxpr, the same on every backend.

XLA's cost analysis depends on the backend: on the GPU the networks' lowered-but-not-compiled
analysis returned 0 FLOPs (so the benchmark printed ``GFLOP/image n/a`` and no MFU there), and
a compiled executable counts a while loop's body once whatever its trip count. Counting the
traced program instead needs no compile and gives one figure for CPU, GPU and TPU:

- ``dot_general``: 2 x output elements x contracted size;
- ``conv_general_dilated``: 2 x output elements x kernel elements per output feature, less
  the taps that fall on padding (XLA counts so);
- a fused attention primitive (cuDNN's, on GPUs in half precision): its two matmuls;
- elementwise arithmetic, comparisons, conversions and reductions: one per element, as XLA
  counts them; transcendentals (exp, rsqrt, tanh, ...) are not FLOPs in XLA's count either.

Sub-programs (jit, custom_jvp/vjp, remat, cond) are walked; a ``scan`` counts its body times its
length, a ``while`` loop once (its trip count is a runtime value). tests/test_flops.py checks
the total against XLA's own count on CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
from jax.extend import core as jcore

# FLOPs per output element, as XLA's HloCostAnalysis counts the HLO these lower to (checked
# one by one against jax.jit(f).lower(x).cost_analysis() on CPU): a logistic is 1/(1+exp(-x)).
_ELEMENTWISE = {name: 1 for name in (
    "add", "sub", "mul", "div", "neg", "max", "min", "abs", "sign", "floor", "ceil", "round",
    "rem", "pow", "square", "select_n", "clamp", "add_any", "nextafter", "convert_element_type",
    "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "not", "xor")}
_ELEMENTWISE["logistic"] = 3
_ELEMENTWISE["erfc"] = 62  # exact GELU's erfc: lowered to a rational polynomial (jax 0.10)
# One FLOP per input element that is folded into an output.
_REDUCTIONS = frozenset({"reduce_sum", "reduce_max", "reduce_min", "reduce_prod",
                         "reduce_and", "reduce_or", "argmax", "argmin"})


def _size(aval) -> int:
    return math.prod(getattr(aval, "shape", ()))


def _dot_general(eqn) -> float:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return 2.0 * _size(eqn.outvars[0].aval) * math.prod(lhs[d] for d in lhs_contract)


def _valid_taps(size: int, out: int, window: int, stride: int, pad_lo: int,
                lhs_dilation: int, rhs_dilation: int) -> int:
    """(output position, kernel tap) pairs of one spatial dimension that read the input, not
    its padding: a 3x3 convolution over an 8x8 map multiplies 84% of what 9 taps a pixel
    would say, and XLA counts only those."""
    dilated = (size - 1) * lhs_dilation + 1
    return sum(1 for o in range(out) for k in range(window)
               if 0 <= (i := o * stride - pad_lo + k * rhs_dilation) < dilated
               and i % lhs_dilation == 0)


def _conv(eqn) -> float:
    p = eqn.params
    lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
    out = eqn.outvars[0].aval.shape
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    # batch x output features x input features per group x valid taps per spatial dimension
    flops = 2.0 * out[out_spec[0]] * rhs[rhs_spec[0]] * rhs[rhs_spec[1]]
    for i in range(len(lhs_spec) - 2):
        flops *= _valid_taps(lhs[lhs_spec[2 + i]], out[out_spec[2 + i]], rhs[rhs_spec[2 + i]],
                             p["window_strides"][i], p["padding"][i][0],
                             p["lhs_dilation"][i], p["rhs_dilation"][i])
    return flops


def _fused_attention(eqn) -> float:
    # q k^T and the weights times v, each 2*B*N*T*S*D; q is (B, T, N, D) in jax.nn's layout
    # (``layout`` 0) or (B, N, T, D) (``layout`` 1), k likewise with S.
    q, k = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
    if eqn.params.get("layout", 0) == 1:
        (b, n, t, d), s = q, k[2]
    else:
        (b, t, n, d), s = q, k[1]
    return 4.0 * b * n * t * s * d


def _sub_jaxprs(eqn):
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, jcore.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jcore.Jaxpr):
                yield item


def jaxpr_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_general(eqn)
        elif name == "conv_general_dilated":
            total += _conv(eqn)
        elif "dot_product_attention" in name and "bwd" not in name:
            total += _fused_attention(eqn)
        elif name in _ELEMENTWISE:
            total += _ELEMENTWISE[name] * _size(eqn.outvars[0].aval)
        elif name == "integer_pow":  # x**y as y - 1 multiplications
            total += max(1, abs(eqn.params["y"]) - 1) * _size(eqn.outvars[0].aval)
        elif name in _REDUCTIONS:
            total += _size(eqn.invars[0].aval) - _size(eqn.outvars[0].aval)
        elif name == "cond":
            total += max(jaxpr_flops(b.jaxpr) for b in eqn.params["branches"])
        else:
            times = eqn.params.get("length", 1) if name == "scan" else 1
            total += times * sum(jaxpr_flops(sub) for sub in _sub_jaxprs(eqn))
    return total


def count_flops(fn: Callable, *args) -> float:
    """FLOPs of one call of ``fn(*args)``; ``args`` may be ``jax.ShapeDtypeStruct``s (nothing
    is computed or compiled)."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)

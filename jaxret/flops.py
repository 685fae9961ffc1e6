"""FLOPs of a JAX function, counted from its jaxpr: the same number on a CPU, a GPU or a TPU.

XLA's cost analysis (`jax.jit(f).lower(...).compile().cost_analysis()`) counts what the backend's compiled
program does, and on a GPU it does not see the convolutions at all (they run as cuDNN custom calls), so an
MFU computed from it depends on the backend. This module walks the jaxpr that every backend compiles from
and counts each primitive analytically:

- `dot_general`: 2 FLOPs per multiply-add, 2 * (output elements) * (size of the contracted dimensions).
- `conv_general_dilated`: 2 FLOPs per multiply-add, summed over the (output position, kernel tap) pairs
  whose tap reads an element of the input: taps on padding, or on the holes that an input (lhs) dilation
  inserts, are not counted. Feature groups divide the input features, batch groups the batch. This is the
  rule of XLA's `HloCostAnalysis::GetConvolutionFlops`; it counts the convolutions of a gradient (the input
  gradient is a convolution with lhs dilation = stride, the kernel gradient one with rhs dilation =
  stride) at the multiply-adds they need, which for a stride-1 or stride-2 layer are those of its forward
  convolution, not the 4x that a dense count of the dilated input would give.
- Elementwise arithmetic, comparisons and selects on floating-point values: 1 FLOP per output element
  (`integer_pow`: its multiplies); reductions (`reduce_sum`, `reduce_max`, `argmax`, ...): 1 FLOP per
  element folded in (input elements - output elements). Integer and boolean operations (indices, masks,
  the PRNG) and dtype conversions are not floating-point operations and count 0.
- Transcendentals (exp, log, tanh, rsqrt, sqrt, ...): counted apart, one per output element, and not in
  `flops`, as XLA does.
- Data movement (reshape, transpose, broadcast, slice, gather, pad, ...) and collectives count 0. Any other
  primitive counts 0 and is listed in `FlopCount.uncounted`, so that nothing is left out silently.
- Nested jaxprs (jit, custom_jvp, custom_vjp, checkpoint) are counted once per call; `scan` bodies times
  their length; `while` bodies times their trip count (read from a counted loop `i < n; i += 1` with
  static bounds, else `while_trip_count`); `cond`: its most expensive branch; `shard_map` bodies (per-shard
  shapes) times the number of shards.

The shapes of a jaxpr are global (not per device), so the count of a sharded step is that of the whole
global batch; XLA's cost analysis of a partitioned program is that of one device.

`matmul_flops` (dot_general + conv_general_dilated) is what a model FLOPs utilisation (MFU) divides by the
matrix units' peak, as in Chowdhery et al. (2022), appendix B; `flops` adds the elementwise work.

>>> import jax.numpy as jnp
>>> count_flops(jnp.matmul, jnp.ones((4, 3)), jnp.ones((3, 5))).matmul_flops  # 4 x 5 outputs, 3 MACs each
120

References:
  A. Chowdhery et al. PaLM: Scaling Language Modeling with Pathways. 2022, appendix B (model FLOPs
    utilisation).
  XLA, `xla/service/hlo_cost_analysis.cc` (`GetDotFlops`, `GetConvolutionFlops`, `HandleReduce`).
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import math

import jax
from jax.extend import core as jax_core
import numpy as np

MATMUL_PRIMITIVES = frozenset({"dot_general", "conv_general_dilated"})
# One FLOP per output element (when an operand or the result is floating-point).
ELEMENTWISE_PRIMITIVES = frozenset({
    "add", "add_any", "sub", "mul", "div", "rem", "max", "min", "neg", "abs", "sign", "floor", "ceil",
    "round", "square", "nextafter", "copysign", "eq", "ne", "lt", "le", "gt", "ge", "eq_to", "lt_to",
    "le_to", "select_n", "clamp", "is_finite", "conj", "real", "imag", "reduce_precision", "cumsum",
    "cumprod", "cummax", "cummin",
})
TRANSCENDENTAL_PRIMITIVES = frozenset({
    "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic", "sin", "cos", "tan", "asin", "acos", "atan",
    "atan2", "sinh", "cosh", "asinh", "acosh", "atanh", "sqrt", "rsqrt", "cbrt", "pow", "erf", "erfc",
    "erf_inv", "lgamma", "digamma", "igamma", "igammac", "polygamma", "zeta", "bessel_i0e", "bessel_i1e",
    "random_gamma_grad", "cumlogsumexp",
})
# One FLOP per element folded in: input elements - output elements.
REDUCTION_PRIMITIVES = frozenset({"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "argmax", "argmin"})
# No arithmetic on floating-point values: data movement, dtype changes, integer/boolean work (the PRNG,
# masks), sharding annotations and collectives (communication, which MFU does not count either).
FREE_PRIMITIVES = frozenset({
    "reshape", "broadcast_in_dim", "transpose", "squeeze", "expand_dims", "slice", "dynamic_slice",
    "dynamic_update_slice", "concatenate", "stack", "pad", "gather", "rev", "iota", "copy", "copy_p", "split",
    "convert_element_type", "bitcast_convert_type", "stop_gradient", "device_put", "sharding_constraint",
    "mesh_cast", "reshard", "pvary", "optimization_barrier", "random_bits", "random_seed", "random_wrap",
    "random_unwrap", "random_fold_in", "random_split", "threefry2x32", "shift_left", "shift_right_logical",
    "shift_right_arithmetic", "and", "or", "not", "xor", "population_count", "clz", "reduce_and",
    "reduce_or", "reduce_xor", "psum", "psum_invariant", "pmin", "pmax", "all_gather", "all_to_all", "ppermute",
    "psum_scatter", "axis_index", "create_token", "tie_in",
})


@dataclasses.dataclass(frozen=True)
class FlopCount:
  """What `jaxpr_flops` counted. All numbers are for one call of the function.

  Attributes:
    by_primitive: `{primitive name: count}`: FLOPs for arithmetic primitives, operations for the
      transcendental ones.
    uncounted: names of primitives that were met but not counted (neither arithmetic nor known to be free).
  """
  by_primitive: Mapping[str, int]
  uncounted: frozenset[str] = frozenset()

  @property
  def matmul_flops(self) -> int:
    """FLOPs of `dot_general` and `conv_general_dilated`, 2 per multiply-add."""
    return sum(n for p, n in self.by_primitive.items() if p in MATMUL_PRIMITIVES)

  @property
  def conv_flops(self) -> int:
    return self.by_primitive.get("conv_general_dilated", 0)

  @property
  def elementwise_flops(self) -> int:
    """FLOPs of elementwise arithmetic, comparisons, selects and reductions on floating-point values."""
    return sum(n for p, n in self.by_primitive.items()
               if p not in MATMUL_PRIMITIVES and p not in TRANSCENDENTAL_PRIMITIVES)

  @property
  def transcendentals(self) -> int:
    return sum(n for p, n in self.by_primitive.items() if p in TRANSCENDENTAL_PRIMITIVES)

  @property
  def flops(self) -> int:
    """`matmul_flops + elementwise_flops` (transcendentals apart, as in XLA's cost analysis)."""
    return self.matmul_flops + self.elementwise_flops


def dot_general_flops(lhs_shape: Sequence[int], out_shape: Sequence[int],
                      lhs_contracting_dims: Sequence[int]) -> int:
  """2 * (output elements) * (contracted size): the FLOPs of a `lax.dot_general` (any batch dimensions)."""
  return 2 * math.prod(out_shape) * math.prod(lhs_shape[d] for d in lhs_contracting_dims)


def conv_valid_taps(input_size: int, kernel_size: int, output_size: int, *, stride: int = 1,
                    padding_low: int = 0, lhs_dilation: int = 1, rhs_dilation: int = 1) -> int:
  """Number of (output position, kernel tap) pairs of one spatial dimension whose tap reads an input element.

  Output position o and tap k read the dilated, padded input at o * stride + k * rhs_dilation; in the
  undilated input that is `u = o * stride - padding_low + k * rhs_dilation`, an element when `u` is a
  multiple of `lhs_dilation` and `0 <= u / lhs_dilation < input_size` (else padding or a dilation hole).

  Args:
    input_size, kernel_size, output_size: sizes of this dimension (the input before any dilation).
    stride, padding_low, lhs_dilation, rhs_dilation: `lax.conv_general_dilated`'s parameters for it
      (`padding_low` may be negative).

  Returns:
    The count; `output_size * kernel_size` for a convolution without padding or dilation.
  """
  taps = np.arange(kernel_size, dtype=np.int64)[:, None]
  outputs = np.arange(output_size, dtype=np.int64)[None, :]
  undilated = outputs * stride - padding_low + taps * rhs_dilation
  reads_input = ((undilated % lhs_dilation == 0) & (undilated >= 0) &
                 (undilated < input_size * lhs_dilation))
  return int(np.count_nonzero(reads_input))


def conv_flops(lhs_shape: Sequence[int], rhs_shape: Sequence[int], out_shape: Sequence[int], *,
               dimension_numbers, window_strides: Sequence[int], padding: Sequence[tuple[int, int]],
               lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None) -> int:
  """FLOPs of a `lax.conv_general_dilated`: 2 * (output batch) * (output features) * (kernel input features)
  * prod over spatial dimensions of `conv_valid_taps`.

  Feature groups need no argument: the kernel's input-feature dimension is already input features / groups.
  Batch groups neither: the output batch is already the batch / groups.

  Args:
    lhs_shape, rhs_shape, out_shape: shapes of the input, kernel and output.
    dimension_numbers: a `lax.ConvDimensionNumbers` (`lhs_spec`, `rhs_spec`, `out_spec`: (batch or output
      feature, feature or input feature, spatial...) dimension indices), as in the jaxpr.
    window_strides, padding, lhs_dilation, rhs_dilation: per spatial dimension, as in the jaxpr.

  Returns:
    The FLOPs, 2 per multiply-add.
  """
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  num_spatial = len(lhs_spec) - 2
  lhs_dilation = lhs_dilation or (1,) * num_spatial
  rhs_dilation = rhs_dilation or (1,) * num_spatial
  macs = out_shape[out_spec[0]] * out_shape[out_spec[1]] * rhs_shape[rhs_spec[1]]
  for d in range(num_spatial):
    macs *= conv_valid_taps(lhs_shape[lhs_spec[2 + d]], rhs_shape[rhs_spec[2 + d]], out_shape[out_spec[2 + d]],
                            stride=window_strides[d], padding_low=padding[d][0], lhs_dilation=lhs_dilation[d],
                            rhs_dilation=rhs_dilation[d])
  return 2 * macs


def _is_floating(atom) -> bool:
  dtype = getattr(getattr(atom, "aval", None), "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, np.inexact)


def _size(atom) -> int:
  return math.prod(atom.aval.shape)


def _integer_pow_flops(exponent: int) -> int:
  """Multiplies (and the division of a negative power) of `x ** exponent` by repeated squaring, as lowered."""
  y = abs(exponent)
  if y == 0:
    return 0
  return (y.bit_length() - 1) + (bin(y).count("1") - 1) + (1 if exponent < 0 else 0)


class _Counter:
  """Sums `{primitive: count}` over a jaxpr and its nested jaxprs."""

  def __init__(self, while_trip_count: int | None):
    self.while_trip_count = while_trip_count
    self.uncounted: set[str] = set()

  def count(self, jaxpr) -> dict[str, int]:
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)  # ClosedJaxpr -> Jaxpr
    totals: dict[str, int] = {}
    for eqn in jaxpr.eqns:
      _add_into(totals, self.count_eqn(eqn))
    return totals

  def count_eqn(self, eqn) -> dict[str, int]:
    name = eqn.primitive.name
    params = eqn.params
    if name == "dot_general":
      (lhs_contracting, _), _ = params["dimension_numbers"]
      return {name: dot_general_flops(eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape, lhs_contracting)}
    if name == "conv_general_dilated":
      return {name: conv_flops(eqn.invars[0].aval.shape, eqn.invars[1].aval.shape, eqn.outvars[0].aval.shape,
                               dimension_numbers=params["dimension_numbers"],
                               window_strides=params["window_strides"], padding=params["padding"],
                               lhs_dilation=params["lhs_dilation"], rhs_dilation=params["rhs_dilation"])}
    floating = any(_is_floating(v) for v in (*eqn.invars, *eqn.outvars))
    if name in ELEMENTWISE_PRIMITIVES or name in TRANSCENDENTAL_PRIMITIVES:
      return {name: _size(eqn.outvars[0])} if floating else {}
    if name == "integer_pow":
      return {name: _size(eqn.outvars[0]) * _integer_pow_flops(params["y"])} if floating else {}
    if name in REDUCTION_PRIMITIVES:
      return {name: _size(eqn.invars[0]) - _size(eqn.outvars[0])} if floating else {}
    if name in ("scatter-add", "scatter_add"):
      return {name: _size(eqn.invars[2])} if floating else {}  # one add per update element
    if name == "scan":
      return _scaled(self.count(params["jaxpr"]), params["length"])
    if name == "while":
      trips = _static_trip_count(eqn)
      if trips is None:
        trips = self.while_trip_count
      if trips is None:
        raise ValueError("The function has a while loop whose trip count is not static (not a counted loop "
                         "`i < n; i += 1` with constant bounds); pass while_trip_count=N, the number of "
                         "iterations to assume.")
      return _add_into(_scaled(self.count(params["body_jaxpr"]), trips),
                       _scaled(self.count(params["cond_jaxpr"]), trips + 1))
    if name == "cond":
      branches = [self.count(branch) for branch in params["branches"]]
      return max(branches, key=lambda b: sum(n for p, n in b.items() if p not in TRANSCENDENTAL_PRIMITIVES))
    if name == "shard_map":
      mesh_shape = dict(params["mesh"].shape)
      shards = math.prod(mesh_shape[axis] for axis in params.get("newly_manual_axes", mesh_shape))
      return _scaled(self.count(params["jaxpr"]), shards)
    nested = list(jax_core.jaxprs_in_params(params))
    if nested:  # jit, custom_jvp_call, custom_vjp_call, remat, closed_call, ...: run once per call.
      totals: dict[str, int] = {}
      for inner in nested:
        _add_into(totals, self.count(inner))
      return totals
    if name not in FREE_PRIMITIVES:
      self.uncounted.add(name)
    return {}


def _add_into(totals: dict[str, int], more: Mapping[str, int]) -> dict[str, int]:
  for name, n in more.items():
    totals[name] = totals.get(name, 0) + n
  return totals


def _scaled(counts: Mapping[str, int], factor: int) -> dict[str, int]:
  return {name: n * factor for name, n in counts.items()}


def _static_trip_count(eqn) -> int | None:
  """Iterations of a `while` that counts a carry `i` from a constant up to a constant `n` (`i < n; i += 1`),
  as `lax.fori_loop` writes it; None for any other loop."""
  cond, body = eqn.params["cond_jaxpr"].jaxpr, eqn.params["body_jaxpr"].jaxpr
  cond_nconsts, body_nconsts = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
  init = eqn.invars[cond_nconsts + body_nconsts:]
  if len(cond.eqns) != 1 or cond.eqns[0].primitive.name != "lt":
    return None
  cond_carry = list(cond.invars[cond_nconsts:])
  body_carry = list(body.invars[body_nconsts:])

  def constant_of(atom, carry_vars):
    if isinstance(atom, jax_core.Literal):
      return atom.val
    if atom in carry_vars:
      index = carry_vars.index(atom)
      # A loop-invariant carry (the body returns it unchanged) with a constant initial value.
      if body.outvars[index] is body_carry[index] and isinstance(init[index], jax_core.Literal):
        return init[index].val
    return None

  counter, limit = cond.eqns[0].invars
  if counter not in cond_carry:
    return None
  index = cond_carry.index(counter)
  start, stop = constant_of(init[index], []), constant_of(limit, cond_carry)
  step = next((e for e in body.eqns if e.outvars[0] is body.outvars[index]), None)
  if start is None or stop is None or step is None or step.primitive.name != "add":
    return None
  operands = list(step.invars)
  if body_carry[index] not in operands:
    return None
  operands.remove(body_carry[index])
  if not (isinstance(operands[0], jax_core.Literal) and operands[0].val == 1):
    return None
  return max(0, int(stop) - int(start))


def jaxpr_flops(jaxpr, *, while_trip_count: int | None = None) -> FlopCount:
  """Counts the FLOPs of a jaxpr (`jax.make_jaxpr(f)(...)`, or `jax.jit(f).trace(...).jaxpr`).

  Args:
    jaxpr: a `ClosedJaxpr` or `Jaxpr`.
    while_trip_count: iterations to assume for `while` loops whose trip count is not static.

  Returns:
    A `FlopCount` (see the module docstring for what each primitive counts).

  Raises:
    ValueError: for a `while` loop without a static trip count when `while_trip_count` is None.
  """
  counter = _Counter(while_trip_count)
  by_primitive = counter.count(jaxpr)
  return FlopCount(by_primitive={p: n for p, n in sorted(by_primitive.items()) if n},
                   uncounted=frozenset(counter.uncounted))


def count_flops(fn: Callable, *args, while_trip_count: int | None = None, **kwargs) -> FlopCount:
  """FLOPs of one call `fn(*args, **kwargs)`, from its jaxpr (nothing is compiled or run).

  Args:
    fn: any JAX-traceable function, jitted or not (static arguments bound with `functools.partial`).
    *args, **kwargs: its arguments: arrays or `jax.ShapeDtypeStruct`s.
    while_trip_count: see `jaxpr_flops`.

  Returns:
    A `FlopCount`.
  """
  return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs), while_trip_count=while_trip_count)


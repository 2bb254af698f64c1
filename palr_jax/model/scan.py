"""The decoder layers without a cache (training, scoring) as one `lax.scan`, and what the scan needs.

`apply_layers` stacks the layers' states on the fly and scans one step, a pure function of (x, layer
state), rematerialized per a `REMAT_POLICIES` entry.

Why a scan: the backward pass of a scan runs layer by layer, so with remat only the layer inputs and one
layer's intermediates are alive; XLA:CPU schedules the rematerializations of an unrolled loop all before
the backward pass (nothing orders them), which keeps every layer's attention scores alive at once. It
also compiles one layer instead of all. The stacking copies the weights once per call (inside jit): cheap
beside a forward of many tokens; decoding with a cache keeps the unrolled loop (bench/RESULTS.md, "Train
step: reading and remat policies").

The frozen 16-bit weights enter the scan, and a rematerialized layer's residuals leave it, as their bit
patterns (`_Bits`): XLA:CPU keeps an fp32 copy of every bf16 array a loop slices (the stacked weights;
with `remat='dots'`, the saved projections), converted at every step (same section of RESULTS.md).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

# What the backward pass keeps of each layer's forward (the rest is recomputed). Projection outputs are
# named (`PROJECTION`) after the cast to the compute dtype, so 'dots' keeps them in bf16 under bf16
# compute, with the blocked attention's output and log-sum-exp, and never the attention scores [heads, T, T].
PROJECTION = 'projection'
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.save_only_these_names(PROJECTION),
}
# What the adapters leave untouched: every Param but the LoRA ones. Only `nnx.LoRAParam`s are trained, so
# the scan carries these as bit patterns, which have no gradient.
FROZEN = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
# 16-bit floats cross the layer scan as same-width integers, their bit patterns: XLA:CPU converts a bf16
# array that a loop slices to fp32 as a whole, before the loop (a copy at twice the bytes, and a pass over
# it at every call), which it does not do for integers.
_BITS = {np.dtype(jnp.bfloat16): np.dtype(np.uint16), np.dtype(jnp.float16): np.dtype(np.int16)}


def _is_16bit_float(leaf) -> bool:
  return isinstance(leaf.dtype, np.dtype) and leaf.dtype in _BITS


def _to_bits(leaf: jax.Array) -> jax.Array:
  return jax.lax.bitcast_convert_type(leaf, _BITS[leaf.dtype])


@jax.custom_jvp
def _frozen_to_bits(leaf: jax.Array) -> jax.Array:
  """`_to_bits` for a frozen base weight; raises if differentiated, since the bits carry no gradient."""
  return _to_bits(leaf)


@_frozen_to_bits.defjvp
def _frozen_to_bits_jvp(primals, tangents):
  raise TypeError('llama: a frozen base weight (an nnx.Param that is not an nnx.LoRAParam) is differentiated '
                  'through the layer scan, which only trains LoRA adapters; set model.scan_layers=False to '
                  'differentiate the base weights.')


@jax.tree_util.register_pytree_node_class
class _Bits:
  """A pytree whose 16-bit float leaves are held as bit patterns; their dtypes are static (aux data)."""

  def __init__(self, leaves, aux):
    self.leaves, self.aux = leaves, aux

  @classmethod
  def of(cls, tree, to_bits=_to_bits) -> _Bits:
    leaves, treedef = jax.tree.flatten(tree)
    dtypes = tuple(leaf.dtype if _is_16bit_float(leaf) else None for leaf in leaves)
    return cls([leaf if dtype is None else to_bits(leaf) for leaf, dtype in zip(leaves, dtypes)],
               (treedef, dtypes))

  def value(self):
    treedef, dtypes = self.aux
    return jax.tree.unflatten(treedef, [leaf if dtype is None else jax.lax.bitcast_convert_type(leaf, dtype)
                                        for leaf, dtype in zip(self.leaves, dtypes)])

  def tree_flatten(self):
    return self.leaves, self.aux

  @classmethod
  def tree_unflatten(cls, aux, leaves):
    return cls(list(leaves), aux)


def _residuals_as_bits(step):
  """`step` (one layer) with the residuals its backward pass keeps held as bit patterns where 16-bit: the
  layer scan stacks them in its forward loop and slices them in its backward loop, before which XLA:CPU
  would convert the whole bf16 stack to fp32. Same values, same gradients (tests/test_llama.py)."""

  @jax.custom_vjp
  def call(x, state):
    return step(x, state)

  def forward(x, state):
    out, pullback = jax.vjp(step, x, state)
    return out, _Bits.of(pullback)

  def backward(residuals, cotangent):
    return residuals.value()(cotangent)

  call.defvjp(forward, backward)
  return call


def apply_layers(layers: Sequence[nnx.Module], x: jax.Array, call: Callable[[nnx.Module, jax.Array], jax.Array],
                 *, remat: str, scan: bool = True) -> jax.Array:
  """x through `layers` in order, `call(layer, x)` -> x each, rematerialized per `REMAT_POLICIES[remat]`.

  A `lax.scan` when `scan` and every layer has the same graph; else an unrolled loop (which may
  differentiate the frozen weights). The layers' random streams (dropout) advance as in an eager call.
  """
  splits = [nnx.split(layer, FROZEN, ...) for layer in layers]
  scan = scan and all(g == splits[0][0] for g, _, _ in splits[1:])

  def step_of(graphdef):
    def step(x, state):  # -> (output, the layer's random-stream state after the call)
      frozen, rest = state
      layer = nnx.merge(graphdef, frozen.value() if isinstance(frozen, _Bits) else frozen, rest)
      return call(layer, x), nnx.state(layer, nnx.RngState)
    if remat != 'none':
      # jax.checkpoint over a pure function of the layer's state: unlike nnx.remat this also works when
      # part of the state (the frozen base) enters the outer jit as a separate argument.
      step = jax.checkpoint(step, policy=REMAT_POLICIES[remat], prevent_cse=not scan)
    return _residuals_as_bits(step) if scan else step

  if scan:
    step = step_of(splits[0][0])
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves),
                           *((_Bits.of(frozen, _frozen_to_bits), rest) for _, frozen, rest in splits))
    x, rngs = jax.lax.scan(step, x, stacked)
    rngs = [jax.tree.map(lambda leaf, i=i: leaf[i], rngs) for i in range(len(splits))]
  else:
    rngs = []
    for graphdef, frozen, rest in splits:
      x, rng = step_of(graphdef)(x, (frozen, rest))
      rngs.append(rng)
  for layer, rng in zip(layers, rngs):  # dropout streams advance as in an eager call
    nnx.update(layer, rng)
  return x

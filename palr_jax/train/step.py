"""The LoRA train step: loss, gradients of the adapters only, optimizer, jitted steps, batch checks.

The model arrives with LoRA adapters (palr_jax/model/lora.py). It is split into the frozen base, sharded by
its `logical_axes` and never written, and the adapters, which with their optimizer state and the step form
the train state: the only thing that is updated, donated and checkpointed.

Batches follow docs/ARCHITECTURE.md (`palr_jax.batching.BATCH_KEYS`): int32 [B, T] `input_ids`,
`positions`, `segment_ids` (0 = padding), `loss_mask`. Each process yields only its rows of the global
batch (`sharding.process_rows`) and the trainer assembles the global array. The loss is the mean
next-token cross-entropy over every loss token of the global batch: token losses are summed (over devices
and micro-batches) and divided once by the global count, so neither the mesh nor gradient accumulation
changes it.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
import dataclasses
import zlib
from typing import Any, Protocol

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import optax

from palr_jax import sharding
from palr_jax.batching import BATCH_KEYS
from palr_jax import score_head

# Batch keys a batch may add: `item_ids` [B, T] (int32, -1 = none), the item of each placeholder token
# (collaborative item tokens, palr_jax/model/item_tokens.py).
OPTIONAL_KEYS = ('item_ids',)


class DataIterator(Protocol):
  """A batch source the trainer can checkpoint: `next` gives this process's rows of the next global
  batch (numpy, BATCH_KEYS); `get_state` is JSON-able and `set_state` resumes exactly there."""

  def __next__(self) -> Mapping[str, np.ndarray]: ...
  def get_state(self) -> dict[str, Any]: ...
  def set_state(self, state: dict[str, Any]) -> None: ...


# ------------------------------------------------------------------------------------------- loss


def loss_weights(batch: Mapping[str, jax.Array]) -> jax.Array:
  """[B, T] float32: 1 where token t is a loss token predicted from t-1 of its own segment."""
  seg = batch['segment_ids']
  keep = (batch['loss_mask'][:, 1:] != 0) & (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
  return jnp.pad(keep, ((0, 0), (1, 0))).astype(jnp.float32)


def loss_sum(model, batch: Mapping[str, jax.Array], max_loss_tokens: int, rules,
             choice_ids: jax.Array | None = None, head: Mapping[str, jax.Array] | None = None) -> jax.Array:
  """Sum of the token losses of `batch`, with logits only at its loss tokens.

  Each row's loss tokens are moved to the front (in order) and the first `max_loss_tokens` of them are
  scored (0 = all T-1 positions): the LM head, the largest matmul at PALR's short responses, runs on
  [B, max_loss_tokens] positions instead of [B, T]. Callers check that no row has more.

  A token's loss is the cross-entropy over the vocabulary, or, where `loss_mask` is 2 (a Recommend_Retrieval
  answer's tag), over the candidates' tag tokens `choice_ids` alone: a K-way softmax that asks which
  candidate, not how its title is spelled.
  With the residual score head (`head`: {score_head.GATE, score_head.SCALE} fp32 scalars, and the batch's
  `candidate_z` float [B, T, K]: at a tag token, the retriever's standardized score of the candidate
  behind each tag, zeros elsewhere, so packed rows carry one z per tag), the K-way logits are
  `gate * tag_logit + scale * z` (palr_jax/score_head.py).
  """
  weights = loss_weights(batch)
  length = weights.shape[1]
  n = length - 1 if max_loss_tokens <= 0 else min(max_loss_tokens, length - 1)
  idx = jnp.argsort((weights == 0).astype(jnp.int32), axis=1, stable=True)[:, :n]
  logits = model(batch['input_ids'], batch['positions'], batch['segment_ids'],
                 logits_at=jnp.maximum(idx - 1, 0), item_ids=batch.get('item_ids'))
  logits = sharding.constrain(logits, ('batch', None, 'vocab'), rules)
  targets = jnp.take_along_axis(batch['input_ids'], idx, axis=1)
  logits = logits.astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  if choice_ids is not None:
    choices = jnp.take(logits, jnp.asarray(choice_ids), axis=-1)                  # [B, n, K]
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    if head is not None:
      z = jnp.take_along_axis(jnp.asarray(batch['candidate_z'], jnp.float32), idx[..., None], axis=1)
      choices = head[score_head.GATE] * choices + head[score_head.SCALE] * z
      chosen = (targets[..., None] == jnp.asarray(choice_ids)).astype(jnp.float32)
      picked = jnp.sum(chosen * choices, axis=-1)
    choice = jax.nn.logsumexp(choices, axis=-1) - picked
    kind = jnp.take_along_axis(batch['loss_mask'], idx, axis=1)
    losses = jnp.where(kind == 2, choice, losses)
  return jnp.sum(losses * jnp.take_along_axis(weights, idx, axis=1))


def split_microbatches(batch: Mapping[str, jax.Array], n: int) -> dict[str, jax.Array]:
  """[B, ...] -> [n, B/n, ...], micro-batch j = rows j, j+n, j+2n, ...

  Strided, not contiguous: every micro-batch draws rows from every device's shard of the batch, so each
  one stays spread over the whole data-parallel mesh.
  """
  return {k: v.reshape(v.shape[0] // n, n, *v.shape[1:]).swapaxes(0, 1) for k, v in batch.items()}


# ----------------------------------------------------------------------------------- adapters


@dataclasses.dataclass(frozen=True)
class LoraModel:
  """A LoRA model taken apart for training: its graph and the layouts (paths, variable types, metadata,
  abstract values) of its adapters and RNG streams. Values are supplied per call, so jitted functions
  take the adapters as a flat {path: array} dict and the frozen base as an nnx.State."""
  graphdef: nnx.GraphDef
  lora: nnx.State
  rngs: nnx.State

  def merge(self, values: Mapping[str, jax.Array], frozen: nnx.State, key: jax.Array) -> nnx.Module:
    """The model with adapter `values` and RNG streams (LoRA dropout) restarted from `key`.

    Each stream is keyed by `key` and its path, so dropout masks are a pure function of the seed and
    the step: a checkpoint needs no RNG state and a resumed run draws the same masks.
    """
    def fresh(path, var):
      if isinstance(var, nnx.RngKey):
        return var.replace(jax.random.fold_in(key, zlib.crc32('.'.join(map(str, path)).encode())))
      return var.replace(jnp.zeros(var.get_value().shape, var.get_value().dtype))

    rngs = nnx.from_flat_state([(path, fresh(path, var)) for path, var in nnx.to_flat_state(self.rngs)])
    return nnx.merge(self.graphdef, with_lora_values(self.lora, values), rngs, frozen)


def split_model(model: nnx.Module) -> tuple[LoraModel, dict[str, jax.Array], nnx.State]:
  """(layouts, adapter values, frozen base): only `nnx.LoRAParam`s are trained."""
  graphdef, lora, rngs, frozen = nnx.split(model, nnx.LoRAParam, nnx.RngState, ...)
  if not jax.tree.leaves(lora):
    raise ValueError('train: the model has no nnx.LoRAParam; apply palr_jax.model.lora.apply_lora first')
  abstract = lambda state: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)  # noqa: E731
  return LoraModel(graphdef, abstract(lora), abstract(rngs)), lora_values(lora), frozen


def lora_values(lora: nnx.State) -> dict[str, Any]:
  """{dotted path: leaf}: the flat form in which adapters are optimized and checkpointed."""
  return {'.'.join(map(str, path)): var.get_value() for path, var in nnx.to_flat_state(lora)}


def with_lora_values(lora: nnx.State, values: Mapping[str, Any]) -> nnx.State:
  """The adapter State `lora` (paths, variable types, metadata) holding `values` instead."""
  return nnx.from_flat_state([(path, var.replace(values['.'.join(map(str, path))]))
                              for path, var in nnx.to_flat_state(lora)])


def head_of(values: Mapping[str, jax.Array]) -> dict[str, jax.Array] | None:
  """The residual score head's scalars among the trained values, or None when it is not trained."""
  if score_head.GATE not in values:
    return None
  return {k: values[k].astype(jnp.float32) for k in score_head.HEAD_KEYS}


def with_head(values: Mapping[str, jax.Array], scale: float, gate: float = 0.0) -> dict[str, jax.Array]:
  """The trained values plus the residual head's scalars (fp32): gate 0 ranks as the retriever."""
  return {**values, score_head.GATE: jnp.asarray(gate, jnp.float32),
          score_head.SCALE: jnp.asarray(scale, jnp.float32)}


def loss_and_grad(parts: LoraModel, values: Mapping[str, jax.Array], frozen: nnx.State,
                  batch: Mapping[str, jax.Array], dropout_key: jax.Array, *, microbatches: int,
                  max_loss_tokens: int, rules, choice_ids=None
                  ) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
  """(global-token-mean loss, its gradient wrt the adapter `values` in fp32, loss-token count).

  With micro-batches, summed token losses / the count of the whole batch are accumulated, so the
  result equals one pass over the whole batch.
  """
  count = jnp.sum(loss_weights(batch))

  def micro_loss(values, micro, index):
    model = parts.merge(values, frozen, jax.random.fold_in(dropout_key, index))
    return loss_sum(model, micro, max_loss_tokens, rules, choice_ids, head_of(values)) / jnp.maximum(count, 1.0)

  grad_fn = jax.value_and_grad(micro_loss)
  if microbatches == 1:
    loss, grads = grad_fn(values, batch, 0)
    return loss, jax.tree.map(lambda g: g.astype(jnp.float32), grads), count

  def accumulate(carry, micro_and_index):
    micro, index = micro_and_index
    micro = {k: sharding.constrain(v, ('batch', 'length', None) if k == 'candidate_z' else ('batch', 'length'),
                                   rules) for k, v in micro.items()}
    loss, grads = grad_fn(values, micro, index)
    return (carry[0] + loss, jax.tree.map(lambda a, g: a + g.astype(jnp.float32), carry[1], grads)), None

  zeros = (jnp.zeros((), jnp.float32), jax.tree.map(lambda v: jnp.zeros(v.shape, jnp.float32), values))
  micros = (split_microbatches(batch, microbatches), jnp.arange(microbatches))
  (loss, grads), _ = jax.lax.scan(accumulate, zeros, micros)
  return loss, grads, count


# ---------------------------------------------------------------------------------- optimizer

LR_DECAYS = ('cosine', 'linear', 'constant')


def learning_rate_schedule(train_config) -> optax.Schedule:
  """Linear warmup from 0 to the peak, then cosine / linear decay to peak * final_lr_fraction, or flat."""
  c = train_config
  peak, warmup = c.learning_rate, c.warmup_steps
  decay_steps = max(c.num_steps - warmup, 1)
  if c.lr_decay == 'cosine':
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=c.final_lr_fraction)
  elif c.lr_decay == 'linear':
    decay = optax.linear_schedule(peak, peak * c.final_lr_fraction, decay_steps)
  elif c.lr_decay == 'constant':
    decay = optax.constant_schedule(peak)
  else:
    raise ValueError(f"config.train.lr_decay: expected 'cosine', 'linear' or 'constant', got {c.lr_decay!r}")
  if warmup <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def make_optimizer(train_config) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW with weight decay on matrices only."""
  c = train_config
  clip = optax.clip_by_global_norm(c.grad_clip_norm) if c.grad_clip_norm > 0 else optax.identity()
  adamw = optax.adamw(learning_rate_schedule(c), b1=c.adam_b1, b2=c.adam_b2, eps=c.adam_eps,
                      weight_decay=c.weight_decay, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p))
  return optax.chain(clip, adamw)


# -------------------------------------------------------------------------------- train state


def init_state(values: Mapping[str, jax.Array], optimizer: optax.GradientTransformation) -> dict[str, Any]:
  """The train state: step, adapter values, optimizer state (of the adapters only)."""
  return {'step': jnp.zeros((), jnp.int32), 'lora': dict(values), 'opt_state': optimizer.init(dict(values))}


def state_shardings(abstract_state, parts: LoraModel, optimizer: optax.GradientTransformation, mesh, rules):
  """Shardings of the train state: adapters by their logical axes, Adam moments like their parameter."""
  replicated = NamedSharding(mesh, P())
  lora_shardings = lora_values(sharding.state_shardings(parts.lora, mesh, rules))
  lora_shardings.update({k: replicated for k in abstract_state['lora'] if k in score_head.HEAD_KEYS})
  opt_shardings = optax.tree_utils.tree_map_params(
      optimizer, lambda _, s: s, abstract_state['opt_state'], lora_shardings,
      transform_non_params=lambda _: replicated)
  return {'step': replicated, 'lora': lora_shardings, 'opt_state': opt_shardings}


def with_shardings(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


@dataclasses.dataclass(frozen=True)
class Setup:
  """A LoRA model laid out for training on a mesh: what the trainer, the benches and the memory check share."""
  parts: LoraModel
  values: dict[str, jax.Array]       # the adapters' initial values
  frozen: nnx.State                  # the base, placed by its logical axes
  optimizer: optax.GradientTransformation
  abstract: dict[str, Any]           # the train state's shapes
  shardings: dict[str, Any]          # the train state's shardings
  frozen_shardings: Any

  def initial_state(self) -> dict[str, Any]:
    """The train state created in place on the mesh."""
    return jax.jit(lambda v: init_state(v, self.optimizer), out_shardings=self.shardings)(self.values)

  def train_step(self, train_config, rules, seed: int, choice_ids=None, item_curriculum_steps: int = 0):
    return make_train_step(self.parts, self.optimizer, train_config, rules, self.shardings,
                           self.frozen_shardings, seed, choice_ids, item_curriculum_steps)


def setup(model: nnx.Module, train_config, mesh, rules, head_scale: float | None = None) -> Setup:
  """Abstract state -> shardings; the base is placed, the state is not created yet (a resume restores it).
  `head_scale`: train the residual score head too, from gate 0 and this scale."""
  parts, values, frozen = split_model(model)
  if head_scale is not None:
    values = with_head(values, head_scale)
  optimizer = make_optimizer(train_config)
  abstract = jax.eval_shape(lambda v: init_state(v, optimizer), values)
  shardings = state_shardings(abstract, parts, optimizer, mesh, rules)
  frozen_shardings = sharding.state_shardings(frozen, mesh, rules)
  return Setup(parts, values, jax.device_put(frozen, frozen_shardings), optimizer, abstract, shardings,
               frozen_shardings)


# ------------------------------------------------------------------------------- jitted steps


def make_train_step(parts: LoraModel, optimizer, train_config, rules, shardings, frozen_shardings, seed: int,
                    choice_ids=None, item_curriculum_steps: int = 0):
  """jit(step)(state, frozen, batch) -> (state, metrics); the state is donated. `choice_ids`: the tag
  tokens of the tag loss (`loss_sum`). A batch with `item_ids` (collaborative item tokens) is read
  text-only for the first `item_curriculum_steps` steps: its placeholders keep their own token embedding
  (LLaRA's curriculum), then the projected items replace them."""
  schedule = learning_rate_schedule(train_config)

  def step(state, frozen, batch):
    if 'item_ids' in batch and item_curriculum_steps > 0:
      batch = dict(batch, item_ids=jnp.where(state['step'] < item_curriculum_steps, -1, batch['item_ids']))
    dropout_key = jax.random.fold_in(jax.random.key(seed), state['step'])
    loss, grads, _ = loss_and_grad(parts, state['lora'], frozen, batch, dropout_key,
                                   microbatches=train_config.microbatches,
                                   max_loss_tokens=train_config.max_loss_tokens, rules=rules,
                                   choice_ids=choice_ids)
    updates, opt_state = optimizer.update(grads, state['opt_state'], state['lora'])
    new_state = {'step': state['step'] + 1, 'lora': optax.apply_updates(state['lora'], updates),
                 'opt_state': opt_state}
    metrics = {'loss': loss, 'grad_norm': optax.global_norm(grads), 'learning_rate': schedule(state['step']),
               'tokens': jnp.sum(batch['segment_ids'] != 0)}
    return new_state, metrics

  return jax.jit(step, in_shardings=(shardings, frozen_shardings, None), out_shardings=(shardings, None),
                 donate_argnums=0)


def make_eval_step(parts: LoraModel, train_config, rules, choice_ids=None):
  """jit(eval)(adapter values, frozen, batch) -> (sum of token losses, loss-token count)."""

  def eval_loss(values, frozen, batch):
    model = parts.merge(values, frozen, jax.random.key(0))
    model.eval()  # No dropout.
    return (loss_sum(model, batch, train_config.max_loss_tokens, rules, choice_ids, head_of(values)),
            jnp.sum(loss_weights(batch)))

  return jax.jit(eval_loss)


# -------------------------------------------------------------------------------------- batches


def device_batch(local: Mapping[str, Any], mesh, rules, train_config) -> dict[str, jax.Array]:
  """This process's rows -> the global batch as jax.Arrays sharded over the batch axes.

  Checks here, on the host, what the jitted step cannot: keys, shapes, and that no row has more loss
  tokens than `max_loss_tokens` (their logits would not be computed).
  """
  missing = [k for k in BATCH_KEYS if k not in local]
  if missing:
    raise ValueError(f'train batch: missing key(s) {missing}; expected {list(BATCH_KEYS)}')
  arrays = {k: np.asarray(local[k]) for k in BATCH_KEYS + tuple(k for k in OPTIONAL_KEYS if k in local)}
  rows = len(sharding.process_rows(mesh, rules, train_config.batch_size))
  for k, a in arrays.items():
    if a.shape != arrays['input_ids'].shape or a.ndim != 2 or a.shape[0] != rows:
      raise ValueError(f'train batch: {k} has shape {a.shape}; expected [{rows}, T] like input_ids '
                       f'(this process\'s rows of config.train.batch_size={train_config.batch_size})')
    if not np.issubdtype(a.dtype, np.integer):
      raise ValueError(f'train batch: {k} has dtype {a.dtype}; expected int32')
  most = int(np.count_nonzero(arrays['loss_mask'], axis=1).max(initial=0))
  if 0 < train_config.max_loss_tokens < most:
    raise ValueError(f'train batch: a row has {most} loss tokens, more than '
                     f'config.train.max_loss_tokens={train_config.max_loss_tokens}')
  out = {k: sharding.global_batch_array(a.astype(np.int32), mesh, rules, train_config.batch_size)
         for k, a in arrays.items()}
  if 'candidate_z' in local:  # the residual head's retriever z at tag tokens: float [rows, T, K]
    z = np.asarray(local['candidate_z'], np.float32)
    if z.ndim != 3 or z.shape[:2] != arrays['input_ids'].shape:
      raise ValueError(f'train batch: candidate_z has shape {z.shape}; expected [{rows}, T, K] like input_ids')
    out['candidate_z'] = sharding.global_batch_array(z, mesh, rules, train_config.batch_size)
  return out


def check_batch_layout(train_config, mesh, rules) -> None:
  """The global batch must split into micro-batches that each divide over the batch mesh axes."""
  c = train_config
  shards = sharding.batch_shards(mesh, rules)
  if c.microbatches < 1 or c.batch_size % (c.microbatches * shards):
    raise ValueError(f'config.train: batch_size={c.batch_size} must be a multiple of microbatches='
                     f'{c.microbatches} x {shards} batch shards of the mesh {dict(mesh.shape)}')


def evaluate(eval_step, values, frozen, valid_batches: Iterable, mesh, rules, train_config) -> float:
  """Global-token-mean loss over every batch of `valid_batches`."""
  sums = [eval_step(values, frozen, device_batch(local, mesh, rules, train_config)) for local in valid_batches]
  total, count = np.sum(np.asarray(jax.device_get(sums), np.float64), axis=0) if sums else (0.0, 0.0)
  if count == 0:
    raise ValueError('train: the validation batches hold no loss tokens')
  return float(total / count)

"""Tokenized PALR examples -> TFRecords -> tf.data batches in the trainer's format.

Examples are built and tokenized once per config fingerprint (`examples_fingerprint`) and written to
`W/examples/<fingerprint>/{train,valid}.tfrecord` (int32 token ids and loss masks as raw little-endian
bytes; each file written to a unique temporary name, then renamed; `meta.json` last), by one process.
Then, per epoch:

  read -> seeded shuffle (train) -> pack into rows of `max_length` (first-fit decreasing over windows of
  `pack_window` examples, rows then in seeded order; segment_ids 1, 2, ... and positions restarting per
  example; at most `config.train.max_loss_tokens` answer tokens per row) or pad the global batch to the
  smallest length bucket that holds it -> batch to the *global* batch (`config.train.batch_size` rows:
  packed rows, or examples when padding) -> keep this process's rows -> prefetch.

Every process runs the same pipeline over the whole split and keeps only its rows
(`sharding.process_rows`), so the row layout and the padding bucket are decided for the global batch and
all processes build the same shapes; the trainer assembles the global `jax.Array`
(`sharding.global_batch_array`, i.e. `jax.make_array_from_process_local_data`).

Resume: the order of epoch e is a pure function of (config.seed, e), so the iterator state is just
`{'epoch': e, 'batch': k}` (JSON, saved with the checkpoint) and `set_state` rebuilds epoch e and skips
its first k batches: a resumed run sees exactly the batches it would have seen.

TensorFlow only ever runs on the CPU: accelerators are hidden from it when this module is imported,
before any TF op.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from absl import logging
from etils import epath
import numpy as np

from palr_jax import files
from palr_jax import fingerprint
from palr_jax import rng
from palr_jax.batching import BATCH_KEYS
from palr_jax.data import prompts
from palr_jax.data import tf_cpu
from palr_jax import score_head

tf = tf_cpu.tensorflow()

FEATURES = ('input_ids', 'loss_mask')
# Written only by a variant with collaborative item tokens (`variants.<v>.item_tokens`; meta.json then
# names `item_token_id`): int32 [L], the item index at each placeholder token, -1 elsewhere. Inside tf.data
# it is carried as item + 1, so that padding (0) means none; batches give it back as `item_ids` (-1 = none).
ITEM_FEATURE = 'item_ids'
WRITTEN_SPLITS = ('train', 'valid')
# What a variant's tokenized examples depend on, besides its tasks, its task weights and the upstream
# outputs (candidates, profiles) the caller names.
EXAMPLE_KEYS = ('seed', 'prompts', 'retriever.num_candidates', 'model.spec')


# ------------------------------------------------------------------------------------ TFRecords


def examples_fingerprint(config, variant: str, upstream: Sequence[str] = ()) -> str:
  """Hash of what the tokenized examples of `config.variants[variant]` depend on: `EXAMPLE_KEYS`, the
  variant's tasks, its task weights != 1 and the `upstream` digests (candidates, profiles).

  Of `task_repeats`, only the factors != 1 of the variant's own tasks count: PALR v1's examples (Recommend
  only) stay the same, and shared, whatever v2's Recommend_Retrieval weight.
  """
  tasks = tuple(config.variants[variant].tasks)
  repeats = prompts.task_repeats(config, variant)
  extra = {'tasks': tasks, 'repeats': {t: repeats[t] for t in tasks if repeats[t] != 1}}
  if 'recommend_retrieval' in tasks:
    extra['retrieval_loss'] = retrieval_loss(config, variant)
  if config.variants[variant].get('use_profile', None) is not None:   # unset: the fingerprint of before
    extra['use_profile'] = prompts.variant_use_profile(config, variant)
  if writes_candidate_z(config, variant):
    extra['candidate_z'] = True
  if item_tokens(config, variant):   # only then: the examples of other variants keep their fingerprint
    extra['item_tokens'] = True
  return fingerprint.of(config, EXAMPLE_KEYS, upstream, extra=extra)


def retrieval_loss(config, variant: str) -> str:
  """How the variant learns Recommend_Retrieval answers: 'tag' (softmax over the candidates' tags) or
  'tokens' (every answer token)."""
  return config.variants[variant].retrieval_loss


def writes_candidate_z(config, variant: str) -> bool:
  """A variant ranked by the residual score head trains it: its examples carry `candidate_z`."""
  v = config.variants[variant]
  return v.rank_mode == 'residual' and 'recommend_retrieval' in tuple(v.tasks)


def item_tokens(config, variant: str) -> bool:
  """Whether the variant's prompts carry collaborative item tokens (palr_jax/model/item_tokens.py)."""
  return bool(config.variants[variant].get('item_tokens', False))


def _serialize(input_ids: np.ndarray, loss_mask: np.ndarray, item_ids: np.ndarray | None = None,
               candidate_z: np.ndarray | None = None) -> bytes:
  pairs = (('input_ids', input_ids), ('loss_mask', loss_mask)) + (
      () if item_ids is None else ((ITEM_FEATURE, item_ids),))
  feature = {k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[np.asarray(v, '<i4').tobytes()]))
             for k, v in pairs}
  if candidate_z is not None:
    feature['candidate_z'] = tf.train.Feature(float_list=tf.train.FloatList(value=np.asarray(candidate_z,
                                                                                             np.float32)))
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


class TokenStats:
  """Counts and token lengths of a stream of examples in constant memory: one histogram of lengths per
  task (lengths are bounded by `prompts.max_length`), from which mean, p95 and max are exact."""

  def __init__(self):
    self.examples, self.tokens, self.loss_tokens = 0, 0, 0
    self._hist: dict[str, np.ndarray] = {}

  def add(self, ex) -> None:
    n = len(ex.input_ids)
    task = getattr(ex, 'task', '')
    hist = self._hist.setdefault(task, np.zeros(64, np.int64))
    if n >= len(hist):
      hist = self._hist[task] = np.concatenate([hist, np.zeros(max(n + 1, 2 * len(hist)) - len(hist), np.int64)])
    hist[n] += 1
    self.examples += 1
    self.tokens += n
    self.loss_tokens += int(np.count_nonzero(ex.loss_mask))

  @staticmethod
  def _summary(hist: np.ndarray) -> dict:
    count = int(hist.sum())
    if not count:
      return {'examples': 0, 'mean': 0.0, 'p95': 0, 'max': 0}
    lengths = np.arange(len(hist))
    cum = np.cumsum(hist)
    return {'examples': count, 'mean': round(float((lengths * hist).sum() / count), 1),
            'p95': int(np.searchsorted(cum, 0.95 * count)), 'max': int(lengths[hist > 0].max())}

  def tokens_per_example(self) -> dict:
    """{'all': {examples, mean, p95, max}, <task>: ...}: tokens per example (prompt + answer)."""
    size = max((len(h) for h in self._hist.values()), default=1)
    total = sum((np.pad(h, (0, size - len(h))) for h in self._hist.values()), np.zeros(size, np.int64))
    out = {'all': self._summary(total)}
    out.update({t: self._summary(h) for t, h in sorted(self._hist.items()) if t})
    return out

  def tasks(self) -> dict[str, int]:
    return {t: int(h.sum()) for t, h in sorted(self._hist.items()) if t}


def write_tfrecord(path, examples: Iterable, stats: TokenStats | None = None) -> int:
  """Writes examples (objects with int32 `input_ids`, `loss_mask`, optionally float [K] `candidate_z`:
  the residual head's retriever z per tag; any iterable, consumed once as a stream: nothing is kept) to
  `path` atomically; returns tokens. `stats` accumulates what was written."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = files.temp_path(path)
  tokens = 0
  with tf.io.TFRecordWriter(str(tmp)) as writer:
    for ex in examples:
      if len(ex.input_ids) != len(ex.loss_mask) or not len(ex.input_ids):
        raise ValueError(f'{path}: an example has {len(ex.input_ids)} ids and {len(ex.loss_mask)} mask '
                         'entries; expected the same positive length')
      items = getattr(ex, 'item_ids', None)
      if items is not None and len(items) != len(ex.input_ids):
        raise ValueError(f'{path}: an example has {len(ex.input_ids)} ids and {len(items)} item_ids')
      writer.write(_serialize(ex.input_ids, ex.loss_mask, items, getattr(ex, 'candidate_z', None)))
      tokens += len(ex.input_ids)
      if stats is not None:
        stats.add(ex)
  tmp.replace(path)
  return tokens


def read_tfrecord(path, candidate_z: int = 0, with_item_ids: bool | None = None) -> tf.data.Dataset:
  """Examples as {'input_ids', 'loss_mask'}: int32 [L], in file order; with `candidate_z` = K > 0 also
  'candidate_z' float32 [L, K]: the example's z at its tag token (loss_mask 2), zeros elsewhere; plus
  `item_ids` (as item + 1, see ITEM_FEATURE) when `with_item_ids`, or by default when the folder's
  meta.json says the examples have them."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'{path}: not found; build the examples first (pipeline.write_examples)')
  if with_item_ids is None:
    with_item_ids = has_item_ids(path)
  features = FEATURES + ((ITEM_FEATURE,) if with_item_ids else ())
  spec = {k: tf.io.FixedLenFeature([], tf.string) for k in features}
  if candidate_z:
    spec['candidate_z'] = tf.io.FixedLenFeature([candidate_z], tf.float32)

  def parse(record):
    raw = tf.io.parse_single_example(record, spec)
    out = {k: tf.io.decode_raw(raw[k], tf.int32, little_endian=True) for k in features}
    if with_item_ids:
      out[ITEM_FEATURE] = out[ITEM_FEATURE] + 1
    if candidate_z:
      tag = tf.cast(tf.equal(out['loss_mask'], 2), tf.float32)
      out['candidate_z'] = tag[:, None] * raw['candidate_z'][None, :]
    return out

  return tf.data.TFRecordDataset(str(path)).map(parse, num_parallel_calls=tf.data.AUTOTUNE,
                                                deterministic=True)


def has_item_ids(path) -> bool:
  """Whether the examples file `path` has the `item_ids` feature (its folder's meta.json says so)."""
  meta = epath.Path(path).parent / 'meta.json'
  return meta.exists() and files.read_json(meta).get('item_token_id') is not None


def write_examples(out, max_length: int, examples_by_split: Mapping[str, Iterable],
                   choice_ids: Sequence[int] | None = None, item_token_id: int | None = None, *,
                   distinct: Mapping[str, TokenStats] | None = None, candidate_z: bool = False,
                   head_scale: float | Callable[[], float] | None = None) -> epath.Path:
  """Writes `out/{split}.tfrecord` + `meta.json` (last); returns `out`. Each split's examples may be a
  stream (a generator): they are written as they come, never held. `item_token_id`: the placeholder
  token of collaborative item tokens (examples then carry `item_ids`). `choice_ids`: the candidates' tag
  tokens, which the tag loss (loss_mask 2) chooses among; None when the tags are not usable (no
  Recommend_Retrieval task and tags that are not single tokens). `distinct[split]`: stats of the split's
  examples before task repeats, filled while the stream is consumed (meta's `distinct_examples`).
  `candidate_z`: the examples carry float [K] `candidate_z` (the residual head's), its width kept in
  meta.json (`candidate_z_width`) with the head's initial `score_head_scale` (`head_scale`, or its value
  once every split is written: a fit over the streamed train examples)."""
  out = epath.Path(out)
  meta = {'fingerprint': out.name, 'max_length': int(max_length), 'choice_ids': choice_ids, 'splits': {}}
  if item_token_id is not None:
    meta['item_token_id'] = int(item_token_id)
  for split, examples in examples_by_split.items():
    stats = TokenStats()
    tokens = write_tfrecord(out / f'{split}.tfrecord', examples, stats)
    per_example = stats.tokens_per_example()
    meta['splits'][split] = {
        'examples': stats.examples, 'tokens': tokens, 'max_length': per_example['all']['max'],
        'loss_tokens': stats.loss_tokens, 'tasks': stats.tasks(), 'tokens_per_example': per_example}
    if distinct is not None and split in distinct:
      meta['splits'][split]['distinct_examples'] = distinct[split].examples
      meta['splits'][split]['distinct_tasks'] = distinct[split].tasks()
      meta['splits'][split]['distinct_tokens_per_example'] = distinct[split].tokens_per_example()
  if candidate_z:
    meta['candidate_z_width'] = len(choice_ids or ())
    meta['score_head_scale'] = head_scale() if callable(head_scale) else head_scale
  files.atomic_write_json(out / 'meta.json', meta)
  return out


def count_records(path) -> int:
  return int(tf.data.TFRecordDataset(str(path)).reduce(np.int64(0), lambda n, _: n + 1).numpy())


def examples_dir(workdir, fingerprint: str) -> epath.Path | None:
  """`W/examples/<fingerprint>` if its examples were written completely, else None."""
  out = epath.Path(workdir) / 'examples' / fingerprint
  return out if (out / 'meta.json').exists() else None


def build_and_write(config, workdir, inter, split, tokenizer, profiles: Sequence[str] | None, variant: str,
                    upstream: Sequence[str] = ()) -> epath.Path:
  """Builds and writes the train and valid examples of `variant` unless this fingerprint's are on disk;
  returns the folder `W/examples/<fingerprint>`.

  `profiles[u]` per user (`palr_jax.data.profile_text`), None without profiles. recommend_retrieval reads
  `W/candidates/{train,valid}.jsonl`. Examples are streamed from the prompt builder to the TFRecords
  (`prompts.iter_examples`): memory does not grow with their number. Counts and tokens per example
  (mean, p95, max) go to meta.json and the log.
  """
  fingerprint = examples_fingerprint(config, variant, upstream)
  done = examples_dir(workdir, fingerprint)
  if done is not None:
    return done
  tasks = tuple(config.variants[variant].tasks)
  builder = prompts.PromptBuilder(config, inter, tokenizer, tasks, retrieval_loss(config, variant),
                                  use_profile=prompts.variant_use_profile(config, variant),
                                  item_tokens=item_tokens(config, variant))
  repeats = prompts.task_repeats(config, variant)   # weights the training mix; valid stays one of each
  distinct = {which: TokenStats() for which in WRITTEN_SPLITS}
  # The residual head's z per example (writes_candidate_z), and the train (z, label) rows its initial scale
  # is fit on (kept while streaming: K floats per retrieval example).
  z_rows, width = None, int(config.retriever.num_candidates)
  if writes_candidate_z(config, variant):
    z_rows = {which: candidate_z_rows(epath.Path(workdir) / 'candidates' / f'{which}.jsonl', which)
              for which in WRITTEN_SPLITS}
    z_rows['fit'] = ([], [])

  def stream(which):
    cands = (prompts.read_candidates(epath.Path(workdir) / 'candidates' / f'{which}.jsonl', split, which)
             if 'recommend_retrieval' in tasks else None)
    users = None
    if which == 'train' and config.prompts.get('train_order', 'users') == 'shuffled':
      # Users in a seeded order: a bounded shuffle buffer (batching.shuffle_buffer) then mixes many users.
      users = [int(u) for u in rng.numpy_rng(config.seed, 'train_example_users').permutation(len(split.train))]
    examples = prompts.iter_examples(builder, split, which, profiles, cands, users=users)
    for n, e in enumerate(examples, 1):
      distinct[which].add(e)
      if z_rows is not None:
        z = example_z(e, z_rows[which], which, width)
        if which == 'train' and e.task == 'recommend_retrieval' and e.target in e.candidates:
          z_rows['fit'][0].append(z)
          z_rows['fit'][1].append(list(e.candidates).index(e.target))
        e = _WithZ(e, z)
      if n % 10000 == 0:
        logging.info('examples %s/%s: %d written', variant, which, n)
      for _ in range(repeats[e.task] if which == 'train' else 1):
        yield e

  # The tag tokens go with every variant's examples, tag loss or not: only loss tokens marked 2 (written
  # under the tag loss) use them, so the train step is one program for every variant, and a batch shape
  # compiled for one variant is loaded from the compilation cache for the next.
  try:
    choices = builder.choice_ids().tolist()
  except ValueError:  # tags a Recommend-only variant never writes need not be single tokens
    choices = None
  out = write_examples(epath.Path(workdir) / 'examples' / fingerprint, config.prompts.max_length,
                       {which: stream(which) for which in WRITTEN_SPLITS}, choice_ids=choices,
                       item_token_id=builder.item_token_id, distinct=distinct, candidate_z=z_rows is not None,
                       head_scale=None if z_rows is None else lambda: initial_head_scale(*z_rows['fit']))
  for which in WRITTEN_SPLITS:
    tok = distinct[which].tokens_per_example()['all']
    logging.info('examples %s/%s: %d distinct (%s), %d written; tokens per example: mean %.1f, p95 %d, '
                 'max %d', variant, which, distinct[which].examples, distinct[which].tasks(),
                 files.read_json(out / 'meta.json')['splits'][which]['examples'], tok['mean'], tok['p95'],
                 tok['max'])
  return out


def candidate_z_rows(path, which: str) -> dict:
  """The retriever's scores of `candidates/{which}.jsonl`, standardized per row over the candidates it
  scored: {key: (items int64 [n], z float32 [n])}, train rows keyed by (user, position), else by user."""
  out = {}
  for row in files.read_jsonl(path):
    key = (int(row['user_index']), int(row['position'])) if which == 'train' else int(row['user_index'])
    out[key] = (np.asarray(row['items'], np.int64), score_head.standardize([float(s) for s in row['scores']]))
  return out


def example_z(e, rows: Mapping, which: str, width: int) -> np.ndarray:
  """float32 [width]: the retriever's standardized score of each shown candidate (tag order) of example
  `e`; a candidate it did not score (a target put in for training) gets the lowest z - 1; zeros past the
  candidates and for examples of other tasks."""
  z = np.zeros(width, np.float32)
  if e.task == 'recommend_retrieval':
    items, known = rows[(e.user, e.position) if which == 'train' else e.user]
    zs = dict(zip(items.tolist(), known.tolist()))
    low = min(zs.values(), default=0.0) - 1.0
    z[:len(e.candidates)] = [zs.get(int(i), low) for i in e.candidates]
  return z


class _WithZ:
  """An example with its `candidate_z` (the other fields read through)."""

  def __init__(self, example, candidate_z: np.ndarray):
    self._example, self.candidate_z = example, candidate_z

  def __getattr__(self, name):
    return getattr(self._example, name)


def initial_head_scale(z: Sequence[np.ndarray], labels: Sequence[int]) -> float:
  """The residual head's scale fitted on the train examples (the target's tag index as the label), over
  the full-width z rows the tag loss sees (zeros past a user's candidates)."""
  if not len(z):
    return score_head.fit_scale(np.zeros((0, 1)), np.zeros(0))
  return score_head.fit_scale(np.stack(z), np.asarray(labels))


# ------------------------------------------------------------------------------------- batching


def _pack_window(ids: tf.RaggedTensor, mask: tf.RaggedTensor, length: int, cap: int, seed, index,
                 items: tf.RaggedTensor | None = None):
  """One window of examples -> packed rows {BATCH_KEYS: [R, length]}, in TF ops only (no Python
  callbacks, which would deadlock tf.data's threads at interpreter exit).

  First-fit decreasing: examples longest first (ties in window order) go into the first row with room
  for their tokens and answer tokens (<= `cap`); a row's segments are in that order. With a `seed` the
  rows come in a seeded random order (FFD opens rows longest first), else in the order they were opened.
  """
  lengths = tf.cast(ids.row_lengths(), tf.int32)
  loss = tf.reduce_sum(tf.minimum(mask, 1), axis=1)  # tag answers (mask 2) count once
  tf.debugging.assert_less_equal(lengths, length, 'an example is longer than config.prompts.max_length')
  tf.debugging.assert_less_equal(loss, cap, 'an example has more answer tokens than config.train.max_loss_tokens')
  w = tf.shape(lengths)[0]
  order = tf.argsort(-lengths, stable=True)

  def place(i, room, used, assign, rows):
    e = order[i]
    fits = (tf.range(w) < rows) & (room >= lengths[e]) & (used + loss[e] <= cap)
    r = tf.where(tf.reduce_any(fits), tf.cast(tf.argmax(tf.cast(fits, tf.int32)), tf.int32), rows)
    return (i + 1, tf.tensor_scatter_nd_sub(room, [[r]], [lengths[e]]),
            tf.tensor_scatter_nd_add(used, [[r]], [loss[e]]), tf.tensor_scatter_nd_update(assign, [[e]], [r]),
            tf.maximum(rows, r + 1))

  zeros = tf.zeros([w], tf.int32)
  _, _, _, assign, rows = tf.while_loop(lambda i, *_: i < w, place,
                                        (tf.constant(0), tf.fill([w], length), zeros, zeros, tf.constant(0)))
  rank = tf.math.invert_permutation(order)
  earlier = (assign[:, None] == assign[None, :]) & (rank[None, :] < rank[:, None])   # [e, e']: e' first
  offset = tf.reduce_sum(tf.where(earlier, lengths[None, :], 0), axis=1)
  segment = tf.reduce_sum(tf.cast(earlier, tf.int32), axis=1) + 1
  if seed is not None:
    assign = tf.gather(tf.random.experimental.stateless_shuffle(
        tf.range(rows), seed=tf.stack([tf.constant(seed, tf.int64), index])), assign)
  example = tf.cast(ids.value_rowids(), tf.int32)
  t = tf.range(tf.size(ids.values)) - tf.gather(tf.cast(ids.row_starts(), tf.int32), example)
  at = tf.stack([tf.gather(assign, example), tf.gather(offset, example) + t], axis=1)
  shape = tf.stack([rows, length])
  values = {'input_ids': ids.values, 'positions': t, 'segment_ids': tf.gather(segment, example),
            'loss_mask': mask.values}
  if items is not None:
    values[ITEM_FEATURE] = items.values
  return {k: tf.ensure_shape(tf.scatter_nd(at, v, shape), [None, length]) for k, v in values.items()}


def _pack(ds: tf.data.Dataset, length: int, max_loss_tokens: int, window: int,
          seed: int | None) -> tf.data.Dataset:
  """Packs each window of `window` consecutive examples into rows (`_pack_window`), deterministically."""
  cap = max_loss_tokens if max_loss_tokens > 0 else np.iinfo(np.int32).max

  def pack(index, batch):
    return _pack_window(batch['input_ids'], batch['loss_mask'], length, cap, seed, index,
                        batch.get(ITEM_FEATURE))

  return ds.ragged_batch(window).enumerate().map(pack).unbatch()


def _with_layout(ex):
  n = tf.size(ex['input_ids'])
  out = {'input_ids': ex['input_ids'], 'positions': tf.range(n), 'segment_ids': tf.ones([n], tf.int32),
         'loss_mask': ex['loss_mask']}
  if 'candidate_z' in ex:
    out['candidate_z'] = ex['candidate_z']
  if ITEM_FEATURE in ex:
    out[ITEM_FEATURE] = ex[ITEM_FEATURE]
  return out


def _pad_time(v, extra_rows, extra_length):
  """Pads [B, T] or [B, T, K] with zeros: rows, then time steps."""
  pads = [[0, extra_rows], [0, extra_length]] + [[0, 0]] * (len(v.shape) - 2)
  return tf.pad(v, pads)


def _pad_to_bucket(batch, buckets: Sequence[int]):
  """Pads a [B, L] batch to the smallest bucket >= L (chosen for the whole global batch)."""
  table = tf.constant(sorted(buckets), tf.int32)
  length = tf.shape(batch['input_ids'])[1]
  tf.debugging.assert_less_equal(length, table[-1], 'an example is longer than the largest length bucket')
  bucket = tf.gather(table, tf.argmax(tf.cast(table >= length, tf.int32)))
  return {k: _pad_time(v, 0, bucket - length) for k, v in batch.items()}


def _fill_batch(batch, batch_size: int):
  """Pads a short last batch with rows of segment_ids 0 (no tokens, no loss)."""
  missing = batch_size - tf.shape(batch['input_ids'])[0]
  return {k: _pad_time(v, missing, 0) for k, v in batch.items()}


def epoch_seed(seed: int, epoch: int) -> int:
  return int(np.random.SeedSequence((seed, epoch)).generate_state(1)[0])


def global_batches(ds: tf.data.Dataset, batching, *, batch_size: int, max_length: int,
                   max_loss_tokens: int = 0, shuffle: tuple[int, int] | None = None,
                   drop_remainder: bool) -> tf.data.Dataset:
  """Examples -> global batches {BATCH_KEYS: int32 [batch_size, T]}.

  `shuffle` = (seed, buffer size) or None to keep file order. Without `drop_remainder`, a short last
  batch is filled with padding rows so every batch has `batch_size` rows.
  """
  if shuffle is not None:
    seed, buffer = shuffle
    ds = ds.shuffle(max(int(buffer), 1), seed=seed, reshuffle_each_iteration=False)
  if batching.pack:
    if 'candidate_z' in ds.element_spec:
      raise ValueError("config.batching.pack: the residual head's examples (rank_mode 'residual') are "
                       'padded, not packed: set config.batching.pack = False')
    ds = _pack(ds, max_length, max_loss_tokens, batching.pack_window,
               None if shuffle is None else shuffle[0])
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  else:
    buckets = tuple(int(b) for b in batching.length_buckets)
    if max(buckets) < max_length:
      raise ValueError(f'config.batching.length_buckets = {buckets}: the largest must be >= '
                       f'config.prompts.max_length = {max_length}')
    ds = ds.map(_with_layout)
    if shuffle is not None and batching.group_by_length:
      ds = _group_by_length(ds, buckets, batch_size)
    else:
      ds = ds.padded_batch(batch_size, drop_remainder=drop_remainder)
    ds = ds.map(lambda b: _pad_to_bucket(b, buckets))
  if not drop_remainder:
    ds = ds.map(lambda b: _fill_batch(b, batch_size))
  return ds


def _group_by_length(ds: tf.data.Dataset, buckets: Sequence[int], batch_size: int) -> tf.data.Dataset:
  """Training batches of examples that share a length bucket, in the (shuffled) order their buckets fill:
  far less padding than batching neighbours of every length (PALR mixes ~180-token Recommend prompts with
  ~330-token Recommend_Retrieval ones). A bucket's last incomplete batch of the epoch is dropped."""
  table = tf.constant(sorted(int(b) for b in buckets), tf.int64)

  def bucket(ex):
    return tf.argmax(tf.cast(table >= tf.cast(tf.size(ex['input_ids']), tf.int64), tf.int64))

  def batch(_, window):
    return window.padded_batch(batch_size, drop_remainder=True)

  return ds.group_by_window(bucket, batch, window_size=batch_size)


def _local(ds: tf.data.Dataset, rows: np.ndarray, prefetch: int) -> tf.data.Dataset:
  """This process's rows of each global batch, without tf.data's autotuning.

  A step takes seconds and a batch milliseconds, so autotuning has nothing to gain, and its model thread
  costs: an iterator's destructor waits for that thread's next wake-up, up to a minute, which held training
  stages for tens of seconds after their last step on a CPU (bench/RESULTS.md, ":quick end to end").
  """
  idx = tf.constant(np.asarray(rows, np.int32))
  # item_ids back from item + 1 (0 = none or padding) to the model's -1 = none.
  ds = ds.map(lambda b: {k: tf.gather(b[k], idx) - (1 if k == ITEM_FEATURE else 0)
                         for k in (*BATCH_KEYS, ITEM_FEATURE, 'candidate_z') if k in b})
  ds = ds.prefetch(prefetch) if prefetch > 0 else ds
  options = tf.data.Options()
  options.autotune.enabled = False
  return ds.with_options(options)


def z_width(path) -> int:
  """K of the `candidate_z` feature of the examples file `path` (meta.json beside it), 0 without it."""
  meta = epath.Path(path).parent / 'meta.json'
  return int(files.read_json(meta).get('candidate_z_width') or 0) if meta.exists() else 0


class TrainBatches:
  """This process's rows of the training batches: endless epochs, each in a new seeded order.

  `next()` -> {BATCH_KEYS: np.int32 [len(rows), T]}; `get_state()` / `set_state()` give and take the
  JSON-able position {'epoch', 'batch'}. The last incomplete global batch of an epoch is dropped.
  """

  def __init__(self, path, config, rows: Sequence[int]):
    self._path, self._config = epath.Path(path), config
    self._rows = np.asarray(rows, np.int32)
    self._buffer = config.batching.shuffle_buffer or count_records(path)
    self.epoch, self.batch = 0, 0
    self._it: Iterator | None = None

  def _start(self) -> None:
    c = self._config
    ds = global_batches(read_tfrecord(self._path, z_width(self._path)), c.batching, batch_size=c.train.batch_size,
                        max_length=c.prompts.max_length, max_loss_tokens=c.train.max_loss_tokens,
                        shuffle=(epoch_seed(c.seed, self.epoch), self._buffer), drop_remainder=True)
    self._it = _local(ds.skip(self.batch), self._rows, c.batching.prefetch).as_numpy_iterator()

  def __iter__(self) -> TrainBatches:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    for _ in range(2):
      if self._it is None:
        self._start()
      try:
        out = next(self._it)
      except StopIteration:
        if self.batch == 0:
          break
        self.epoch, self.batch, self._it = self.epoch + 1, 0, None
        continue
      self.batch += 1
      return out
    raise ValueError(f'{self._path}: an epoch holds no complete global batch of '
                     f'config.train.batch_size = {self._config.train.batch_size} rows')

  def get_state(self) -> dict[str, Any]:
    return {'epoch': self.epoch, 'batch': self.batch}

  def set_state(self, state: Mapping[str, Any]) -> None:
    if set(state) != {'epoch', 'batch'} or any(int(state[k]) < 0 for k in ('epoch', 'batch')):
      raise ValueError(f'TrainBatches.set_state: got {dict(state)}; expected {{"epoch": e, "batch": k}} '
                       'with e, k >= 0')
    self.epoch, self.batch, self._it = int(state['epoch']), int(state['batch']), None


class EvalBatches:
  """This process's rows of every example of a split (or of its first `limit` global batches, when
  `limit` > 0), in file order, once per `iter()` (re-iterable); the last global batch is filled with
  padding rows."""

  def __init__(self, path, config, rows: Sequence[int], limit: int = 0):
    c = config
    ds = global_batches(read_tfrecord(path, z_width(path)), c.batching, batch_size=c.train.batch_size,
                        max_length=c.prompts.max_length, max_loss_tokens=c.train.max_loss_tokens,
                        drop_remainder=False)
    if limit > 0:
      ds = ds.take(limit)
    self._ds = _local(ds, np.asarray(rows, np.int32), c.batching.prefetch)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self._ds.as_numpy_iterator()

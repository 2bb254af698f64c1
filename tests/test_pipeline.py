"""tf.data prompt pipeline: TFRecords, packing vs padding (same per-example loss), process slices, resume."""
import collections
import json
import os

from flax import nnx
import jax
import numpy as np
import pytest

from palr_jax import sharding
from palr_jax.data import interactions, pipeline, prompts
from palr_jax.data.pipeline import tf
from palr_jax.model import llama
from prompt_fixtures import tiny_config, tiny_interactions, tiny_tokenizer, write_candidates


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """Tokenized training examples of the fixture data (both tasks, three copies) in a TFRecord."""
  tmp = tmp_path_factory.mktemp('pipeline')
  inter = tiny_interactions()
  split = interactions.leave_one_out(inter)
  write_candidates(tmp / 'candidates', inter, split, count=4)
  config = tiny_config()
  tok = tiny_tokenizer()
  builder = prompts.PromptBuilder(config, inter, tok)
  examples = prompts.build_examples(builder, split, 'train', ['likes comedy'] * 4,
                                    prompts.read_candidates(tmp / 'candidates/train.jsonl', split, 'train'))
  examples = examples * 3
  path = tmp / 'train.tfrecord'
  pipeline.write_tfrecord(path, examples)
  return tok, examples, path


def _batches(config, path, *, pack, batch_size=4, max_loss_tokens=0, buckets=(64, 128, 256)):
  config.batching.pack = pack
  config.batching.length_buckets = buckets
  ds = pipeline.global_batches(pipeline.read_tfrecord(path), config.batching, batch_size=batch_size,
                               max_length=config.prompts.max_length, max_loss_tokens=max_loss_tokens,
                               drop_remainder=False)
  return list(ds.as_numpy_iterator())


def _segments(batches):
  """(ids, mask) of every segment, row by row, in order."""
  out = []
  for b in batches:
    for r in range(b['input_ids'].shape[0]):
      seg = b['segment_ids'][r]
      for s in range(1, seg.max(initial=0) + 1):
        at = seg == s
        out.append((b['input_ids'][r, at], b['loss_mask'][r, at]))
  return out


def test_tfrecord_roundtrip(setup, tmp_path):
  _, examples, path = setup
  back = list(pipeline.read_tfrecord(path).as_numpy_iterator())
  assert len(back) == len(examples)
  for ex, rec in zip(examples, back):
    np.testing.assert_array_equal(rec['input_ids'], ex.input_ids)
    np.testing.assert_array_equal(rec['loss_mask'], ex.loss_mask)
    assert rec['input_ids'].dtype == np.int32
  assert not list(path.parent.glob('*.tmp'))
  bad = examples[0].__class__(**{**examples[0].__dict__, 'loss_mask': examples[0].loss_mask[:-1]})
  with pytest.raises(ValueError, match='same positive length'):
    pipeline.write_tfrecord(tmp_path / 'bad.tfrecord', [bad])
  with pytest.raises(FileNotFoundError, match='missing.tfrecord: not found'):
    pipeline.read_tfrecord(tmp_path / 'missing.tfrecord')


def pack_rows(lengths, loss_tokens, length, cap):
  """Reference first-fit decreasing: example indices per row, rows in the order they were opened."""
  rows, room, loss = [], [], []
  for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
    r = next((r for r in range(len(rows)) if room[r] >= lengths[i] and loss[r] + loss_tokens[i] <= cap), None)
    if r is None:
      rows, room, loss, r = rows + [[]], room + [length], loss + [0], len(rows)
    rows[r].append(i)
    room[r] -= lengths[i]
    loss[r] += loss_tokens[i]
  return rows


def test_reference_first_fit_decreasing():
  assert pack_rows([5, 3, 7, 2, 4], [1] * 5, 10, 100) == [[2, 1], [0, 4], [3]]
  assert pack_rows([5, 3, 7, 2, 4], [1, 1, 2, 1, 1], 10, 2) == [[2], [0, 4], [1, 3]]


def test_packing_layout_matches_reference(setup):
  _, examples, path = setup
  config = tiny_config()
  config.batching.pack_window = 16
  batches = _batches(config, path, pack=True)
  length = config.prompts.max_length
  rows = [{k: b[k][r] for k in pipeline.BATCH_KEYS} for b in batches for r in range(4)]
  expected = []
  for w in range(0, len(examples), 16):
    window = examples[w:w + 16]
    for members in pack_rows([len(e.input_ids) for e in window], [int(e.loss_mask.sum()) for e in window],
                             length, np.iinfo(np.int32).max):
      expected.append([window[i] for i in members])
  assert len(batches) == -(-len(expected) // 4)
  for row, members in zip(rows, expected):
    assert all(v.dtype == np.int32 and v.shape == (length,) for v in row.values())
    at = 0
    for segment, ex in enumerate(members, 1):
      n = len(ex.input_ids)
      np.testing.assert_array_equal(row['input_ids'][at:at + n], ex.input_ids)
      np.testing.assert_array_equal(row['loss_mask'][at:at + n], ex.loss_mask)
      np.testing.assert_array_equal(row['positions'][at:at + n], np.arange(n))
      assert (row['segment_ids'][at:at + n] == segment).all()
      at += n
    for k in pipeline.BATCH_KEYS:
      assert (row[k][at:] == 0).all()                   # padding: segment 0, no tokens, no loss
  # The rows after the last packed one fill the last batch with padding.
  assert all(not row['segment_ids'].any() for row in rows[len(expected):])
  assert len(_segments(batches)) == len(examples)
  fill = sum(len(e.input_ids) for e in examples) / (len(expected) * length)
  assert fill > 0.85


def test_packing_respects_loss_token_cap(setup):
  _, examples, path = setup
  config = tiny_config()
  cap = max(int(e.loss_mask.sum()) for e in examples) + 2
  batches = _batches(config, path, pack=True, max_loss_tokens=cap)
  for b in batches:
    assert b['loss_mask'].sum(axis=1).max() <= cap
  assert len(_segments(batches)) == len(examples)
  window = examples[:config.batching.pack_window]
  reference = pack_rows([len(e.input_ids) for e in window], [int(e.loss_mask.sum()) for e in window],
                        config.prompts.max_length, cap)
  assert sum(int(b['segment_ids'].any(axis=1).sum()) for b in batches) == len(reference)
  assert len(batches) > len(_batches(config, path, pack=True))
  with pytest.raises(tf.errors.InvalidArgumentError, match='config.train.max_loss_tokens'):
    _batches(config, path, pack=True, max_loss_tokens=cap - 3)


def test_padding_bucket_chosen_for_global_batch(setup):
  _, examples, path = setup
  config = tiny_config()
  buckets = (64, 128, 136, 144, 152, 160, 256)
  batches = _batches(config, path, pack=False, buckets=buckets)
  assert len(batches) == -(-len(examples) // 4)
  for j, b in enumerate(batches):
    longest = max(len(e.input_ids) for e in examples[4 * j:4 * j + 4])
    assert b['input_ids'].shape[1] == min(x for x in buckets if x >= longest)
    for r, ex in enumerate(examples[4 * j:4 * j + 4]):
      n = len(ex.input_ids)
      np.testing.assert_array_equal(b['input_ids'][r, :n], ex.input_ids)
      np.testing.assert_array_equal(b['segment_ids'][r], np.arange(b['input_ids'].shape[1]) < n)
      np.testing.assert_array_equal(b['positions'][r, :n], np.arange(n))
  assert len({b['input_ids'].shape[1] for b in batches}) > 1
  # A process holding only the short (recommend) rows still gets the global batch's bucket.
  assert all(examples[j].task == 'recommend' and len(examples[j].input_ids) <= 128 for j in range(0, 8, 2))
  short = list(pipeline.EvalBatches(path, config, [0, 2]))
  assert [x['input_ids'].shape for x in short] == [(2, b['input_ids'].shape[1]) for b in batches]
  assert short[0]['input_ids'].shape[1] > 128
  with pytest.raises(ValueError, match='length_buckets'):
    _batches(config, path, pack=False, buckets=(64, 128))


@nnx.jit
def _forward(model, ids, positions, segments):
  return model(ids, positions, segments)


def _loss_per_example(model, batch):
  """{token ids of a segment: summed next-token CE over its loss tokens}."""
  logits = _forward(model, batch['input_ids'], batch['positions'], batch['segment_ids'])
  logp = np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)
  ids, seg, mask = batch['input_ids'], batch['segment_ids'], batch['loss_mask']
  out = {}
  for r in range(ids.shape[0]):
    for s in range(1, seg[r].max(initial=0) + 1):
      t = np.nonzero((seg[r] == s) & (mask[r] == 1))[0]
      assert t.size and (seg[r, t - 1] == s).all()
      key = tuple(ids[r, seg[r] == s])
      out.setdefault(key, -logp[r, t - 1, ids[r, t]].sum())
  return out


def test_packed_and_unpacked_batches_give_the_same_per_example_loss(setup):
  tok, examples, path = setup
  config = tiny_config()
  model = llama.Llama(llama.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_layers=2,
                                        num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=10000.0,
                                        max_position_embeddings=512), rngs=nnx.Rngs(3))
  packed = {}
  packed_batches = _batches(config, path, pack=True, batch_size=8)
  assert all(b['segment_ids'].max() > 1 for b in packed_batches)           # really packed
  for b in packed_batches:
    packed.update(_loss_per_example(model, b))
  # Reference: each example alone in its own row, right-padded (8 rows per call: one compiled shape).
  unique = list({tuple(e.input_ids): e for e in examples}.values())
  alone = {}
  for start in range(0, len(unique), 8):
    rows = {k: np.zeros((8, 256), np.int32) for k in pipeline.BATCH_KEYS}
    for r, e in enumerate(unique[start:start + 8]):
      n = len(e.input_ids)
      rows['input_ids'][r, :n], rows['loss_mask'][r, :n] = e.input_ids, e.loss_mask
      rows['positions'][r, :n], rows['segment_ids'][r, :n] = np.arange(n), 1
    alone.update(_loss_per_example(model, rows))
  padded = {}
  for b in _batches(config, path, pack=False, batch_size=8, buckets=(256,)):
    padded.update(_loss_per_example(model, b))
  assert set(packed) == set(alone) == set(padded) and len(alone) == len(unique)
  for key, value in alone.items():
    assert value > 1.0
    np.testing.assert_allclose(packed[key], value, rtol=1e-5)
    np.testing.assert_allclose(padded[key], value, rtol=1e-5)


def _epoch_length(config, path, epoch):
  """Full global batches in one shuffled epoch (packing makes it depend on the order)."""
  ds = pipeline.global_batches(
      pipeline.read_tfrecord(path), config.batching, batch_size=config.train.batch_size,
      max_length=config.prompts.max_length, shuffle=(pipeline.epoch_seed(config.seed, epoch), 10_000),
      drop_remainder=True)
  return sum(1 for _ in ds)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for k in pipeline.BATCH_KEYS:
      np.testing.assert_array_equal(x[k], y[k])


def test_length_grouped_batches_share_a_bucket(setup):
  _, examples, path = setup
  config = tiny_config()
  config.batching.pack = False
  buckets = sorted(config.batching.length_buckets)

  def bucket_of(length):
    return next(b for b in buckets if b >= length)

  def epoch(group):
    config.batching.group_by_length = group
    it = pipeline.TrainBatches(path, config, np.arange(config.train.batch_size))
    return _take(it, _epoch_length(config, path, epoch=0))

  grouped, mixed = epoch(True), epoch(False)
  lengths = [b['segment_ids'].sum(axis=1) for b in grouped]
  assert all(len({bucket_of(n) for n in row}) == 1 for row in lengths)
  assert len({bucket_of(n) for row in lengths for n in row}) > 1          # several buckets occur
  assert any(len({bucket_of(n) for n in b['segment_ids'].sum(axis=1)}) > 1 for b in mixed)
  seen = collections.Counter(tuple(r[s > 0]) for b in grouped for r, s in zip(b['input_ids'], b['segment_ids']))
  in_file = collections.Counter(tuple(e.input_ids) for e in examples)
  assert all(n <= in_file[k] for k, n in seen.items())                   # no example more often than written
  # Less padding than batching neighbours of every length.
  padded = lambda bs: sum(b['input_ids'].size for b in bs) / sum(int(b['segment_ids'].astype(bool).sum()) for b in bs)
  assert padded(grouped) < padded(mixed)


@pytest.mark.parametrize('pack', [True, False])
def test_resume_gives_identical_batches(setup, pack):
  _, _, path = setup
  config = tiny_config()
  config.batching.pack = pack
  rows = np.arange(4)
  it = pipeline.TrainBatches(path, config, rows)
  per_epoch = _epoch_length(config, path, epoch=0)
  assert per_epoch >= 3
  first = _take(it, per_epoch + 3)                           # crosses into epoch 1
  assert it.get_state() == {'epoch': 1, 'batch': 3}
  _assert_same(first, _take(pipeline.TrainBatches(path, config, rows), per_epoch + 3))   # deterministic
  for stop in (2, per_epoch, per_epoch + 1):
    it = pipeline.TrainBatches(path, config, rows)
    _take(it, stop)
    state = json.loads(json.dumps(it.get_state()))
    resumed = pipeline.TrainBatches(path, config, rows)
    resumed.set_state(state)
    _assert_same(_take(resumed, per_epoch + 3 - stop), first[stop:])
  # A new epoch is a new order of the same rows.
  epoch0, epoch1 = first[:per_epoch], first[per_epoch:]
  assert any(not np.array_equal(a['input_ids'], b['input_ids']) for a, b in zip(epoch0, epoch1))
  with pytest.raises(ValueError, match='set_state'):
    it.set_state({'epoch': 0})
  config.train.batch_size = 1000
  with pytest.raises(ValueError, match='no complete global batch'):
    next(pipeline.TrainBatches(path, config, np.arange(1000)))


@pytest.mark.parametrize('axes', [dict(data=2, fsdp=4, tensor=1), dict(data=1, fsdp=4, tensor=2)])
def test_process_slices_are_disjoint_and_cover_the_global_batch(setup, axes):
  _, _, path = setup
  config = tiny_config()
  config.batching.pack = False          # padding mode: each process must pick the global bucket
  config.train.batch_size = 8
  config.mesh.update(dcn_data=1, **axes)
  mesh = sharding.make_mesh(config.mesh)
  rules = config.mesh.rules
  index = sharding.batch_sharding(mesh, rules, ndim=1).devices_indices_map((8,))
  # Pretend each pair of devices is one host: 4 processes.
  rows = [sorted({r for d, (s,) in index.items() if d.id // 2 == p for r in range(8)[s]}) for p in range(4)]
  flat = [r for rs in rows for r in rs]
  shards = sharding.batch_shards(mesh, rules)
  assert sorted(flat) == list(range(8)) and len(flat) == 8 and all(len(r) == 8 // 4 for r in rows)
  np.testing.assert_array_equal(sharding.process_rows(mesh, rules, 8), np.arange(8))  # one real process
  full = _take(pipeline.TrainBatches(path, config, np.arange(8)), 3)
  parts = [_take(pipeline.TrainBatches(path, config, r), 3) for r in rows]
  for step, batch in enumerate(full):
    for k in pipeline.BATCH_KEYS:
      glued = np.zeros_like(batch[k])
      for r, part in zip(rows, parts):
        assert part[step][k].shape == (len(r), batch[k].shape[1])       # same bucket everywhere
        glued[r] = part[step][k]
      np.testing.assert_array_equal(glued, batch[k])
    arr = sharding.global_batch_array(batch['input_ids'], mesh, rules, 8)
    np.testing.assert_array_equal(np.asarray(arr), batch['input_ids'])
    assert len(arr.sharding.device_set) == 8 and shards == 8 // axes['tensor']


def test_eval_batches_reiterable_and_complete(setup):
  _, examples, path = setup
  config = tiny_config()
  config.batching.pack = True
  ev = pipeline.EvalBatches(path, config, np.arange(4))
  # No autotuning model thread: an iterator's destructor would wait up to a minute for it (pipeline._local).
  assert ev._ds.options().autotune.enabled is False  # pylint: disable=protected-access
  a, b = list(ev), list(ev)
  _assert_same(a, b)
  assert len(_segments(a)) == len(examples)
  assert sum(int(x['loss_mask'].sum()) for x in a) == sum(int(e.loss_mask.sum()) for e in examples)
  halves = [list(pipeline.EvalBatches(path, config, r)) for r in (np.arange(2), np.arange(2, 4))]
  for whole, lo, hi in zip(a, *halves):
    np.testing.assert_array_equal(np.concatenate([lo['input_ids'], hi['input_ids']]), whole['input_ids'])


def test_write_examples_and_fingerprint(setup, tmp_path):
  _, examples, _ = setup
  config = tiny_config()
  before = pipeline.examples_fingerprint(config, 'palr_v2')
  out = pipeline.write_examples(tmp_path / 'examples' / before, config.prompts.max_length,
                                {'train': examples, 'valid': examples[:3]})
  assert pipeline.examples_dir(tmp_path, before) == out
  meta = json.loads((out / 'meta.json').read_text())
  assert meta['splits']['valid']['examples'] == 3
  assert meta['splits']['train']['tokens'] == sum(len(e.input_ids) for e in examples)
  half = len(examples) // 2
  assert meta['splits']['train']['tasks'] == {'recommend': half, 'recommend_retrieval': half}
  assert len(list(pipeline.read_tfrecord(out / 'valid.tfrecord'))) == 3
  config.batching.pack = not config.batching.pack    # batching: same examples
  assert pipeline.examples_fingerprint(config, 'palr_v2') == before
  config.prompts.max_history += 1
  after = pipeline.examples_fingerprint(config, 'palr_v2')
  assert after != before and pipeline.examples_dir(tmp_path, after) is None
  assert pipeline.examples_fingerprint(config, 'palr_v2', upstream=['other candidates']) != after


def test_build_and_write_once_per_fingerprint(tmp_path):
  inter = tiny_interactions()
  split = interactions.leave_one_out(inter)
  write_candidates(tmp_path / 'candidates', inter, split, count=4)
  config = tiny_config()
  out = pipeline.build_and_write(config, tmp_path, inter, split, tiny_tokenizer(), ['p'] * 4, 'palr_v2')
  meta = json.loads((out / 'meta.json').read_text())
  assert set(meta['splits']) == {'train', 'valid'}
  assert meta['splits']['valid']['tasks'] == {'recommend': 4, 'recommend_retrieval': 4}
  stamp = os.stat(out / 'train.tfrecord').st_mtime_ns
  assert pipeline.build_and_write(config, tmp_path, inter, split, None, None, 'palr_v2') == out  # not rebuilt
  assert os.stat(out / 'train.tfrecord').st_mtime_ns == stamp
  other = pipeline.build_and_write(config, tmp_path, inter, split, tiny_tokenizer(), None, 'palr_v1')
  other_meta = json.loads((other / 'meta.json').read_text())
  assert other != out and other_meta['splits']['valid']['examples'] == 4
  # v1 gets v2's tag tokens too (one train-step program for both), but no answer token marked 2 uses them.
  assert other_meta['choice_ids'] == meta['choice_ids'] == tiny_builder_tags(config)
  assert not any((np.asarray(ex['loss_mask']) == 2).any() for ex in pipeline.read_tfrecord(other / 'train.tfrecord'))
  assert any((np.asarray(ex['loss_mask']) == 2).any() for ex in pipeline.read_tfrecord(out / 'train.tfrecord'))


def tiny_builder_tags(config) -> list[int]:
  builder = prompts.PromptBuilder(config, tiny_interactions(), tiny_tokenizer(),
                                  ('recommend', 'recommend_retrieval'))
  return builder.choice_ids().tolist()


def test_task_repeats_weight_the_training_mix_only(tmp_path):
  inter = tiny_interactions()
  split = interactions.leave_one_out(inter)
  write_candidates(tmp_path / 'candidates', inter, split, count=4)
  config = tiny_config()
  base = pipeline.build_and_write(config, tmp_path, inter, split, tiny_tokenizer(), None, 'palr_v2')
  base_meta = json.loads((base / 'meta.json').read_text())['splits']
  v1_before = pipeline.examples_fingerprint(config, 'palr_v1')

  config.variants.palr_v2.task_repeats.recommend_retrieval = 3
  out = pipeline.build_and_write(config, tmp_path, inter, split, tiny_tokenizer(), None, 'palr_v2')
  assert out != base
  meta = json.loads((out / 'meta.json').read_text())['splits']
  tasks = base_meta['train']['tasks']
  assert meta['train']['tasks'] == {'recommend': tasks['recommend'],
                                    'recommend_retrieval': 3 * tasks['recommend_retrieval']}
  assert meta['valid'] == base_meta['valid']
  # In file order, each Recommend_Retrieval example is written three times, each Recommend one once.
  builder = prompts.PromptBuilder(config, inter, tiny_tokenizer())
  cands = prompts.read_candidates(tmp_path / 'candidates' / 'train.jsonl', split, 'train')
  built = prompts.build_examples(builder, split, 'train', None, cands)
  expected = [e.input_ids for e in built for _ in range(3 if e.task == 'recommend_retrieval' else 1)]
  records = [r['input_ids'] for r in pipeline.read_tfrecord(out / 'train.tfrecord').as_numpy_iterator()]
  assert len(records) == len(expected) == len(built) + 2 * tasks['recommend_retrieval']
  for got, want in zip(records, expected):
    np.testing.assert_array_equal(got, want)
  # v1 trains on Recommend only: its examples (and their fingerprint) do not change with a weight of a
  # task it does not train on.
  config.variants.palr_v1.task_repeats.recommend_retrieval = 3
  assert pipeline.examples_fingerprint(config, 'palr_v1') == v1_before
  config.variants.palr_v1.task_repeats.recommend = 2
  assert pipeline.examples_fingerprint(config, 'palr_v1') != v1_before
  config.variants.palr_v2.task_repeats.recommend = 0
  with pytest.raises(ValueError, match='config.variants.palr_v2.task_repeats'):
    pipeline.examples_fingerprint(config, 'palr_v2')
  config.variants.palr_v2.task_repeats.recommend = 1
  config.variants.palr_v2.task_repeats.ranking = 2
  with pytest.raises(ValueError, match="config.variants.palr_v2.task_repeats.*unknown \\['ranking'\\]"):
    prompts.task_repeats(config, 'palr_v2')


def test_tensorflow_imported_without_eager_keras():
  # TF's import pulls in Keras and matplotlib unless that fails; tf.data needs neither, Keras stays usable.
  import subprocess, sys  # noqa: E401  pylint: disable=g-import-not-at-top,multiple-imports
  code = ("import sys\nfrom palr_jax.data import tf_cpu\ntf = tf_cpu.tensorflow()\n"
          "assert 'keras' not in sys.modules and 'matplotlib' not in sys.modules, sorted(sys.modules)[:5]\n"
          "assert list(tf.data.Dataset.range(3).as_numpy_iterator()) == [0, 1, 2]\n"
          "import keras\nprint('keras', keras.__version__)\n")
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2'})
  assert out.returncode == 0 and 'keras ' in out.stdout, out.stderr[-3000:]


class _Synthetic(collections.namedtuple('_Synthetic', 'task input_ids loss_mask')):
  pass


def _synthetic(n: int, seed: int = 0):
  """A stand-in prompt builder's stream: n examples of 1..300 tokens, made on demand."""
  rng = np.random.default_rng(seed)
  for k in range(n):
    length = int(rng.integers(1, 301))
    mask = np.zeros(length, np.int32)
    mask[-1] = 1
    yield _Synthetic('recommend' if k % 3 else 'recommend_retrieval',
                     rng.integers(0, 400, length).astype(np.int32), mask)


def test_writer_streams_examples_in_bounded_memory(tmp_path):
  import tracemalloc

  def peak(n):
    tracemalloc.start()
    try:
      pipeline.write_examples(tmp_path / f'ex{n}', 512, {'train': _synthetic(n)})
      return tracemalloc.get_traced_memory()[1]
    finally:
      tracemalloc.stop()

  small, large = peak(200), peak(4000)
  held = sum(e.input_ids.nbytes + e.loss_mask.nbytes for e in _synthetic(4000))   # what a list would hold
  assert large < small + held / 10, (small, large, held)
  meta = json.loads((tmp_path / 'ex4000' / 'meta.json').read_text())['splits']['train']
  lengths = np.asarray([len(e.input_ids) for e in _synthetic(4000)])
  assert meta['examples'] == 4000 == pipeline.count_records(tmp_path / 'ex4000' / 'train.tfrecord')
  assert meta['tokens'] == lengths.sum() and meta['max_length'] == lengths.max()
  stats = meta['tokens_per_example']
  assert stats['all']['mean'] == round(float(lengths.mean()), 1)
  assert stats['all']['p95'] == int(np.percentile(lengths, 95, method='inverted_cdf'))
  assert stats['all']['max'] == lengths.max()
  retrieval = lengths[::3]
  assert stats['recommend_retrieval']['examples'] == len(retrieval)
  assert stats['recommend_retrieval']['max'] == retrieval.max()
  assert meta['tasks'] == {'recommend': 4000 - len(retrieval), 'recommend_retrieval': len(retrieval)}


def test_every_prefix_examples_counted(tmp_path):
  inter = tiny_interactions()
  split = interactions.leave_one_out(inter)
  write_candidates(tmp_path / 'candidates', inter, split, count=4)
  config = tiny_config()
  config.prompts.missed_target = 'skip'
  config.variants.palr_v2.task_repeats.recommend_retrieval = 2
  last = json.loads((pipeline.build_and_write(config, tmp_path, inter, split, tiny_tokenizer(), None,
                                              'palr_v2') / 'meta.json').read_text())['splits']['train']
  config.prompts.positions = 'all'
  out = pipeline.build_and_write(config, tmp_path, inter, split, tiny_tokenizer(), None, 'palr_v2')
  meta = json.loads((out / 'meta.json').read_text())['splits']['train']
  builder = prompts.PromptBuilder(config, inter, tiny_tokenizer())
  built = prompts.build_examples(builder, split, 'train', None,
                                 prompts.read_candidates(tmp_path / 'candidates/train.jsonl', split, 'train'))
  assert meta['distinct_examples'] == len(built) > last['distinct_examples']
  tasks = collections.Counter(e.task for e in built)
  assert meta['distinct_tasks'] == dict(tasks)
  assert meta['examples'] == tasks['recommend'] + 2 * tasks['recommend_retrieval']
  assert meta['tokens_per_example']['all']['max'] == max(len(e.input_ids) for e in built)
  assert meta['distinct_tokens_per_example']['recommend']['examples'] == tasks['recommend']
  # Retrieval examples only where the target was retrieved ('skip'): fewer than Recommend's every prefix.
  assert all(e.target in e.candidates for e in built if e.task == 'recommend_retrieval')
  assert tasks['recommend'] == sum(len(set(range(1, len(t))) - {p for p in range(1, len(t)) if t[p] in t[:p]
                                                                  or t[p] in (split.valid[u], split.test[u])})
                                   for u, t in enumerate(split.train))


def test_shuffled_train_order_writes_the_same_examples_users_permuted(tmp_path):
  inter = tiny_interactions()
  split = interactions.leave_one_out(inter)
  write_candidates(tmp_path / 'candidates', inter, split, count=4)
  config = tiny_config()
  config.seed = 3
  by_user = pipeline.build_and_write(config, tmp_path, inter, split, tiny_tokenizer(), None, 'palr_v2')
  config.prompts.train_order = 'shuffled'
  shuffled = pipeline.build_and_write(config, tmp_path, inter, split, tiny_tokenizer(), None, 'palr_v2')
  assert shuffled != by_user
  read = lambda d, s: [tuple(r['input_ids']) for r in pipeline.read_tfrecord(d / s).as_numpy_iterator()]  # noqa: E731
  a, b = read(by_user, 'train.tfrecord'), read(shuffled, 'train.tfrecord')
  assert sorted(a) == sorted(b) and a != b
  assert read(by_user, 'valid.tfrecord') == read(shuffled, 'valid.tfrecord')


def test_residual_variant_writes_the_retriever_z_at_each_tag(tmp_path):
  """A rank_mode 'residual' variant's examples carry `candidate_z`: at the tag token, the retriever's
  scores of the shown candidates (tag order) standardized over the user's candidates; zeros elsewhere;
  meta.json holds its width and the head's fitted initial scale; packing is refused."""
  from palr_jax import score_head
  inter = tiny_interactions()
  split = interactions.leave_one_out(inter)
  write_candidates(tmp_path / 'candidates', inter, split, count=4)
  config = tiny_config()
  plain = pipeline.examples_fingerprint(config, 'palr_v2')
  config.variants.palr_v2.rank_mode = 'residual'
  assert pipeline.examples_fingerprint(config, 'palr_v2') != plain
  out = pipeline.build_and_write(config, tmp_path, inter, split, tiny_tokenizer(), None, 'palr_v2')
  meta = json.loads((out / 'meta.json').read_text())
  assert meta['candidate_z_width'] == len(meta['choice_ids']) == 4
  assert np.isfinite(meta['score_head_scale'])
  rows = {(r['user_index'], r['position']): r
          for r in map(json.loads, (tmp_path / 'candidates' / 'train.jsonl').open())}
  builder = prompts.PromptBuilder(config, inter, tiny_tokenizer())
  built = prompts.build_examples(builder, split, 'train', None,
                                 prompts.read_candidates(tmp_path / 'candidates' / 'train.jsonl', split, 'train'))
  records = list(pipeline.read_tfrecord(out / 'train.tfrecord', 4).as_numpy_iterator())
  assert len(records) == len(built)
  checked = 0
  for e, r in zip(built, records):
    assert r['candidate_z'].shape == (len(r['input_ids']), 4)
    tags = np.flatnonzero(r['loss_mask'] == 2)
    assert not np.delete(r['candidate_z'], tags, axis=0).any()
    if e.task == 'recommend_retrieval' and all(i in rows[(e.user, e.position)]['items'] for i in e.candidates):
      row = rows[(e.user, e.position)]
      z = dict(zip(row['items'], score_head.standardize(row['scores'])))
      k = len(e.candidates)
      np.testing.assert_allclose(r['candidate_z'][tags[0], :k], [z[i] for i in e.candidates], rtol=1e-6)
      assert not r['candidate_z'][tags[0], k:].any()
      checked += 1
  assert checked
  config.batching.pack, config.batching.length_buckets = False, (64, 128, 256, config.prompts.max_length)
  batches = pipeline.TrainBatches(out / 'train.tfrecord', config, np.arange(config.train.batch_size))
  batch = next(batches)
  assert batch['candidate_z'].shape == (*batch['input_ids'].shape, 4)
  config.batching.pack = True
  with pytest.raises(ValueError, match='batching.pack'):
    list(pipeline.global_batches(pipeline.read_tfrecord(out / 'train.tfrecord', 4), config.batching,
                                 batch_size=4, max_length=config.prompts.max_length, drop_remainder=False))

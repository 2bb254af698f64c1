"""Readers, filtering and the leave-one-out split, on fixture files written here and on the ML-100K
embedded in the recbole wheel."""
import csv
import gzip
import json
import logging
import os

import numpy as np
import pytest

from palr_jax.defaults import get_config
from palr_jax.data import interactions as I

RECBOLE_INTER = """user_id:token\titem_id:token\trating:float\ttimestamp:float
u1\ti3\t5\t100
u1\ti1\t4\t100
u1\ti2\t3\t50
u2\ti2\t2\t10
u2\ti1\t5\t20
u2\ti3\t1\t20
u2\ti4\t4\t30
"""
RECBOLE_ITEM = """item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq
i1\tAmélie\t2001\tComedy Romance
i2\tSeven Samurai\t1954\tAction Drama
i3\tZ\t1969\t
"""
RECBOLE_USER = """user_id:token\tage:token\tgender:token
u1\t24\tM
u2\t53\tF
"""


def write(path, text, encoding='utf-8'):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(text.encode(encoding))
  return path


def data_config(**overrides):
  c = get_config().data
  c.max_missing_item_fraction = 1.0  # the fixtures leave items out of their item files; tested on its own
  c.update(overrides)
  return c


def toy_recbole(tmp_path, inter=RECBOLE_INTER, item=RECBOLE_ITEM, user=RECBOLE_USER):
  write(tmp_path / 'toy.inter', inter)
  write(tmp_path / 'toy.item', item)
  if user is not None:
    write(tmp_path / 'toy.user', user)
  return data_config(source='recbole', path=str(tmp_path), name='toy', min_history=3)


def item_seq(inter, u):
  return [inter.item_ids[i] for i in inter.sequences[u]]


# ------------------------------------------------------------------------------------------------
# RecBole atomic files.


def test_recbole_reader_and_tie_order(tmp_path):
  inter = I.load(toy_recbole(tmp_path))
  assert inter.name == 'toy'
  np.testing.assert_array_equal(inter.user_ids, ['u1', 'u2'])  # first appearance
  np.testing.assert_array_equal(inter.item_ids, ['i3', 'i1', 'i2', 'i4'])
  # u1: i3 and i1 share timestamp 100 and keep file order (item-id order would put i1 first).
  assert item_seq(inter, 0) == ['i2', 'i3', 'i1']
  assert item_seq(inter, 1) == ['i2', 'i1', 'i3', 'i4']
  np.testing.assert_array_equal(inter.timestamps[0], [50, 100, 100])
  assert inter.sequences[0].dtype == np.int32 and inter.timestamps[0].dtype == np.int64
  assert inter.titles == ['Z (1969)', 'Amélie (2001)', 'Seven Samurai (1954)', '']  # i4 has no item row
  assert inter.genres == [(), ('Comedy', 'Romance'), ('Action', 'Drama'), ()]
  np.testing.assert_array_equal(inter.user_features['age'], ['24', '53'])
  np.testing.assert_array_equal(inter.user_features['gender'], ['M', 'F'])
  with pytest.raises(ValueError):
    inter.sequences[0][0] = 1  # read-only: Interactions is frozen all the way down

  split = I.leave_one_out(inter)
  assert [[inter.item_ids[i] for i in t] for t in split.train] == [['i2'], ['i2', 'i1']]
  assert list(inter.item_ids[split.valid]) == ['i3', 'i3']
  assert list(inter.item_ids[split.test]) == ['i1', 'i4']
  assert split.valid.dtype == split.test.dtype == np.int32


def test_recbole_prefix_path_title_and_genre_aliases(tmp_path):
  write(tmp_path / 'd' / 'x.inter', RECBOLE_INTER)
  write(tmp_path / 'd' / 'x.item', 'item_id:token\ttitle:token\tcategories:token_seq\ni1\tOne\ta b\n')
  cfg = data_config(source='recbole', path=str(tmp_path / 'd' / 'x'), name='ignored-stem')
  inter = I.load(cfg)
  assert inter.titles[list(inter.item_ids).index('i1')] == 'One'
  assert inter.genres[list(inter.item_ids).index('i1')] == ('a', 'b')
  assert inter.user_features == {}


def test_recbole_without_rating_column(tmp_path):
  cfg = toy_recbole(tmp_path, inter='user_id:token\titem_id:token\ttimestamp:float\n'
                    'a\tx\t3\na\ty\t1\na\tz\t2\n')
  inter = I.load(cfg)
  assert item_seq(inter, 0) == ['y', 'z', 'x']
  cfg.rating_threshold = 4.0
  with pytest.raises(I.DataError, match=r'toy\.inter: the source has no ratings'):
    I.load(cfg)


# ------------------------------------------------------------------------------------------------
# GroupLens ML-100K / ML-1M.

GENRE_FLAGS = {'1': [0, 0, 0, 0, 0, 1] + [0] * 13, '2': [0] * 8 + [1] + [0] * 10}


def toy_ml100k(d):
  write(d / 'u.data', '1\t1\t5\t10\n1\t2\t3\t10\n1\t1\t4\t5\n2\t2\t1\t7\n2\t1\t2\t8\n2\t2\t5\t9\n')
  items = ''.join(f'{i}|{t}|01-Jan-1995||http://x|' + '|'.join(map(str, GENRE_FLAGS[i])) + '\n'
                  for i, t in (('1', 'Misérables, Les (1995)'), ('2', 'Café au lait (1993)')))
  write(d / 'u.item', items, encoding='latin-1')
  write(d / 'u.user', '1|24|M|technician|85711\n2|53|F|other|94043\n')
  return data_config(source='ml-100k', path=str(d), name='toy100k')


def test_ml100k_reader_latin1(tmp_path):
  inter = I.load(toy_ml100k(tmp_path))
  np.testing.assert_array_equal(inter.user_ids, ['1', '2'])
  np.testing.assert_array_equal(inter.item_ids, ['1', '2'])
  assert item_seq(inter, 0) == ['1', '1', '2']  # ts 5, then the tie at 10 in file order (1, 2)
  assert item_seq(inter, 1) == ['2', '1', '2']
  assert inter.titles == ['Misérables, Les (1995)', 'Café au lait (1993)']
  assert inter.genres == [('Comedy',), ('Drama',)]
  assert dict((k, list(v)) for k, v in inter.user_features.items()) == {
      'age': ['24', '53'], 'gender': ['M', 'F'], 'occupation': ['technician', 'other'],
      'zip_code': ['85711', '94043']}


def test_ml100k_user_file_is_optional(tmp_path):
  cfg = toy_ml100k(tmp_path)
  os.remove(tmp_path / 'u.user')
  assert I.load(cfg).user_features == {}


def toy_ml1m(d):
  write(d / 'ratings.dat', '10::7::5::300\n10::8::4::100\n10::9::3::200\n20::9::5::1\n20::7::1::1\n'
        '20::8::2::1\n')
  write(d / 'movies.dat', '7::Crème de la crème (2000)::Comedy|Drama\n8::Star Wars: Episode IV '
        '(1977)::Action|Sci-Fi\n9::Ça (1990)::\n', encoding='latin-1')
  write(d / 'users.dat', '10::F::1::10::48067\n20::M::56::16::70072\n')
  return data_config(source='ml-1m', path=str(d), name='toy1m')


def test_ml1m_reader(tmp_path):
  inter = I.load(toy_ml1m(tmp_path))
  np.testing.assert_array_equal(inter.user_ids, ['10', '20'])
  np.testing.assert_array_equal(inter.item_ids, ['7', '8', '9'])
  assert item_seq(inter, 0) == ['8', '9', '7']
  assert item_seq(inter, 1) == ['9', '7', '8']  # all three tied: file order
  assert inter.titles == ['Crème de la crème (2000)', 'Star Wars: Episode IV (1977)', 'Ça (1990)']
  assert inter.genres == [('Comedy', 'Drama'), ('Action', 'Sci-Fi'), ()]
  assert list(inter.user_features['age']) == ['Under 18', '56+']
  assert list(inter.user_features['occupation']) == ['K-12 student', 'self-employed']
  assert list(inter.user_features['gender']) == ['F', 'M']


# ------------------------------------------------------------------------------------------------
# Amazon 2014 5-core.


def write_gz_lines(path, lines):
  path.parent.mkdir(parents=True, exist_ok=True)
  with gzip.open(path, 'wt', encoding='utf-8') as f:
    f.write(''.join(line + '\n' for line in lines))


def toy_amazon(d):
  reviews = [('A1', 'B2', 5.0, 1400000000), ('A1', 'B1', 4.0, 1400000000), ('A2', 'B1', 3.0, 1300000000),
             ('A1', 'B3', 2.0, 1300000000), ('A2', 'B2', 5.0, 1500000000), ('A2', 'B3', 1.0, 1500000000)]
  write_gz_lines(d / 'reviews_Beauty_5.json.gz', [json.dumps(
      dict(reviewerID=u, asin=i, overall=r, unixReviewTime=t, reviewText='ok', summary='s'))
      for u, i, r, t in reviews])
  meta = [dict(asin='B1', title="Crème 'Rich' № 5", categories=[['Beauty', 'Skin Care'], ['Beauty', 'Face']],
               price=3.5, related={'also_bought': ['B9']}),
          dict(asin='B2', categories=[['Beauty']]),  # no title
          dict(asin='B0', title='not reviewed')]
  write_gz_lines(d / 'meta_Beauty.json.gz', [repr(m) for m in meta])  # Python literals, not JSON
  return data_config(source='amazon', path=str(d), name='Beauty')


def test_amazon_reader(tmp_path):
  inter = I.load(toy_amazon(tmp_path))
  np.testing.assert_array_equal(inter.user_ids, ['A1', 'A2'])
  np.testing.assert_array_equal(inter.item_ids, ['B2', 'B1', 'B3'])
  assert item_seq(inter, 0) == ['B3', 'B2', 'B1']
  assert item_seq(inter, 1) == ['B1', 'B2', 'B3']
  assert inter.titles == ['', "Crème 'Rich' № 5", '']  # B3 has no metadata line
  assert inter.genres == [('Beauty',), ('Beauty', 'Skin Care', 'Face'), ()]


# ------------------------------------------------------------------------------------------------
# TFDS MovieLens, mocked with fixture rows.

TFDS_ROWS = [  # user, movie, title, genre ids, rating, timestamp
    ('3', '50', 'Amélie (2001)', [4, 14], 4.0, 20),
    ('3', '60', 'Heat (1995)', [0, 5, 16], 2.0, 20),
    ('4', '60', 'Heat (1995)', [0, 5, 16], 5.0, 1),
    ('3', '70', 'Plain (1990)', [], 5.0, 10),
    ('4', '50', 'Amélie (2001)', [4, 14], 3.0, 2),
    ('4', '70', 'Plain (1990)', [], 4.0, 2),
]


def test_tfds_rows_round_trip(tmp_path):
  tf = pytest.importorskip('tensorflow')
  tfds = pytest.importorskip('tensorflow_datasets')

  def as_dataset(self, *args, **kwargs):
    del args, kwargs
    spec = self.info.features.get_tensor_spec()

    def rows():
      for user, movie, title, genres, rating, ts in TFDS_ROWS:
        ex = {k: np.array(b'') if s.dtype == tf.string else
              np.zeros([d or 0 for d in s.shape], s.dtype.as_numpy_dtype) for k, s in spec.items()}
        ex.update(user_id=user.encode(), movie_id=movie.encode(), movie_title=title.encode(),
                  movie_genres=np.array(genres, np.int64), user_rating=np.float32(rating),
                  timestamp=np.int64(ts), user_gender=np.bool_(user == '3'),
                  raw_user_age=np.float32(30 + int(user)), user_occupation_text=b'writer',
                  user_zip_code=b'0210' + user.encode())
        yield ex
    return tf.data.Dataset.from_generator(rows, output_signature=spec)

  cfg = data_config(source='tfds', name='movielens/100k-ratings', tfds_data_dir=str(tmp_path))
  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    inter = I.load(cfg)
    cfg.rating_threshold = 4.0
    cfg.min_history = 1
    liked = I.load(cfg)
  np.testing.assert_array_equal(inter.user_ids, ['3', '4'])
  np.testing.assert_array_equal(inter.item_ids, ['50', '60', '70'])
  assert item_seq(inter, 0) == ['70', '50', '60']  # 50 and 60 tie at 20: record order
  assert item_seq(inter, 1) == ['60', '50', '70']
  np.testing.assert_array_equal(inter.timestamps[1], [1, 2, 2])
  assert inter.titles == ['Amélie (2001)', 'Heat (1995)', 'Plain (1990)']
  assert inter.genres == [('Comedy', 'Romance'), ('Action', 'Crime', 'Thriller'), ()]
  assert {k: list(v) for k, v in inter.user_features.items()} == {
      'age': ['33', '34'], 'gender': ['M', 'F'], 'occupation': ['writer', 'writer'],
      'zip_code': ['02103', '02104']}
  assert [item_seq(liked, u) for u in range(2)] == [['70', '50'], ['60', '70']]


def test_tfds_generated_examples_match_dataset(tmp_path):
  """mock_data's generated examples (from the feature spec) read back row for row."""
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=12):
    events = I.read_tfds('movielens/1m-ratings', str(tmp_path))
    reference = list(tfds.as_numpy(tfds.load('movielens/1m-ratings', split='train',
                                             data_dir=str(tmp_path), shuffle_files=False)))
  assert list(events.user_ids[events.users]) == [r['user_id'].decode() for r in reference]
  assert list(events.item_ids[events.items]) == [r['movie_id'].decode() for r in reference]
  np.testing.assert_allclose(events.ratings, [r['user_rating'] for r in reference])
  np.testing.assert_array_equal(events.timestamps, [r['timestamp'] for r in reference])
  for r in reference:
    assert events.titles[r['movie_id'].decode()] == r['movie_title'].decode()


def test_tfds_not_prepared(tmp_path):
  pytest.importorskip('tensorflow_datasets')
  cfg = data_config(source='tfds', name='movielens/100k-ratings', tfds_data_dir=str(tmp_path))
  with pytest.raises(I.DataError, match=f"data_dir '{tmp_path}': cannot load it without downloading"):
    I.load(cfg)
  cfg.name = 'no_such_dataset'
  with pytest.raises(I.DataError, match='no such TFDS dataset'):
    I.load(cfg)


# ------------------------------------------------------------------------------------------------
# Filtering.


def events_of(rows, ratings=None):
  users, items = zip(*rows)
  return I._events('mem', list(users), list(items),
                   None if ratings is None else np.array(ratings, np.float64),
                   np.arange(len(rows), dtype=np.float64), {}, {}, {})


def test_k_core_is_iterative():
  # k=2: F has one event -> item 5 falls to one event -> E falls to one event; A, B, C survive.
  rows = [('A', '1'), ('A', '2'), ('B', '1'), ('B', '3'), ('C', '2'), ('C', '3'), ('D', '4'),
          ('E', '1'), ('E', '5'), ('F', '5')]
  inter = I.to_interactions(events_of(rows), name='k', rating_threshold=0, k_core=2, min_history=0)
  np.testing.assert_array_equal(inter.user_ids, ['A', 'B', 'C'])
  np.testing.assert_array_equal(inter.item_ids, ['1', '2', '3'])
  assert [item_seq(inter, u) for u in range(3)] == [['1', '2'], ['1', '3'], ['2', '3']]
  off = I.to_interactions(events_of(rows), name='k', rating_threshold=0, k_core=0, min_history=0)
  assert len(off.user_ids) == 6 and sum(map(len, off.sequences)) == len(rows)


def test_rating_threshold_and_dense_renumbering():
  rows = [('A', 'x'), ('B', 'y'), ('A', 'y'), ('B', 'x'), ('A', 'z')]
  ratings = [2, 5, 4, 4, 5]
  inter = I.to_interactions(events_of(rows, ratings), name='t', rating_threshold=4, k_core=0,
                            min_history=0)
  # 'x' is first rated >= 4 after 'y' appears, so the surviving rows number y before x.
  np.testing.assert_array_equal(inter.user_ids, ['B', 'A'])
  np.testing.assert_array_equal(inter.item_ids, ['y', 'x', 'z'])
  assert [item_seq(inter, u) for u in range(2)] == [['y', 'x'], ['y', 'z']]
  everything = I.to_interactions(events_of(rows, ratings), name='t', rating_threshold=0, k_core=0,
                                 min_history=0)
  assert sum(map(len, everything.sequences)) == 5


def test_min_history_drops_and_logs(caplog):
  rows = [('A', 'x'), ('A', 'y'), ('A', 'z'), ('B', 'x'), ('B', 'y'), ('C', 'x')]
  with caplog.at_level(logging.INFO):
    inter = I.to_interactions(events_of(rows), name='m', rating_threshold=0, k_core=0, min_history=3)
  np.testing.assert_array_equal(inter.user_ids, ['A'])
  assert 'dropped 2 users with < 3 events' in caplog.text
  I.leave_one_out(inter)
  short = I.to_interactions(events_of(rows), name='m', rating_threshold=0, k_core=0, min_history=1)
  with pytest.raises(I.DataError, match='2 users have fewer than 3 events.*min_history >= 3'):
    I.leave_one_out(short)


def timed_events(rows):
  """Events from (user, item, timestamp) rows, in file order."""
  users, items, times = zip(*rows)
  return I._events('mem', list(users), list(items), None, np.array(times, np.float64), {}, {}, {})


def test_duplicate_rows_are_one_event(tmp_path, caplog):
  """Issue: every row of a RecBole .inter written twice kept both copies, so the test target was the
  valid target for half the users (test HR@10 0.083 -> 0.800)."""
  header, *rows = RECBOLE_INTER.splitlines()
  doubled = '\n'.join([header] + [r for r in rows for _ in (0, 1)]) + '\n'
  once = I.load(toy_recbole(tmp_path / 'once'))
  with caplog.at_level(logging.WARNING):
    twice = I.load(toy_recbole(tmp_path / 'twice', inter=doubled))
  assert 'toy: dropped 7 duplicate rows of' in caplog.text
  assert [item_seq(twice, u) for u in range(2)] == [item_seq(once, u) for u in range(2)]
  split = I.leave_one_out(twice)
  assert not (split.valid == split.test).any()
  # The same user and item at another time is a repeat, not a duplicate: kept (repeats='keep').
  inter = I.to_interactions(timed_events([('A', 'x', 1), ('A', 'y', 2), ('A', 'x', 3), ('A', 'x', 3)]),
                            name='r', rating_threshold=0, k_core=0, min_history=0)
  assert item_seq(inter, 0) == ['x', 'y', 'x']


def test_repeats_drop_targets():
  rows = [('A', 'a', 1), ('A', 'b', 2), ('A', 'a', 3), ('A', 'c', 4), ('A', 'b', 5), ('A', 'd', 6),
          ('A', 'a', 7),                                  # first consumptions a b c d: valid c, test d
          ('B', 'x', 1), ('B', 'y', 2), ('B', 'x', 3), ('B', 'x', 4),   # valid x, test y: two events left
          ('C', 'p', 1), ('C', 'p', 2), ('C', 'q', 3), ('C', 'r', 4)]   # no repeat after p
  kept = I.to_interactions(timed_events(rows), name='r', rating_threshold=0, k_core=0, min_history=2)
  assert [item_seq(kept, u) for u in range(3)] == [['a', 'b', 'a', 'c', 'b', 'd', 'a'], ['x', 'y', 'x', 'x'],
                                                   ['p', 'p', 'q', 'r']]
  dropped = I.to_interactions(timed_events(rows), name='r', rating_threshold=0, k_core=0, min_history=2,
                              repeats='drop_targets')
  # Repeats before the valid target stay (A's second a, C's second p); those after it go.
  assert [item_seq(dropped, u) for u in range(3)] == [['a', 'b', 'a', 'c', 'd'], ['x', 'y'], ['p', 'p', 'q', 'r']]
  three = I.to_interactions(timed_events(rows), name='r', rating_threshold=0, k_core=0, min_history=3,
                            repeats='drop_targets')
  split = I.leave_one_out(three)  # B, left with two events, is dropped by min_history
  assert list(three.user_ids) == ['A', 'C']
  assert [three.item_ids[i] for i in split.valid] == ['c', 'q']
  assert [three.item_ids[i] for i in split.test] == ['d', 'r']
  for u, (valid, test) in enumerate(zip(split.valid, split.test)):  # targets are first consumptions
    assert valid not in split.train[u] and test not in split.train[u] and valid != test
  with pytest.raises(I.DataError, match=r'mem: no interactions left after filtering'):
    I.to_interactions(timed_events(rows), name='r', rating_threshold=0, k_core=0, min_history=9,
                      repeats='drop_targets')
  with pytest.raises(I.DataError, match=r"config.data.repeats='drop'"):
    I.to_interactions(timed_events(rows), name='r', rating_threshold=0, k_core=0, min_history=2, repeats='drop')


def test_utf8_byte_order_mark(tmp_path):
  bom = '\ufeff'
  plain = I.load(toy_recbole(tmp_path / 'plain'))
  marked = I.load(toy_recbole(tmp_path / 'bom', inter=bom + RECBOLE_INTER, item=bom + RECBOLE_ITEM,
                              user=bom + RECBOLE_USER))
  assert [item_seq(marked, u) for u in range(2)] == [item_seq(plain, u) for u in range(2)]
  assert marked.titles == plain.titles and list(marked.user_features['age']) == ['24', '53']
  # A GroupLens file (latin-1) with a UTF-8 byte-order mark is UTF-8.
  cfg = toy_ml100k(tmp_path / 'ml')
  write(tmp_path / 'ml' / 'u.data', bom + (tmp_path / 'ml' / 'u.data').read_text())
  items = (tmp_path / 'ml' / 'u.item').read_bytes().decode('latin-1')
  write(tmp_path / 'ml' / 'u.item', bom + items, encoding='utf-8')
  inter = I.load(cfg)
  np.testing.assert_array_equal(inter.user_ids, ['1', '2'])
  assert inter.titles == ['Misérables, Les (1995)', 'Café au lait (1993)']


def test_nothing_left_after_filtering(tmp_path):
  cfg = toy_recbole(tmp_path)
  cfg.k_core = 10
  with pytest.raises(I.DataError, match=r'toy\.inter: no interactions left after filtering'):
    I.load(cfg)


# ------------------------------------------------------------------------------------------------
# Bad input: one DataError naming the file and line.


def replace_line(path, line_no, text):
  lines = path.read_bytes().split(b'\n')
  lines[line_no - 1] = text.encode() if isinstance(text, str) else text
  path.write_bytes(b'\n'.join(lines))


@pytest.mark.parametrize('line_no, text, match', [
    (3, 'u1\ti1\t4', r'toy\.inter:3: expected 4 .*fields, found 3'),
    (4, 'u1\ti2\tthree\t50', r"toy\.inter:4: rating must be a finite number, got 'three'"),
    (2, 'u1\ti3\t5\tnan', r"toy\.inter:2: timestamp must be a finite number, got 'nan'"),
    (5, b'u2\t\xff\t2\t10', r'toy\.inter:5: not valid utf-8 text'),
    (1, 'user_id:token\titem_id:token\trating:float\ttimestamp:date', r"toy\.inter:1: column "
     r"'timestamp:date' must be \"name:type\""),
    (1, 'user_id:token\titem_id:token\trating:float\tts:float', r"toy\.inter:1: missing required "
     r"column\(s\) \['timestamp'\]"),
])
def test_recbole_bad_input(tmp_path, line_no, text, match):
  cfg = toy_recbole(tmp_path)
  replace_line(tmp_path / 'toy.inter', line_no, text)
  with pytest.raises(I.DataError, match=match):
    I.load(cfg)


def test_missing_files(tmp_path):
  with pytest.raises(I.DataError, match=r'nowhere\.inter: file not found'):
    I.load(data_config(source='recbole', path=str(tmp_path / 'nowhere'), name='toy'))
  cfg = toy_recbole(tmp_path)
  os.remove(tmp_path / 'toy.item')
  with pytest.raises(I.DataError, match=r'toy\.item: file not found'):
    I.load(cfg)
  with pytest.raises(I.DataError, match=r'u\.data: file not found'):
    I.load(data_config(source='ml-100k', path=str(tmp_path)))
  with pytest.raises(I.DataError, match=r'reviews_Toys_5\.json\.gz: file not found'):
    I.load(data_config(source='amazon', path=str(tmp_path), name='Toys'))


def test_unknown_source_and_empty_path():
  with pytest.raises(I.DataError, match=r"config\.data\.source='movielens': unknown source"):
    I.load(data_config(source='movielens', path='/x'))
  with pytest.raises(I.DataError, match='config.data.path is empty'):
    I.load(data_config(source='ml-1m', path=''))


def test_grouplens_bad_input(tmp_path):
  cfg = toy_ml100k(tmp_path)
  replace_line(tmp_path / 'u.item', 2, '2|Café|01-Jan-1995||http://x|0|0')
  with pytest.raises(I.DataError, match=r'u\.item:2: expected 24 .*fields, found 7'):
    I.load(cfg)
  cfg = toy_ml100k(tmp_path)
  replace_line(tmp_path / 'u.data', 6, '2\t2\t5\t9pm')
  with pytest.raises(I.DataError, match=r"u\.data:6: timestamp must be a finite number, got '9pm'"):
    I.load(cfg)
  cfg = toy_ml1m(tmp_path / 'm')
  replace_line(tmp_path / 'm' / 'users.dat', 2, '20::M::56::99::70072')
  with pytest.raises(I.DataError, match=r'users\.dat:2: .*occupation code 99'):
    I.load(cfg)
  cfg = toy_ml1m(tmp_path / 'm')
  replace_line(tmp_path / 'm' / 'ratings.dat', 4, '20::9::5')
  with pytest.raises(I.DataError, match=r"ratings\.dat:4: expected 4 '::'-separated fields, found 3"):
    I.load(cfg)
  replace_line(tmp_path / 'm' / 'ratings.dat', 4, '20::9::5::\x1f')
  with pytest.raises(I.DataError, match=r'ratings\.dat:4: unexpected control character'):
    I.load(cfg)


def test_amazon_bad_input(tmp_path):
  cfg = toy_amazon(tmp_path)
  reviews = tmp_path / 'reviews_Beauty_5.json.gz'
  lines = gzip.decompress(reviews.read_bytes()).decode().splitlines()
  write_gz_lines(reviews, lines[:1] + ['{"reviewerID": "A3", "asin": "B1", "overall": "five", '
                                       '"unixReviewTime": 1}'] + lines[2:])
  with pytest.raises(I.DataError, match=r'reviews_Beauty_5\.json\.gz:2: expected a JSON object'):
    I.load(cfg)
  cfg = toy_amazon(tmp_path)
  write_gz_lines(tmp_path / 'meta_Beauty.json.gz', ["{'asin': 'B1', 'title': 'x'}",
                                                     "{'asin': 'B2', 'title': os.system('x')}"])
  with pytest.raises(I.DataError, match=r'meta_Beauty\.json\.gz:2: expected a Python dict literal'):
    I.load(cfg)


# ------------------------------------------------------------------------------------------------
# The ML-100K embedded in the recbole wheel.


@pytest.fixture(scope='module')
def ml100k():
  return I.load(get_config().data)  # its load time is bench material, not a test's


def reference_last_two(inter_path):
  """Per raw user, the last two items after Python's stable sort on timestamp (file order on ties)."""
  events = {}
  with open(inter_path, newline='') as f:
    reader = csv.reader(f, delimiter='\t')
    next(reader)
    for user, item, _, ts in reader:
      events.setdefault(user, []).append((float(ts), item))
  return {u: [i for _, i in sorted(e, key=lambda x: x[0])[-2:]] for u, e in events.items()}


def test_embedded_ml100k(ml100k):
  inter = ml100k
  assert (len(inter.user_ids), len(inter.item_ids), sum(map(len, inter.sequences))) == (943, 1682,
                                                                                        100000)
  assert (inter.user_ids[0], inter.item_ids[0]) == ('196', '242')  # first row of ml-100k.inter
  toy_story = list(inter.item_ids).index('1')
  assert inter.titles[toy_story] == 'Toy Story (1995)'  # release_year appended, as GroupLens
  assert inter.genres[toy_story] == ('Animation', "Children's", 'Comedy')
  u1 = list(inter.user_ids).index('1')
  assert {k: v[u1] for k, v in inter.user_features.items()} == {
      'age': '24', 'gender': 'M', 'occupation': 'technician', 'zip_code': '85711'}
  assert all((np.diff(t) >= 0).all() for t in inter.timestamps)


def test_embedded_ml100k_ties_decide_415_targets(ml100k):
  inter = ml100k
  ties = sum(int(t[-1] == t[-2]) for t in inter.timestamps)
  assert ties == 415  # the number quoted in the interactions module docstring
  split = I.leave_one_out(inter)
  reference = reference_last_two(os.path.join(I.embedded_ml100k_dir(), 'ml-100k.inter'))
  for u, raw in enumerate(inter.user_ids):
    assert [inter.item_ids[split.valid[u]], inter.item_ids[split.test[u]]] == reference[raw]
  # Breaking ties by ascending item id instead would change 281 test targets.
  by_item_id = sum(
      inter.item_ids[split.test[u]] != max((inter.item_ids[i] for i, t in zip(s, ts) if t == ts[-1]),
                                           key=int)
      for u, (s, ts) in enumerate(zip(inter.sequences, inter.timestamps)))
  assert by_item_id == 281


def test_ml100k_reader_agrees_with_recbole(ml100k, tmp_path):
  """The same rows written in GroupLens format read back to the same Interactions."""
  inter = ml100k
  src = I.embedded_ml100k_dir()
  with open(os.path.join(src, 'ml-100k.inter')) as f:
    write(tmp_path / 'u.data', ''.join(f.readlines()[1:]))
  genres = dict(zip(I.ML100K_GENRES, range(19)))
  lines = []
  with open(os.path.join(src, 'ml-100k.item'), encoding='utf-8') as f:
    for row in list(csv.reader(f, delimiter='\t', quoting=csv.QUOTE_NONE))[1:]:
      flags = ['0'] * 19
      for g in row[3].split():
        flags[genres[g]] = '1'
      title = f'{row[1]} ({row[2]})' if row[2] and row[1] else row[1]
      lines.append('|'.join([row[0], title, '', '', ''] + flags) + '\n')
  write(tmp_path / 'u.item', ''.join(lines), encoding='latin-1')
  other = I.load(data_config(source='ml-100k', path=str(tmp_path), name='ml-100k'))
  np.testing.assert_array_equal(other.user_ids, inter.user_ids)
  np.testing.assert_array_equal(other.item_ids, inter.item_ids)
  assert all(np.array_equal(a, b) for a, b in zip(other.sequences, inter.sequences))
  assert other.titles == inter.titles and other.genres == inter.genres


# ------------------------------------------------------------------------------------------------
# Data errors through the program: one line naming the file and row, exit 2, before any compute.

GOOD_INTER = 'user_id:token\titem_id:token\ttimestamp:float\n' + ''.join(
    f'u{u}\ti{(3 * u + k) % 10}\t{100 * u + k}\n' for u in range(5) for k in range(5))
GOOD_ITEM = 'item_id:token\tmovie_title:token_seq\n' + ''.join(f'i{i}\tTitle {i}\n' for i in range(10))


def program_config(tmp_path, inter=GOOD_INTER, item=GOOD_ITEM, **data):
  write(tmp_path / 'toy.inter', inter)
  write(tmp_path / 'toy.item', item)
  c = get_config()
  c.data.update(source='recbole', path=str(tmp_path), name='toy', **data)
  c.retriever.num_candidates = 4
  return c


def _lines(text, first, replace):
  lines = text.splitlines(keepends=True)
  lines[first - 1] = replace
  return ''.join(lines)


@pytest.mark.parametrize('files, words', [
    (dict(inter=''), r'toy\.inter:1: empty header'),
    (dict(inter=GOOD_INTER.splitlines(keepends=True)[0]), r'toy\.inter: no interactions \(no data rows\)'),
    (dict(inter=GOOD_INTER.replace('timestamp:float', 'time:float')),
     r"toy\.inter:1: missing required column\(s\) \['timestamp'\]"),
    (dict(inter=_lines(GOOD_INTER, 3, 'u0\ti4\tyesterday\n')),
     r"toy\.inter:3: timestamp must be a finite number, got 'yesterday'"),
    (dict(item=''), r'toy\.item:1: empty header'),
    (dict(inter='user_id:token\titem_id:token\ttimestamp:float\n' + ''.join(
        f'u{u}\ti{u + k}\t{k}\n' for u in range(4) for k in range(2))),
     r'toy\.inter: no interactions left after filtering .*each user needs 3 events, and the 4 users have at '
     r'most 2'),
    (dict(item=_lines(GOOD_ITEM, 3, 'i1\tTitle\tone\n')),
     r"toy\.item:3: expected 2 '\\t'-separated fields, found 3 \(a tab or line break inside a value\?\)"),
    (dict(item=_lines(GOOD_ITEM, 3, 'i1\tTitle\none\n')), r"toy\.item:4: expected 2 '\\t'-separated fields, found 1"),
    (dict(item=_lines(GOOD_ITEM, 4, 'i1\tAnother title\n')),
     r"toy\.item:4: item 'i1' has a second row, different from line 3; expected one row per item"),
    (dict(item=''.join(GOOD_ITEM.splitlines(keepends=True)[:8])),
     r"toy\.item: no row for 3 of the 10 items of .*toy\.inter \(e\.g\. \['i7', 'i8', 'i9'\]\); expected at "
     r'most 5\.0% missing \(config\.data\.max_missing_item_fraction\)'),
    (dict(num_candidates=11), r'config\.retriever\.num_candidates=11: expected at most the 10 items of the '
                              r'catalog \(.*toy\.inter, after filtering\)'),
    (dict(num_candidates=7), r"config\.retriever\.num_candidates=7: expected at most 6: user 'u0' of "
                             r'.*toy\.inter has watched 4 of the 10 items'),
])
def test_data_errors_are_one_line_before_compute(tmp_path, files, words):
  from palr_jax import main as palr_main
  from palr_jax import validate
  k = files.pop('num_candidates', 4)
  c = program_config(tmp_path, **files)
  c.retriever.num_candidates = k
  with pytest.raises(validate.ConfigError, match=words) as e:
    palr_main.plan(c, tmp_path / 'w', only=('retriever',))
  assert len(str(e.value).splitlines()) == 1


def test_data_errors_exit_2_with_one_line(tmp_path):
  """Through the program: the error line names the file and row; exit 2; no stage ran."""
  import subprocess
  import sys
  program_config(tmp_path, inter=_lines(GOOD_INTER, 3, 'u0\ti4\tyesterday\n'))
  out = subprocess.run(
      [sys.executable, '-m', 'palr_jax.main', '--config=configs/ml100k.py:quick', f'--workdir={tmp_path / "w"}',
       '--stages=retriever', '--config.data.source=recbole', f'--config.data.path={tmp_path}',
       '--config.data.name=toy', '--config.retriever.num_candidates=4'],
      capture_output=True, text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  lines = [line for line in out.stderr.splitlines() if line.startswith('palr_jax.main: ')]
  assert out.returncode == 2 and len(lines) == 1 and 'Traceback' not in out.stderr, out.stderr[-3000:]
  assert f"{tmp_path / 'toy.inter'}:3: timestamp must be a finite number, got 'yesterday'" in lines[0]
  assert not (tmp_path / 'w' / 'candidates').exists()


def test_item_file_gaps_and_repeats_are_counted(tmp_path, caplog):
  """Under the threshold, missing item rows, repeated identical item rows and users dropped for too few
  events are counted on the terminal (warnings); the first row of a repeated id is the one kept."""
  item = GOOD_ITEM.splitlines(keepends=True)
  item = ''.join(item[:10] + [item[2]])           # i9 has no row (1 of 10), i1's row twice
  inter = GOOD_INTER + 'u9\ti1\t5\nu9\ti2\t6\n'  # u9: 2 events
  c = program_config(tmp_path, inter=inter, item=item, max_missing_item_fraction=0.1)
  with caplog.at_level(logging.WARNING):
    loaded = I.load(c.data)
  assert 'toy.item: 1 repeated item rows' in caplog.text
  assert '1 of 10 items of' in caplog.text and 'have no row in' in caplog.text
  assert 'dropped 1 of the 6 users of' in caplog.text and 'fewer than 3 events' in caplog.text
  assert [loaded.titles[list(loaded.item_ids).index(f'i{i}')] for i in (1, 9)] == ['Title 1', '']
  assert len(loaded.user_ids) == 5

"""User profiles: stats text, LLM request, batched LLM generation, resumable cache, no-leakage rule."""
import json

from flax import nnx
import pytest

from palr_jax import runner
from palr_jax.data import interactions, prompts
from palr_jax.data import profile_text
from palr_jax.model import decode, llama
from palr_jax.stages import context
from palr_jax.stages import profiles as stage
from prompt_fixtures import tiny_config, tiny_interactions, tiny_tokenizer, write_candidates

REPEATS = [[0, 1, 2, 3, 1, 5, 6, 2, 7, 3, 8, 1, 3], [2, 5, 0, 6, 7, 9, 10, 2, 11], [4, 6, 7, 8, 3, 9],
           [1, 0, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]]


@pytest.fixture(scope='module')
def tok():
  return tiny_tokenizer()


def make_profiles(config, workdir, inter, split, model=None, tok=None):
  """The profiles stage on in-memory data (and a given model): writes W/profiles.jsonl, returns its texts."""
  ctx = context.Context(config, workdir)
  ctx.inter, ctx.split, ctx.local_mesh = inter, split, None   # one device, no mesh
  if model is not None:
    ctx.tokenizer = tok
    ctx.base_model = lambda mesh: model
  runner.Runner(workdir).run(stage.declare(config), ctx)
  return profile_text.read_profiles(workdir / 'profiles.jsonl', inter)


def test_stats_profile_for_fixture_user():
  inter = tiny_interactions()
  split = interactions.leave_one_out(inter)
  config = tiny_config()
  # User 3: train = items 1 0 2 3 5 6 7 8 9 10 11 12, first training target at position 12 - 3 = 9.
  items = profile_text.profile_items(split, 3, config.prompts.max_examples_per_user)
  assert items.tolist() == [1, 0, 2, 3, 5, 6, 7, 8, 9]
  assert profile_text.stats_profile(inter, items, config.profiles) == (
      'Favourite genres: Comedy 44%, Drama 44%, Crime 33%, Action 22%, Animation 11%.')
  titled = tiny_interactions(titles=['Love Story', 'Love Actually', 'Story of Love', 'The Night', 'Night Moves']
                             + tiny_interactions().titles[5:])
  config.profiles.top_genres = 1
  assert profile_text.stats_profile(titled, [0, 1, 2, 3, 4], config.profiles) == (
      'Favourite genres: Comedy 60%. Frequent title words: love, story.')   # 'night' is a stopword
  empty = tiny_interactions()
  empty.genres[:] = [()] * len(empty.genres)
  assert profile_text.stats_profile(empty, [0, 1], config.profiles) == ''


def test_llm_request_renders_template():
  inter = tiny_interactions()
  split = interactions.leave_one_out(inter)
  config = tiny_config()
  config.profiles.max_history = 4
  items = profile_text.profile_items(split, 3, config.prompts.max_examples_per_user)
  assert profile_text.llm_request(inter, items, 3, config.profiles) == (
      'A user watched these movies, oldest first:\n- Fargo\n- Babe\n- Clueless\n- Rob Roy\n'
      'Genres they watched most: Comedy 44%, Drama 44%, Crime 33%, Action 22%, Animation 11%.\n'
      'About the user: age 33, gender F, occupation artist.\n'
      "In two sentences, describe this user's taste in movies: favourite genres, themes and eras. "
      'Do not list titles.')
  config.profiles.user_features = ('zip_code', 'income')      # unknown names are skipped
  assert 'About the user: zip_code 15213.\n' in profile_text.llm_request(inter, items, 3, config.profiles)
  config.profiles.template = 'Describe {user}'
  with pytest.raises(ValueError, match='config.profiles.template'):
    profile_text.check_template(config.profiles)


def test_clean_profile():
  assert profile_text.clean_profile('Likes **Drama**.\n They are') == 'Likes Drama.'
  assert profile_text.clean_profile('Likes drama. Also comedy!') == 'Likes drama. Also comedy!'
  assert profile_text.clean_profile('no sentence end') == 'no sentence end'


def test_profile_precedes_every_training_target_and_holds_no_heldout_item(tok, tmp_path):
  inter = tiny_interactions(sequences=REPEATS)
  split = interactions.leave_one_out(inter)
  config = tiny_config()
  config.prompts.max_examples_per_user = 5
  texts = make_profiles(config, tmp_path, inter, split)
  assert texts == profile_text.read_profiles(tmp_path / 'profiles.jsonl', inter)
  write_candidates(tmp_path / 'candidates', inter, split, count=6)
  builder = prompts.PromptBuilder(config, inter, tok)
  train = prompts.build_examples(builder, split, 'train', texts,
                                 prompts.read_candidates(tmp_path / 'candidates/train.jsonl', split, 'train'))
  for u in range(len(REPEATS)):
    heldout = {int(split.valid[u]), int(split.test[u])}
    source = profile_text.profile_items(split, u, 5)
    start = prompts.training_positions(len(split.train[u]), 5).start
    assert all(e.position >= start for e in train if e.user == u)
    # The source is train[u][:start] minus the held-out items: before every training target.
    assert source.tolist() == [int(i) for i in split.train[u][:start] if int(i) not in heldout]
    assert not heldout & set(source.tolist())
    # And it is the profile the prompts carry (stats of exactly those items).
    expected = profile_text.stats_profile(inter, source, config.profiles)
    assert texts[u] == expected and expected
    assert all(f'Profile: {expected}\n' in e.prompt for e in train if e.user == u)
  assert {1, 3} <= set(int(i) for i in split.train[0][:6])     # repeats of user 0's held-out items before s_0
  assert profile_text.profile_items(split, 0, 5).tolist() == [0, 2, 5]


def _model(tok):
  config = llama.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=1024,
                             eos_token_id=tok.eos_token_id)
  return llama.Llama(config, rngs=nnx.Rngs(1))


def _llm_config():
  config = tiny_config()
  config.profiles.kind = 'llm'
  config.profiles.batch_size = 3
  config.profiles.max_new_tokens = 6
  config.batching.length_buckets = (64, 128, 256, 512)   # profile requests run longer than examples
  return config


def test_llm_profiles_batched_equal_one_by_one(tok, tmp_path):
  inter = tiny_interactions()
  split = interactions.leave_one_out(inter)
  config = _llm_config()
  model = _model(tok)
  texts = make_profiles(config, tmp_path, inter, split, model, tok)
  rows = [json.loads(line) for line in (tmp_path / 'profiles.jsonl').read_text().splitlines()]
  assert [r['user_index'] for r in rows] == [0, 1, 2, 3] and [r['user'] for r in rows] == ['u0', 'u1', 'u2', 'u3']
  assert not (tmp_path / stage.PARTS).exists()
  for u, row in enumerate(rows):
    items = profile_text.profile_items(split, u, config.prompts.max_examples_per_user)
    assert row['items'] == len(items)
    request = profile_text.llm_request(inter, items, u, config.profiles)
    ids = tok(tok.apply_chat_template([{'role': 'user', 'content': request}], tokenize=False,
                                      add_generation_prompt=True), add_special_tokens=False)['input_ids']
    [alone] = decode.generate(model, [ids], max_new_tokens=6, eos_ids=[tok.eos_token_id],
                              pad_id=tok.pad_token_id, buckets=config.batching.length_buckets)
    assert len(alone) <= 6
    assert texts[u] == profile_text.clean_profile(tok.decode(alone, skip_special_tokens=True))
  assert any(texts)


def test_llm_profiles_resume_after_kill(tok, tmp_path, monkeypatch):
  inter = tiny_interactions()
  split = interactions.leave_one_out(inter)
  config = _llm_config()
  model = _model(tok)
  full = make_profiles(config, tmp_path / 'full', inter, split, model, tok)
  rows = (tmp_path / 'full/profiles.jsonl').read_text().splitlines()
  # A killed run: the parts of users 0 and 2 written; parts of another config lie beside them.
  fingerprint = runner.Runner(tmp_path).fingerprint(stage.declare(config), config)
  parts = tmp_path / stage.PARTS / fingerprint
  parts.mkdir(parents=True)
  (parts / '0.jsonl').write_text(rows[0] + '\n' + rows[2] + '\n')
  (tmp_path / stage.PARTS / ('0' * 16)).mkdir()
  (tmp_path / stage.PARTS / ('0' * 16) / '1.jsonl').write_text('stale: another config\n')
  seen = []
  real = decode.generate

  def counting(model, prompt_ids, **kw):
    seen.append(len(prompt_ids))
    return real(model, prompt_ids, **kw)

  monkeypatch.setattr(decode, 'generate', counting)
  resumed = make_profiles(config, tmp_path, inter, split, model, tok)
  assert resumed == full
  assert seen == [2]                       # one batch: users 1 and 3
  assert (tmp_path / 'profiles.jsonl').read_text().splitlines() == rows
  assert not (tmp_path / stage.PARTS).exists()
  # A corrupt part (a kill mid-write on a store without atomic renames) is redone, not fatal (issue 29).
  (tmp_path / 'profiles.fingerprint.json').unlink()
  parts.mkdir(parents=True)
  (parts / '0.jsonl').write_text(rows[0] + '\n{"user": \n' + rows[2] + '\n')
  assert make_profiles(config, tmp_path, inter, split, model, tok) == full
  assert (tmp_path / 'profiles.jsonl').read_text().splitlines() == rows


def test_profile_file_and_config_errors(tmp_path):
  inter = tiny_interactions()
  split = interactions.leave_one_out(inter)
  config = tiny_config()
  make_profiles(config, tmp_path, inter, split)
  rows = (tmp_path / 'profiles.jsonl').read_text().splitlines()
  (tmp_path / 'short.jsonl').write_text('\n'.join(rows[:3]) + '\n')
  with pytest.raises(ValueError, match=r"no profile for 1 users \(first: \['u3'\]\)"):
    profile_text.read_profiles(tmp_path / 'short.jsonl', inter)
  bad = json.loads(rows[1])
  bad['user'] = 'someone'
  (tmp_path / 'bad.jsonl').write_text('\n'.join([rows[0], json.dumps(bad)]) + '\n')
  with pytest.raises(ValueError, match=r'bad.jsonl:2: user_index 1 / user .someone. do not match'):
    profile_text.read_profiles(tmp_path / 'bad.jsonl', inter)
  with pytest.raises(FileNotFoundError, match='run the profiles stage first'):
    profile_text.read_profiles(tmp_path / 'none.jsonl', inter)
  config.profiles.kind = 'bio'
  with pytest.raises(ValueError, match="config.profiles.kind = 'bio'"):
    make_profiles(config, tmp_path / 'bio', inter, split)
  config.profiles.kind = 'llm'
  jobs = runner.Runner(tmp_path)
  assert jobs.fingerprint(stage.declare(config), config) != jobs.fingerprint(stage.declare(tiny_config()),
                                                                             tiny_config())

"""Defaults shared by every palr-jax config.

Every size, path and parallelism setting lives here or in a config that starts from `get_config()`;
code reads `config.x` and never keeps a default of its own. Each section belongs to one PALR stage, and
the stage fingerprints (palr_jax/stages.py) hash exactly the sections a stage depends on.
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0

  # Interactions -> chronological leave-one-out split (palr_jax/data/interactions.py).
  c.data = ml_collections.ConfigDict()
  c.data.source = 'recbole'      # recbole | ml-100k | ml-1m | amazon | tfds
  c.data.path = ''               # '' = embedded ML-100K from the recbole wheel; else a dir or file prefix
  c.data.name = 'ml-100k'        # recbole atomic file stem / amazon category / tfds dataset name
  c.data.tfds_data_dir = ''
  c.data.rating_threshold = 0.0  # keep interactions with rating >= this (0 = every rating)
  c.data.k_core = 0              # iterative k-core filter on users and items (0 = off)
  c.data.min_history = 3         # users need >= this many events (train >= 1 + valid + test)

  # Matrix-factorization retriever (palr_jax/retrieval/).
  c.retriever = ml_collections.ConfigDict()
  c.retriever.model = 'ials'     # ials | bpr
  c.retriever.factors = 64       # tuned on ML-100K valid Recall@20 (bench/RESULTS.md)
  c.retriever.reg = 30.0         # iALS ridge, also used when folding in users
  c.retriever.alpha = 10.0       # iALS confidence 1 + alpha * r
  c.retriever.iterations = 15
  c.retriever.init_scale = 0.1       # std of the normal factor init
  c.retriever.solve_chunk = 16384    # iALS: rows x max(history, factors) per jitted solve (memory bound)
  c.retriever.bpr_reg = 3e-3         # BPR: L2 weight per sampled triple (reg/alpha are iALS's)
  c.retriever.learning_rate = 0.005  # BPR (Adam)
  c.retriever.epochs = 100           # BPR
  c.retriever.batch_size = 1024      # BPR
  c.retriever.num_candidates = 20    # K candidates handed to the ranker
  c.retriever.folds = 5              # cross-fitting folds for candidates/train.jsonl
  c.retriever.max_train_positions = 20  # most recent target positions per user in candidates/train.jsonl
  c.retriever.user_batch = 1024      # users per jitted top-K call
  c.retriever.shard_items = False    # shard the item table over the mesh for top-K
  c.retriever.search = ml_collections.ConfigDict()  # grid, chosen on valid Recall@num_candidates
  c.retriever.search.factors = ()
  c.retriever.search.reg = ()
  c.retriever.search.alpha = ()

  # Evaluation (palr_jax/evaluate.py).
  c.eval = ml_collections.ConfigDict()
  c.eval.ks = (5, 10, 20, 50)
  c.eval.max_users = 0             # 0 = all users; else a seeded subset for quick runs
  c.eval.bootstrap_samples = 1000

  # LLM ranking of the retriever's candidates (palr_jax/rank.py).
  c.rank = ml_collections.ConfigDict()
  c.rank.mode = 'score'            # PALR v2 / zero-shot: score (tag logits, one forward) | generate
  c.rank.v1_mode = 'generate'      # PALR v1 (never saw tags): generate (titles) | likelihood
  c.rank.batch_size = 8            # prompts per jitted call; a multiple of the mesh's batch shards
  c.rank.buckets = (128, 256, 384, 512, 640, 768, 896, 1024, 1536, 2048)  # padded prompt lengths
  c.rank.max_items = 10            # generate: distinct items written per user (the rest: retriever order)
  c.rank.separator = '\n'          # generate: text between two written items
  c.rank.reduce = 'sum'            # likelihood: sum | mean of the title's token log-probs

  # The LLM (palr_jax/model/, palr_jax/checkpoints/).
  c.model = ml_collections.ConfigDict()
  c.model.spec = 'smollm2'         # smollm2 | hf:DIR | gguf:FILE
  c.model.cache_dir = ''           # '' = ~/.cache/palr_jax (GGUF -> HF folder conversion)
  c.model.dtype = 'float32'        # compute dtype
  c.model.param_dtype = 'float32'  # frozen base weights
  c.model.remat = 'none'           # none | full | dots
  c.model.attention = 'auto'       # auto | xla | cudnn | reference

  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 8
  c.lora.alpha = 16.0
  c.lora.dropout = 0.05
  c.lora.targets = (r'.*self_attn\.(q_proj|v_proj)',)
  c.lora.dtype = 'float32'

  # LoRA fine-tuning on the mesh (palr_jax/train.py).
  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 1000
  c.train.batch_size = 32          # global examples per optimizer step (all processes together)
  c.train.microbatches = 1         # gradient accumulation: the batch is run in this many slices
  c.train.max_loss_tokens = 64     # logits only at <= this many loss tokens per row (0 = every position)
  c.train.learning_rate = 2e-4     # peak, reached after the warmup
  c.train.warmup_steps = 50        # linear from 0
  c.train.lr_decay = 'cosine'      # cosine | linear | constant, from the peak to the end of training
  c.train.final_lr_fraction = 0.1  # the decay ends at learning_rate * this
  c.train.adam_b1 = 0.9
  c.train.adam_b2 = 0.999
  c.train.adam_eps = 1e-8
  c.train.weight_decay = 0.0       # AdamW, on matrices only
  c.train.grad_clip_norm = 1.0     # global norm; 0 = off
  c.train.log_every = 10           # steps between TensorBoard points
  c.train.valid_batches = 0        # validation loss over the first this many global batches (0 = all)
  c.train.eval_every = 200         # validation loss every this many steps and at the end (0 = only at the end)
  c.train.checkpoint_every = 200   # async save every this many steps, and at the end
  c.train.keep_latest = 2          # checkpoints kept: the last keep_latest ...
  c.train.keep_best = 1            # ... and the keep_best with the lowest validation loss
  c.train.async_checkpoints = True
  c.train.peak_tflops_per_device = 0.0  # dense peak for the MFU estimate (0 = MFU not reported)

  # Device mesh and logical-axis rules (palr_jax/sharding.py).
  c.mesh = ml_collections.ConfigDict()
  c.mesh.dcn_data = 1              # outer data axis across slices / hosts
  c.mesh.data = 1
  c.mesh.fsdp = -1                 # -1 takes the remaining devices
  c.mesh.tensor = 1
  c.mesh.rules = (
      ('batch', ('dcn_data', 'data', 'fsdp')),
      ('vocab', 'tensor'),
      ('embed', 'fsdp'),
      ('heads', 'tensor'),
      ('kv_heads', 'tensor'),
      ('head_dim', None),
      ('mlp', 'tensor'),
      ('lora_rank', None),
      ('length', None),
  )

  # User profiles (palr_jax/profiles.py). One profile per user, written from the part of train[u] that
  # precedes every training target (see the module docstring for the no-leakage rule).
  c.profiles = ml_collections.ConfigDict()
  c.profiles.kind = 'llm'          # llm (the model writes it) | stats (genre/keyword counts, fast)
  c.profiles.max_history = 10      # most recent titles of the profile's source shown to the LLM
  c.profiles.top_genres = 5        # genre shares over the whole source (LLM prompt and stats profile)
  c.profiles.top_keywords = 3      # stats profile: frequent title words
  c.profiles.user_features = ('age', 'gender', 'occupation')  # attributes shown when the data has them
  c.profiles.system = ''           # system message; '' = the chat template's default
  c.profiles.template = (
      'A user watched these movies, oldest first:\n{history}\nGenres they watched most: {genres}.\n{user}'
      'In two sentences, describe this user\'s taste in movies: favourite genres, themes and eras. '
      'Do not list titles.')
  c.profiles.history_line = '- {title}'
  c.profiles.user_line = 'About the user: {features}.\n'
  c.profiles.max_new_tokens = 64
  c.profiles.batch_size = 16       # users per generate call (prompt lengths bucketed by generate.py)

  # PALR instruction examples (palr_jax/data/prompts.py). Templates are str.format strings.
  c.prompts = ml_collections.ConfigDict()
  c.prompts.tasks = ('recommend', 'recommend_retrieval')
  c.prompts.max_history = 20       # most recent history titles in a prompt
  c.prompts.max_examples_per_user = 10  # training targets per user and task: the last N of train[u]
  c.prompts.tags = tuple('ABCDEFGHIJKLMNOPQRSTUVWXYZ')  # single-token tags, >= retriever.num_candidates
  c.prompts.candidate_order = 'shuffle'  # shuffle | retriever
  c.prompts.missed_target = 'insert'     # training target not retrieved: insert (paper) | skip the example
  # Copies of each training example per task (train split only; valid keeps one): weights the task mix.
  c.prompts.task_repeats = ml_collections.ConfigDict({'recommend': 1, 'recommend_retrieval': 1})
  c.prompts.use_profile = True
  c.prompts.max_title_tokens = 24  # longer titles are cut
  c.prompts.max_length = 1024      # tokens per example (and per packed row); oldest history dropped first
  c.prompts.system = ''            # system message; '' = the chat template's default
  c.prompts.history_line = '- {title}'
  c.prompts.candidate_line = '{tag}. {title}'
  c.prompts.profile_block = 'Profile: {profile}\n'
  c.prompts.recommend = (
      'A user watched these movies, oldest first:\n{history}\n{profile}'
      'Recommend the movie the user will watch next. Answer with its title.')
  c.prompts.recommend_response = '{title}'
  c.prompts.recommend_retrieval = (
      'A user watched these movies, oldest first:\n{history}\n{profile}'
      'Candidates:\n{candidates}\n'
      'Which candidate will the user watch next? Answer with its letter and title.')
  c.prompts.recommend_retrieval_response = '{tag}. {title}'
  # Batching (palr_jax/data/pipeline.py); not part of the examples' fingerprint.
  c.prompts.batches = ml_collections.ConfigDict()
  c.prompts.batches.pack = True    # pack examples into rows of max_length; else pad to a length bucket
  c.prompts.batches.pack_window = 256  # packing: first-fit decreasing over this many examples
  c.prompts.batches.length_buckets = (256, 512, 1024)  # padding mode: global batch padded to one of these
  c.prompts.batches.shuffle_buffer = 0  # 0 = the whole split
  c.prompts.batches.prefetch = 2

  return c

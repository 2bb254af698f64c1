"""Every default of palr-jax, as one ConfigDict; experiment files in `configs/` start from `get_config()`.

Code reads `config.x` and never keeps a default of its own. Each section belongs to one PALR stage, and a
stage's fingerprint lists the sections (or keys) it hashes (`palr_jax/stages/*.py`), so changing a value
reruns exactly the stages that read it.
"""
import ml_collections

# Meshes of the pods the Llama-2-7B configs were sized for: name -> (dcn_data, data, fsdp, tensor).
POD_MESHES = {
    'v4-32': (1, 2, 8, 1),     # 16 chips, 4 hosts, 32 GiB HBM each
    'v5e-16': (1, 1, 16, 1),   # 16 chips, 4 hosts, 16 GiB HBM each
    '8xH100': (1, 8, 1, 1),    # one node, 80 GiB each
}


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
  c.data.repeats = 'keep'        # keep | drop_targets: repeat consumptions as targets (data/interactions.py)
  c.data.max_missing_item_fraction = 0.05  # catalog items without an item-file row (titled "item <id>")
                                           # above this fraction: refused, as a wrong or partial item file

  # Matrix-factorization retriever (palr_jax/retrieval/, stage palr_jax/stages/retriever.py).
  c.retriever = ml_collections.ConfigDict()
  c.retriever.model = 'ials'     # ials | bpr
  c.retriever.factors = 64       # tuned on ML-100K valid Recall@20 (bench/RESULTS.md)
  c.retriever.reg = 30.0         # iALS ridge, also used when folding in users
  c.retriever.alpha = 10.0       # iALS confidence 1 + alpha * r
  c.retriever.iterations = 15
  c.retriever.init_scale = 0.1       # std of the normal factor init
  c.retriever.solve_chunk = 16384    # iALS: rows x max(history, factors) per jitted solve (memory bound)
  # iALS half-step solves: 'cholesky' (exact; ML-100K's numbers) or 'cg' (cg_steps conjugate-gradient
  # steps per row, warm-started; no F x F matrix per row: the choice at catalog scale, bench/RESULTS.md).
  c.retriever.solver = 'cholesky'
  c.retriever.cg_steps = 3
  c.retriever.bpr_reg = 3e-3         # BPR: L2 weight per sampled triple (reg/alpha are iALS's)
  c.retriever.learning_rate = 0.005  # BPR (Adam)
  c.retriever.epochs = 100           # BPR
  c.retriever.batch_size = 1024      # BPR
  c.retriever.num_candidates = 20    # K candidates handed to the ranker
  # Sequence-aware scoring (palr_jax/retrieval/transitions.py): (1 - w) z(MF) + w z(transitions), where a
  # user's transition score of item j sums, over their last `transition_items` events (weights decay**k),
  # how often other users consumed j within `transition_window` events after it. w = 0: MF alone.
  c.retriever.transition_weight = 0.3
  c.retriever.transition_items = 3
  c.retriever.transition_window = 1
  c.retriever.transition_decay = 1.0
  # Successors kept per item in the sparse transition table (retrieval/transitions.py): ML-100K's longest
  # row holds 570 at window 5 (the largest of configs/ml100k.py's search), so 1024 keeps its scores exact;
  # the table holds at most min(items * top_m, events * window) entries.
  c.retriever.transition_top_m = 1024
  c.retriever.folds = 5              # cross-fitting folds for candidates/train.jsonl
  # Most recent target positions per user in candidates/train.jsonl. Each train row is one full-catalog
  # top-K (users x positions x items scores), the stage's largest cost at catalog scale: there, fewer
  # positions (with solver = 'cg') is what keeps the stage in minutes (bench/RESULTS.md, issue 28).
  c.retriever.max_train_positions = 20
  c.retriever.user_batch = 1024      # users per jitted top-K call
  c.retriever.score_chunk = 1 << 25  # top-K: users x items per jitted call at most (memory bound at scale)
  c.retriever.shard_items = False    # shard the item factors over the mesh for top-K (one process only)
  c.retriever.search = ml_collections.ConfigDict()  # grid, chosen on valid Recall@num_candidates
  c.retriever.search.factors = ()
  c.retriever.search.reg = ()
  c.retriever.search.alpha = ()
  c.retriever.search.transition_weight = ()
  c.retriever.search.transition_items = ()
  c.retriever.search.transition_window = ()
  c.retriever.search.transition_decay = ()

  # Evaluation and the report (palr_jax/metrics.py, stage palr_jax/stages/report.py).
  c.eval = ml_collections.ConfigDict()
  c.eval.ks = (5, 10, 20, 50)
  c.eval.max_users = 0             # 0 = all users; else a seeded subset for quick runs
  c.eval.bootstrap_samples = 1000
  # Rows of the report, in order: 'retriever' or a key of `variants`.
  c.eval.methods = ('retriever', 'zero_shot', 'palr_v1', 'palr_v2')
  # Each LLM method also fused with the retriever: z(retriever score) + b z(LLM score) over the candidates,
  # b the one of these with the best `fusion_metric` on valid (never on test); () = no fused rows.
  c.eval.fusion_weights = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
  c.eval.fusion_metric = 'NDCG@10'

  # The experiment: LLM methods that rerank the retriever's candidates. `tasks` are the PALR tasks a
  # variant is LoRA-tuned on (() = the base model, untuned); it ranks with the prompt of `rank_task` by
  # `rank_mode`: score (one-token tag logits, one forward; recommend_retrieval only), generate (constrained
  # decoding of the candidates, the paper's way), likelihood (each candidate's answer log-probability) or
  # residual (the tag scores through a learned residual head on the retriever's standardized score:
  # palr_jax/score_head.py; recommend_retrieval, tag loss and padded batches only).
  # `task_repeats` writes each training example of a task that many times (weights the task mix).
  c.variants = ml_collections.ConfigDict()
  c.variants.zero_shot = _variant((), 'recommend_retrieval', 'score')
  c.variants.palr_v1 = _variant(('recommend',), 'recommend', 'generate')        # the paper's v1
  c.variants.palr_v2 = _variant(('recommend', 'recommend_retrieval'), 'recommend_retrieval', 'score')  # v2
  # `retrieval_loss`: a Recommend_Retrieval answer is learned from its tag alone, a softmax over the
  # candidates' tags ('tag', LlamaRec's verbalizer), or from every answer token ('tokens', an LM loss).

  # LLM ranking of the retriever's candidates (palr_jax/model/rerank.py, stage palr_jax/stages/rank.py).
  c.rank = ml_collections.ConfigDict()
  c.rank.batch_size = 8            # prompts per jitted call; a multiple of the mesh's batch shards
  c.rank.max_items = 10            # generate: distinct items written per user (the rest: retriever order)
  c.rank.separator = '\n'          # generate: text between two written items
  c.rank.reduce = 'sum'            # likelihood: sum | mean of the answer's token log-probs
  c.rank.orders = 1                # score: tag log-probs averaged over this many seeded shuffles of the
                                   # candidates (order 0 is the one trained on; needs candidate_order shuffle)

  # What the export stage writes (palr_jax/stages/export.py): the variant, and the formats.
  c.export = ml_collections.ConfigDict()
  c.export.variant = 'palr_v2'
  c.export.formats = ('merged', 'peft')

  # The LLM (palr_jax/model/, palr_jax/hub/).
  c.model = ml_collections.ConfigDict()
  c.model.spec = 'smollm2'         # smollm2 | hf:DIR | gguf:FILE
  c.model.cache_dir = ''           # '' = ~/.cache/palr_jax (GGUF -> HF folder conversion)
  # Compute dtype and frozen base weights: float32 | bfloat16 | float16 | auto. 'auto' (palr_jax/precision.py):
  # bfloat16 on TPU / GPU and on CPUs with native bf16 (avx512_bf16, AMX, ARM bf16), float32 on other CPUs,
  # where emulated bf16 is slower than fp32; resolved when the run starts, so stages see the concrete dtype.
  c.model.dtype = 'auto'
  c.model.param_dtype = 'auto'
  c.model.dtype_chosen = ''        # written by the run (precision.resolve): the dtypes and why; in config.json
  c.model.remat = 'none'           # none | full | dots
  c.model.attention = 'auto'       # auto | xla | blocked | cudnn | reference (auto: cudnn on GPU, blocked on CPU)
  c.model.scan_layers = True       # forward without a cache (training, scoring) as a scan over the layers

  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 8
  c.lora.alpha = 16.0
  c.lora.dropout = 0.05
  c.lora.targets = (r'.*self_attn\.(q_proj|v_proj)',)
  c.lora.dtype = 'float32'

  # LoRA fine-tuning on the mesh (palr_jax/train/, stage palr_jax/stages/finetune.py).
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
  c.train.keep_best = 1            # ... and the keep_best by best_metric
  # What the kept-best checkpoints and early stopping follow: 'valid_loss' or 'valid_ndcg10' (NDCG@10 of
  # the candidates of rank_valid_users seeded valid users, ranked by the tag scores at each evaluation;
  # variants ranked by tag scores only, the others fall back to the loss). Valid only, never test.
  c.train.best_metric = 'valid_loss'
  c.train.rank_valid_users = 128   # valid users ranked at each evaluation (0 = all)
  c.train.early_stop_patience = 0  # stop after this many evaluations without improving (0 = off)
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
      # The item projector (palr_jax/model/item_tokens.py): factor table rows and width replicated (small),
      # its hidden layer split like an MLP's.
      ('item_vocab', None),
      ('item_factor', None),
      ('item_hidden', 'tensor'),
  )

  # User profiles (palr_jax/data/profile_text.py, stage palr_jax/stages/profiles.py). One profile per user,
  # written from the part of train[u] that precedes every training target (see data/profile_text.py).
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
  c.profiles.batch_size = 16       # users per generate call

  # PALR instruction examples (palr_jax/data/prompts.py). Templates are str.format strings. Which tasks
  # a model trains on is the variant's (`variants`).
  c.prompts = ml_collections.ConfigDict()
  c.prompts.max_history = 20       # most recent history titles in a prompt
  c.prompts.max_examples_per_user = 10  # training targets per user and task: the last N of train[u]
  # Training targets: 'last' (the last max_examples_per_user positions) or 'all' (every prefix; with
  # Recommend_Retrieval only those candidates/train.jsonl covers: see retriever.max_train_positions).
  # max_examples_per_user still marks where the profile's source ends (data/profile_text.py).
  c.prompts.positions = 'last'
  # Order of the training examples in their TFRecord: 'users' (user by user) or 'shuffled' (users in a
  # seeded order, so that a bounded batching.shuffle_buffer still mixes many users).
  c.prompts.train_order = 'users'
  c.prompts.tags = tuple('ABCDEFGHIJKLMNOPQRSTUVWXYZ')  # single-token tags, >= retriever.num_candidates
  c.prompts.candidate_order = 'shuffle'  # shuffle | retriever
  c.prompts.missed_target = 'insert'     # training target not retrieved: insert (paper) | skip the example
  c.prompts.use_profile = True
  c.prompts.max_title_tokens = 24  # longer titles are cut
  c.prompts.max_length = 1024      # tokens per example (and per packed row); oldest history dropped first
  # Collaborative item tokens (variants.<v>.item_tokens): the special token written after each shown title,
  # whose position carries the item's soft token; '' = the tokenizer's highest unused special token, else
  # unk or pad (data/prompts.py, item_placeholder).
  c.prompts.item_token = ''
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

  # How token sequences become fixed-shape batches (palr_jax/batching.py, data/pipeline.py): one length
  # policy for training, ranking and profile generation, so each shape compiles once.
  c.batching = ml_collections.ConfigDict()
  c.batching.length_buckets = (128, 256, 384, 512, 640, 768, 896, 1024, 1536, 2048)  # padded lengths
  c.batching.pack = True           # training: pack examples into rows of max_length; else pad to a bucket
  c.batching.group_by_length = True  # padded training batches: examples of one length bucket per batch
  c.batching.pack_window = 256     # packing: first-fit decreasing over this many examples
  c.batching.shuffle_buffer = 0    # training: 0 = the whole split
  c.batching.prefetch = 0          # batches prefetched by tf.data (0 = none: a step takes far longer than a
                                   # batch, and a prefetching iterator's teardown could stall for a minute)

  return c


def _variant(tasks, rank_task, rank_mode, task_repeats=None, retrieval_loss='tag'):
  return ml_collections.ConfigDict({
      'tasks': tuple(tasks), 'rank_task': rank_task, 'rank_mode': rank_mode, 'retrieval_loss': retrieval_loss,
      'task_repeats': ml_collections.ConfigDict(task_repeats or {'recommend': 1, 'recommend_retrieval': 1})})


def with_pod(c: ml_collections.ConfigDict, pod: str) -> ml_collections.ConfigDict:
  """Llama-2-7B + LoRA on one of `POD_MESHES`. LoRA leaves the base frozen, so on GPUs with 80 GiB the bf16
  base (two bytes per parameter) is replicated and the batch is split over `data` (no weight all-gathers); on TPU v5e
  (16 GiB HBM) and v4 (32 GiB) the base is sharded over `fsdp`."""
  if pod not in POD_MESHES:
    raise ValueError(f'config argument: unknown pod {pod!r}; expected one of {sorted(POD_MESHES)}')
  c.mesh.dcn_data, c.mesh.data, c.mesh.fsdp, c.mesh.tensor = POD_MESHES[pod]
  c.model.spec = 'hf:/path/to/Llama-2-7b-hf'   # override: --config.model.spec=hf:DIR
  c.model.dtype = c.model.param_dtype = 'auto'  # bf16 on TPUs and on GPUs of compute capability >= 8.0
  c.model.remat = 'dots'
  c.lora.rank = 16
  c.lora.alpha = 32.0
  c.lora.targets = (r'.*self_attn\.(q_proj|k_proj|v_proj|o_proj)',)
  c.lora.dtype = 'float32'
  return c

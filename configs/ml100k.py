"""PALR on MovieLens-100K (the embedded default: atomic files from the recbole wheel), CPU-sized.

Variants (`configs/ml100k.py:ARG`):
  ''      the default run
  quick   a smoke run of every stage on a laptop CPU: stats profiles, 6 candidates, short prompts, 6 LoRA
          steps of 4 prompts per variant, a seeded subset of 16 users for the LLM evaluation
          (with palr_v2_residual, v2 with the residual score head, as in :full)
  full    all users, LLM profiles, the paper's two tasks; sized for an 8-hour budget on a 2-core CPU
bench/RESULTS.md holds the measured times and results (":quick end to end", ":full quality").

Run:
  python -m palr_jax.main --config configs/ml100k.py:quick --workdir runs/ml100k-quick
  python -m palr_jax.main --config configs/ml100k.py:full --workdir runs/ml100k-full --shared_dir runs/shared
The retriever stage alone:
  python -m palr_jax.main --config configs/ml100k.py --workdir runs/ml100k --stages retriever
"""
from palr_jax import defaults

VARIANTS = ('', 'quick', 'full')


def get_config(arg: str = ''):
  if arg not in VARIANTS:
    raise ValueError(f'configs/ml100k.py: unknown variant {arg!r}; expected one of {VARIANTS}')
  c = defaults.get_config()
  c.data.source = 'recbole'
  c.data.path = ''
  c.data.name = 'ml-100k'
  c.model.spec = 'smollm2'
  # iALS (64 factors, reg 30, alpha 10) fused with item-to-item transitions; these transition settings
  # are what the search below chose on valid Recall@20 (seed 0); the default and :full runs search again.
  c.retriever.transition_weight = 0.4
  c.retriever.transition_items = 3
  c.retriever.transition_window = 3
  c.retriever.transition_decay = 0.7
  if arg in ('', 'full'):
    # K = 26, every single-token tag: the retriever's top 26 holds the test target for more users than its
    # top 20 (bench/RESULTS.md, "Retriever quality"); `:quick` keeps 6.
    c.retriever.num_candidates = 26
    c.retriever.search.transition_weight = (0.2, 0.3, 0.4, 0.5)
    c.retriever.search.transition_items = (2, 3, 5, 8)
    c.retriever.search.transition_window = (1, 2, 3, 5)
    c.retriever.search.transition_decay = (0.5, 0.7, 1.0)
  # Precision by the machine (palr_jax/precision.py): bf16 weights and compute (fp32 accumulation, fp32
  # adapters) where the CPU has native bf16 (avx512_bf16 / AMX), fp32 where bf16 would be emulated and
  # slower (bench/RESULTS.md, "Train step", per instruction set); ranking runs in the same precision.
  c.model.dtype = c.model.param_dtype = 'auto'
  # The backward pass keeps each layer's projections and attention output and recomputes the rest ('dots'):
  # the fastest LoRA step on a CPU (bench/RESULTS.md, "Train step"). `:quick` recomputes everything ('full':
  # less memory, a little slower, and its steps are few and short) to stay under its memory target
  # (bench/RESULTS.md, ":quick end to end").
  c.model.remat = 'full' if arg == 'quick' else 'dots'
  if arg == 'quick':
    # A smoke run of every stage, sized for a 2-core CPU without native bf16 (fp32) to meet issue 26's time
    # and memory targets (bench/RESULTS.md, ":quick end to end"); the default and :full runs are the ones
    # for results. Less of everything: 2 cross-fitting folds, 6 candidates, 4 history titles, one training
    # target per user, 6 LoRA steps of 4 prompts, 16 evaluation users; two length buckets, so each variant
    # compiles few shapes (compiling is most of a short stage).
    c.retriever.num_candidates = 6
    c.retriever.folds = 2
    c.profiles.kind = 'stats'
    c.prompts.max_history = 4
    c.prompts.max_examples_per_user = 1
    c.prompts.max_title_tokens = 12
    c.prompts.max_length = 256
    c.batching.pack = False
    c.batching.length_buckets = (128, 256)
    c.train.batch_size = 4
    c.train.microbatches = 1
    c.train.num_steps = 6
    c.train.warmup_steps = 1
    c.train.learning_rate = 1e-3
    c.train.max_loss_tokens = 32
    c.train.log_every = 2
    c.train.eval_every = 0          # validation loss once, at the end (its only checkpoint)
    c.train.checkpoint_every = 6
    c.train.keep_latest = 1
    c.train.keep_best = 1
    c.train.valid_batches = 2
    c.eval.max_users = 16
    c.eval.bootstrap_samples = 200
    c.rank.batch_size = 8
    c.variants.palr_v1.rank_mode = 'likelihood'
  elif arg == 'full':
    # Sizing rule: the profiles' source (max_examples_per_user = 10) is the default run's, so both share
    # one profiles.jsonl (--shared_dir); 300 LoRA steps of 8 prompts per variant and the ranking of every
    # valid/test user by three LLM methods fill the rest of the 8-hour budget.
    c.profiles.kind = 'llm'
    c.prompts.max_examples_per_user = 10
    c.prompts.max_history = 10
    c.prompts.max_title_tokens = 16
    # Training candidates shuffled, so that position carries no label (the tag loss then has to read the
    # titles; the retriever's order comes back by score fusion), and Recommend_Retrieval trained only where
    # the retriever found the target: the examples look like the test prompts the LLM can change.
    c.prompts.candidate_order = 'shuffle'
    c.prompts.missed_target = 'skip'
    # Every prefix of every user (issue 25): the cross-fitted retriever ranks every train position
    # (max_train_positions 0 = all) and Recommend_Retrieval is trained wherever it found the target; the
    # count and tokens per example are in W/examples/<fingerprint>/meta.json and the finetune log.
    c.prompts.positions = 'all'
    c.retriever.max_train_positions = 0
    # Streamed, not held: a bounded shuffle buffer over a file written in a seeded user order.
    c.prompts.train_order = 'shuffled'
    c.batching.shuffle_buffer = 16384
    # v2 ranks with the Recommend_Retrieval prompt, but only about a fifth of its training prompts are of
    # that task: four copies make it half the mix.
    c.variants.palr_v2.task_repeats.recommend_retrieval = 4
    # Padded to length buckets, not packed: packed 1024-token rows ran at a third of the speed on XLA:CPU.
    c.batching.pack = False
    c.batching.length_buckets = (256, 384, 512, 640, 768, 1024)
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.train.batch_size = 8
    c.train.microbatches = 2
    c.train.num_steps = 300
    c.train.warmup_steps = 10
    c.train.learning_rate = 1e-3
    c.train.max_loss_tokens = 32
    c.train.log_every = 5
    c.train.eval_every = 50
    c.train.checkpoint_every = 50  # a run killed mid-training loses <= 50 steps (ranking sees latest + best)
    c.train.keep_latest = 1
    c.train.keep_best = 1
    c.train.valid_batches = 8
    # Checkpoints kept, and training stopped, by NDCG@10 of a valid sample's candidates ranked by the tag
    # scores (variants that rank so; the others by valid loss), never by test.
    c.train.best_metric = 'valid_ndcg10'
    c.train.rank_valid_users = 128
    c.train.early_stop_patience = 3
    c.eval.max_users = 0
  if arg in ('quick', 'full'):
    # v2 with the residual score head (palr_jax/score_head.py): gate * tag logit + scale * z(retriever
    # score), gate from 0, so it starts as the retriever and learns a correction; its examples are padded
    # (these runs do not pack). Copied last: every v2 setting above is its too.
    c.variants.palr_v2_residual = c.variants.palr_v2.copy_and_resolve_references()
    c.variants.palr_v2_residual.rank_mode = 'residual'
    c.eval.methods = (*c.eval.methods, 'palr_v2_residual')
  if arg in ('', 'full'):
    # v2 with collaborative item tokens (LLaRA-style hybrid prompts, palr_jax/model/item_tokens.py): a soft
    # token projected from the retriever's MF item factor after each history and candidate title; the
    # first fifth of the steps text-only, then hybrid (the curriculum). The projector's hidden width is
    # the LLM's (0).
    c.variants.palr_v2_items = c.variants.palr_v2.copy_and_resolve_references()
    c.variants.palr_v2_items.item_tokens = True
    c.variants.palr_v2_items.item_token_curriculum_steps = c.train.num_steps // 5
    c.variants.palr_v2_items.item_projector_hidden = 0
    c.eval.methods = tuple(c.eval.methods) + ('palr_v2_items',)
  return c

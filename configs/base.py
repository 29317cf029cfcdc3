"""Every default of jaxft: this file is the schema. Other configs change only what differs.

Override any key on the command line: --config.optim.lr=3e-4 (an unknown key is an error).
"""

import ml_collections


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.path = ""               # HF checkpoint directory or llama .gguf file; empty = the preset below
  c.model.preset = "quickstart"   # used when path is empty: quickstart, llama3-8b, mistral-7b, ...
  c.model.dtype = "float32"       # compute dtype of matmuls (float32 | bfloat16)
  c.model.param_dtype = "float32" # storage dtype of float parameters
  c.model.quant = "none"          # none | int8 | nf4: how the frozen base kernels are stored
  c.model.remat = "none"          # none | full | dots | offload | auto (dots on CPU, full on accelerators): activation rematerialisation per layer
  c.model.attention = "auto"      # auto | einsum | xla | cudnn (auto: cuDNN on GPUs in bf16)
  c.model.mlp_tile = 0            # > 0: MLP over slices of this many tokens, each recomputed in the
                                  # backward (long rows; docs/long_context.md); 0 = off
  c.model.router_aux_coef = -1.0  # mixture of experts: weight of the load-balancing loss; -1 = the
                                  # checkpoint's router_aux_loss_coef (the preset's; 0 for dense)
  c.model.tokenizer = ""          # tokenizer directory; empty = model.path (or the quickstart one)

  c.peft = ml_collections.ConfigDict()
  c.peft.method = "lora"          # full | lora | dora | adapter | prefix
  c.peft.targets = "q_proj,v_proj"  # (lora, dora) names, all-linear, or regexes over paths like layers/q_proj/kernel
  c.peft.init_from = ""           # a PEFT LoRA/DoRA adapter directory to start from
  c.peft.lora = ml_collections.ConfigDict()
  c.peft.lora.rank = 8
  c.peft.lora.alpha = 16.0
  c.peft.lora.dropout = 0.0
  c.peft.lora.rslora = False      # scale by alpha / sqrt(rank) instead of alpha / rank
  c.peft.adapter = ml_collections.ConfigDict()  # bottleneck adapters (peft.method=adapter)
  c.peft.adapter.size = 64        # bottleneck width
  c.peft.adapter.placement = "houlsby"  # houlsby: after attention and MLP | pfeiffer: after MLP
  c.peft.adapter.activation = "relu"    # relu | gelu | silu | tanh
  c.peft.prefix = ml_collections.ConfigDict()   # prefix tuning (peft.method=prefix)
  c.peft.prefix.length = 16       # virtual tokens (key/value prefixes) per layer
  c.peft.prefix.mlp_hidden = 0    # > 0: reparameterise the prefixes by an MLP of this width

  c.data = ml_collections.ConfigDict()
  c.data.train = ""               # JSONL / Parquet file, HF dataset name, or tfds:NAME[/CONFIG]:SPLIT
  c.data.eval = ""
  c.data.format = "auto"          # auto | chat | alpaca | completion | text | tokens | preference
  c.data.chat_template = ""       # Jinja template; empty = the tokenizer's, else jaxft's default
  c.data.max_len = 256            # tokens per row
  c.data.packing = True           # pack several examples per row (segment ids, restarted positions)
  c.data.batch_size = 8           # rows per optimizer step (global, across hosts)
  c.data.shuffle = True           # index shuffling, seeded by train.seed, reshuffled each epoch
  c.data.stream = "auto"          # auto: a glob/directory of shards is read lazily (docs/data.md),
                                  # one file read and checked whole | on | off
  c.data.workers = 1              # streamed data: background threads reading and tokenizing rows

  _optim_and_train(c)
  _mesh_eval_checkpoint(c)
  return c


def _optim_and_train(c):
  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-3
  c.optim.schedule = "cosine"     # cosine | constant (both after linear warmup)
  c.optim.warmup_steps = 10
  c.optim.min_lr_ratio = 0.1
  c.optim.weight_decay = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.clip_norm = 1.0         # 0 disables clipping
  c.optim.accum_steps = 1         # micro-batches per step; batch_size must divide by it

  c.train = ml_collections.ConfigDict()
  c.train.steps = 100
  c.train.seed = 0
  c.train.log_every = 10
  c.train.eval_every = 50         # 0 = only at step 0 and at the end
  c.train.eval_batches = 0        # 0 = the whole eval set
  c.train.eval_accuracy = False   # also greedy exact-match accuracy on data.eval at eval points
  c.train.skip_nonfinite = False  # skip (and count) updates whose loss or gradients are not finite
  c.train.progress = True         # progress bar on stderr
  c.train.loggers = "tensorboard" # trackers beside metrics.jsonl: any of tensorboard,wandb,mlflow
                                  # (comma-separated; none = metrics.jsonl only); jaxft/trackers.py
  c.train.project = "jaxft"       # wandb: the W&B project; mlflow: the experiment
  c.train.run_name = ""           # the tracker run's name; empty = the workdir's name
  c.train.mlflow_uri = ""         # MLflow tracking URI; empty = $MLFLOW_TRACKING_URI, else a local
                                  # store in WORKDIR/mlruns (no server)
  c.train.peak_tflops = 0.0       # per-device peak for the logged MFU; 0 = by device kind (jaxft/flops.py)
  c.train.compile_cache = ""      # persistent compilation cache: "" = $JAX_COMPILATION_CACHE_DIR if
                                  # set, else WORKDIR/compile_cache; none = off; or a dir
  c.train.objective = "sft"       # sft | dpo | orpo | simpo (the last three read preference pairs)
                                  # | grpo (prompt rows, rewards: the rl group below)
  c.train.base_kl = 0.0           # sft: weight of KL(base || tuned) on the tokens of rows marked
                                  # "distill": true (a PEFT method; those rows are trained toward
                                  # the base's predictions, not their own text)
  c.train.precompute_reference = False  # dpo: reference log-probs of the starting model, computed
                                  # once before training (needed by full fine-tuning; with a PEFT
                                  # method the default reference is the base, method switched off)

  c.pref = ml_collections.ConfigDict()  # preference objectives (docs/preference.md)
  c.pref.beta = 0.1               # dpo, simpo: the inverse temperature of the implicit reward
  c.pref.loss_type = "sigmoid"    # dpo: sigmoid (DPO) | ipo
  c.pref.label_smoothing = 0.0    # dpo sigmoid, simpo: chance that a label is flipped (cDPO)
  c.pref.simpo_gamma = 0.5        # simpo: target reward margin
  c.pref.orpo_lambda = 0.1        # orpo: weight of the odds-ratio term (TRL's ORPOConfig.beta)

  # GRPO (train.objective=grpo, docs/grpo.md): data.batch_size counts completions per step
  # (prompts x rl.generations, as TRL's batch size), so it must be a multiple of rl.generations.
  c.rl = ml_collections.ConfigDict()
  c.rl.generations = 8            # completions sampled per prompt (a group)
  c.rl.iterations = 1             # optimizer steps per batch of rollouts (TRL's num_iterations)
  c.rl.rewards = "match"          # reward specs: match[:MODE[:FIELD]], format:REGEX, abstain,
                                  # length:N, module:function (jaxft/rl/scoring.py)
  c.rl.reward_weights = ""        # comma-separated, one per reward; "" = 1 each
  c.rl.loss_type = "dapo"         # grpo | bnpo | dr_grpo | dapo (TRL's names; dapo is its default)
  c.rl.epsilon = 0.2              # the ratio's lower clip, 1 - epsilon
  c.rl.epsilon_high = 0.0         # the upper clip, 1 + epsilon_high; 0 = epsilon
  c.rl.beta = 0.0                 # weight of the KL to the base (method switched off); 0 = none
  c.rl.scale_rewards = "group"    # group | batch | none: what divides the advantages
  c.rl.temperature = 1.0          # sampling of the rollouts (> 0)
  c.rl.top_p = 1.0                # 1 = off
  c.rl.top_k = 0                  # 0 = off
  c.rl.max_completion_tokens = 64 # prompt + this must fit data.max_len


def _mesh_eval_checkpoint(c):
  c.mesh = ml_collections.ConfigDict()
  # data=-1 with fsdp=0 (the defaults): jaxft chooses (jaxft/mesh_choice.py): data parallelism when
  # a chip holds a replica of the step, else fsdp over the chips; train and plan say which and why.
  # Set either to fix the mesh yourself (-1 = the devices the other axes leave; fsdp=1 replicates)
  c.mesh.data = -1
  c.mesh.fsdp = 0                 # 0 = chosen by jaxft (with mesh.data=-1; else what data leaves)
  c.mesh.tensor = 1
  c.mesh.expert = 1               # splits the experts of a mixture of experts (expert parallelism)
  c.mesh.context = 1              # splits each row's tokens over chips (context parallelism;
                                  # docs/long_context.md); data.max_len must divide by 2 * context
  c.mesh.rules = ""               # logical->mesh axis overrides: "embed=fsdp,mlp=tensor,vocab=none"

  # What jaxft.evaluate measures beyond loss and exact match (jaxft/eval/metrics.py).
  c.eval = ml_collections.ConfigDict()
  # Regexes (case-insensitive, searched anywhere in the answer) that make an answer an abstention.
  c.eval.abstain_patterns = (
      r"\bi (?:don['’]?t|do not) know\b", r"\bi(?:['’]?m| am) not sure\b",
      r"\b(?:can['’]?t|cannot|unable to) (?:answer|say|tell)\b",
      r"\bno (?:such|known|reliable) (?:country|place|person|thing|answer|information|record)",
      r"\bnot (?:a real|aware of)\b")
  c.eval.style = ml_collections.ConfigDict()  # the style rubric; each rule is off at its default
  c.eval.style.max_words = 0      # at most this many words (whitespace-separated); 0 = off
  c.eval.style.min_words = 0      # at least this many words; 0 = off
  c.eval.style.must_match = ""    # a regex the answer must match (re.search; anchor with ^ $)
  c.eval.style.must_not_contain = ()  # phrases the answer must not contain (case-insensitive)
  # Which match makes an answer correct (hallucination, calibration): exact | normalized (after
  # lower-casing and dropping punctuation and articles) | contains (the normalised reference appears
  # in the answer: for chatty answers to short references).
  c.eval.correct = "normalized"
  c.eval.confident = 0.9          # answers with a mean token probability >= this count as confident
  c.eval.calibration_bins = 10    # equal-width confidence bins of the calibration error and plot
  c.eval.bootstrap = 2000         # bootstrap resamples of the rows for the 95% intervals
  c.eval.seed = 0                 # the bootstrap's seed (same seed, same intervals)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 0          # 0 = only at the end
  c.checkpoint.keep = 3

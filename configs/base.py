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
  c.model.remat = "none"          # none | full | dots: activation rematerialisation per layer
  c.model.attention = "auto"      # auto | einsum | xla | cudnn (auto: cuDNN on GPUs in bf16)
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
  c.data.format = "auto"          # auto | chat | alpaca | completion | text | tokens
  c.data.chat_template = ""       # Jinja template; empty = the tokenizer's, else jaxft's default
  c.data.max_len = 256            # tokens per row
  c.data.packing = True           # pack several examples per row (segment ids, restarted positions)
  c.data.batch_size = 8           # rows per optimizer step (global, across hosts)
  c.data.shuffle = True

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
  c.train.peak_tflops = 0.0       # per-device peak for the logged MFU; 0 = by device kind (jaxft/flops.py)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                # -1 = the devices the other axes leave
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.rules = ""               # logical->mesh axis overrides: "embed=fsdp,mlp=tensor,vocab=none"

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 0          # 0 = only at the end
  c.checkpoint.keep = 3
  return c

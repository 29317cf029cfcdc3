"""The pure train and eval steps.

`train_step(state, batch, frozen)`: gradients over `state["trainable"]` alone; the frozen base is an
argument that is read, never differentiated, never donated, never updated. Batches carry a leading
micro-batch axis [accum, rows, T]; the loss is the objective's (jaxft.objectives: by default the sum
of token losses divided by the target tokens of the whole accumulated batch), normalised by counts
of the whole accumulated batch, so accumulation equals one large batch.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxft import objectives
from jaxft.models import families, llama
from jaxft.models.config import ModelConfig
from jaxft.peft.base import Method, merge_trees

State = dict[str, Any]


# Cross-entropy chunking: tokens per outer chunk, and the target width of a vocabulary chunk (the
# chunk actually used divides the vocabulary when a divisor lies near it). On CPU, dots over ~4k
# vocabulary columns run several times faster than one over a 32k-128k vocabulary.
LOSS_CHUNK_TOKENS = 8192
LOSS_CHUNK_VOCAB = 4096
# The backward needs the softmax of every (token, vocabulary) pair. Up to this many bytes (in the
# compute dtype, over the whole micro-batch) the forward keeps exp(logits - running max) for it;
# beyond, each chunk's logits are recomputed in the backward (one more output-projection matmul:
# about a fifth of a small model's step) so that only a [tokens, vocabulary chunk] block exists.
LOSS_SAVE_BYTES = 1 << 30


def _vocab_chunk(vocab: int, target: int) -> int:
  """A chunk width that tiles `vocab`: the largest divisor in [target/2, target], else `target`
  (the vocabulary is then padded with masked columns)."""
  if vocab <= target:
    return vocab
  for c in range(target, target // 2, -1):
    if vocab % c == 0:
      return c
  return target


def _chunk_logits(h, w, c, vc, vocab, layout):
  """Float32 logits [N, vc] of vocabulary chunk c, the chunk's weights in h's dtype and its column
  ids [1, vc]. Chunks are static slices: the loops over them are unrolled (a handful of chunks;
  a scan would stack the saved chunks in zero-filled buffers and slice bf16 weights, which XLA's
  CPU backend upcasts to float32)."""
  wc = jax.lax.slice_in_dim(w, c * vc, (c + 1) * vc, axis=1 if layout == "dv" else 0)
  wc = llama.unpack_16bit(wc).astype(h.dtype)
  lg = jnp.einsum("nd,dv->nv" if layout == "dv" else "nd,vd->nv", h, wc,
                  preferred_element_type=jnp.float32)
  col = c * vc + jax.lax.broadcasted_iota(jnp.int32, (1, vc), 1)
  if vocab % vc:  # padded columns never win the softmax
    lg = jnp.where(col < vocab, lg, -jnp.inf)
  return lg, wc, col


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _cross_entropy(h, w, targets, vc: int, vocab: int, layout: str, save: bool):
  """Per-token cross-entropy [N] (float32) of h [N, D] against w ([D, V'] "dv" or [V', D] "vd",
  V' a multiple of vc), one vocabulary chunk at a time with an online log-sum-exp. `save` keeps
  the exponentials for the backward instead of recomputing the logits."""
  return _ce_fwd(h, w, targets, vc, vocab, layout, save)[0]


def _num_chunks(w, vc, layout):
  return w.shape[1 if layout == "dv" else 0] // vc


def _target_columns(h, w, targets, layout):
  """(each token's target weight column [N, D] in float32 (its values rounded to h's dtype, as the
  dots see them), the target logits [N]): a gather, not a pass over every chunk. w may be packed."""
  w_t = llama.unpack_16bit(jnp.take(w, targets, axis=1 if layout == "dv" else 0)).astype(h.dtype)
  w_t = (w_t.T if layout == "dv" else w_t).astype(jnp.float32)
  return w_t, jnp.sum(h.astype(jnp.float32) * w_t, axis=-1)


def _ce_fwd(h, w, targets, vc, vocab, layout, save):
  n = h.shape[0]
  m = jnp.full((n,), -jnp.inf, jnp.float32)
  s = jnp.zeros((n,), jnp.float32)
  saved = []
  _, tl = _target_columns(h, w, targets, layout)
  for c in range(_num_chunks(w, vc, layout)):
    lg, _, _ = _chunk_logits(h, w, c, vc, vocab, layout)
    m2 = jnp.maximum(m, jnp.max(lg, axis=-1))
    e = jnp.exp(lg - m2[:, None])
    s = s * jnp.exp(m - m2) + jnp.sum(e, axis=-1)
    m = m2
    if save:  # exp(logits - running max) in h's dtype and that max: softmax = e * exp(m - lse)
      saved.append((e.astype(h.dtype), m2))
  lse = m + jnp.log(s)
  return lse - tl, (h, w, targets, lse, tuple(saved) if save else None)


def _ce_bwd(vc, vocab, layout, save, res, g):
  # d loss / d logits = (softmax - onehot) * g, one vocabulary chunk at a time (from the saved
  # exponentials, or rebuilt); the dots take it in h's dtype with float32 accumulation.
  h, w, targets, lse, saved = res
  dh = jnp.zeros(h.shape, jnp.float32)
  dws = []
  for c in range(_num_chunks(w, vc, layout)):
    if save:
      wc = jax.lax.slice_in_dim(w, c * vc, (c + 1) * vc, axis=1 if layout == "dv" else 0)
      wc = llama.unpack_16bit(wc).astype(h.dtype)
      e, m = saved[c]
      p = e.astype(jnp.float32) * jnp.exp(m - lse)[:, None]
      col = c * vc + jax.lax.broadcasted_iota(jnp.int32, (1, vc), 1)
    else:
      lg, wc, col = _chunk_logits(h, w, c, vc, vocab, layout)
      p = jnp.exp(lg - lse[:, None])
    d = ((p - (col == targets[:, None])) * g[:, None]).astype(h.dtype)
    dh = dh + jnp.einsum("nv,dv->nd" if layout == "dv" else "nv,vd->nd", d, wc,
                         preferred_element_type=jnp.float32)
    dws.append(jnp.einsum("nd,nv->dv" if layout == "dv" else "nd,nv->vd", h, d,
                          preferred_element_type=jnp.float32).astype(w.dtype))
  return dh.astype(h.dtype), jnp.concatenate(dws, axis=1 if layout == "dv" else 0), None


_cross_entropy.defvjp(_ce_fwd, _ce_bwd)


def _ce_loop(h, w, targets, vc, vocab, layout):
  """Per-token cross-entropy, forward only, one vocabulary chunk at a time in a loop, so that only
  one chunk's logits exist at once (evaluation, and DPO's reference run inside the train step)."""
  axis = 1 if layout == "dv" else 0
  packed = llama.pack_16bit(w)
  _, tl = _target_columns(h, packed, targets, layout)

  def chunk(c, carry):
    m, s = carry
    wc = llama.unpack_16bit(jax.lax.dynamic_slice_in_dim(packed, c * vc, vc, axis=axis))
    lg = jnp.einsum("nd,dv->nv" if layout == "dv" else "nd,vd->nv", h, wc.astype(h.dtype),
                    preferred_element_type=jnp.float32)
    if vocab % vc:  # padded columns never win the softmax
      col = c * vc + jax.lax.broadcasted_iota(jnp.int32, (1, vc), 1)
      lg = jnp.where(col < vocab, lg, -jnp.inf)
    m2 = jnp.maximum(m, jnp.max(lg, axis=-1))
    return m2, s * jnp.exp(m - m2) + jnp.sum(jnp.exp(lg - m2[:, None]), axis=-1)

  n = h.shape[0]
  init = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32))
  m, s = jax.lax.fori_loop(0, _num_chunks(w, vc, layout), chunk, init)
  return m + jnp.log(s) - tl


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _cross_entropy_fixed_head(h, w, targets, vc: int, vocab: int, layout: str):
  """_cross_entropy for an output projection w that is not trained (every PEFT method): under
  differentiation its forward also forms d loss / d h, so nothing of the logits is kept or rebuilt
  for the backward. Undifferentiated (evaluation) it is the plain forward, chunk by chunk."""
  return _ce_loop(h, w, targets, vc, vocab, layout)


def _ce_fixed_fwd(h, w, targets, vc, vocab, layout):
  # d loss_i / d h_i = softmax_i @ W^T - w[target_i], the softmax term summed over vocabulary
  # chunks against the running max (rescaled as the max moves, like the normaliser itself). Nothing
  # is kept per chunk, so the chunks run in a loop rather than unrolled: XLA's CPU runtime would
  # start the unrolled chunks' dots side by side, which ran this part ~1.5x slower (bf16 weights
  # are sliced as 16-bit integers, see llama.pack_16bit).
  n = h.shape[0]
  axis = 1 if layout == "dv" else 0
  packed = llama.pack_16bit(w)  # (already so when the trainer packed the frozen tree)
  w_t, tl = _target_columns(h, packed, targets, layout)

  def chunk(c, carry):
    m, s, acc = carry
    wc = llama.unpack_16bit(jax.lax.dynamic_slice_in_dim(packed, c * vc, vc, axis=axis))
    wc = wc.astype(h.dtype)
    lg = jnp.einsum("nd,dv->nv" if layout == "dv" else "nd,vd->nv", h, wc,
                    preferred_element_type=jnp.float32)
    if vocab % vc:  # padded columns never win the softmax
      col = c * vc + jax.lax.broadcasted_iota(jnp.int32, (1, vc), 1)
      lg = jnp.where(col < vocab, lg, -jnp.inf)
    m2 = jnp.maximum(m, jnp.max(lg, axis=-1))
    # The normaliser sums the same (compute-dtype) exponentials the dot takes: one pass writes
    # them, instead of a float32 copy and then a cast.
    e = jnp.exp(lg - m2[:, None]).astype(h.dtype)
    scale = jnp.exp(m - m2)
    acc = acc * scale[:, None] + jnp.einsum(
        "nv,dv->nd" if layout == "dv" else "nv,vd->nd", e, wc, preferred_element_type=jnp.float32)
    return m2, s * scale + jnp.sum(e, axis=-1, dtype=jnp.float32), acc

  init = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32),
          jnp.zeros(h.shape, jnp.float32))
  m, s, acc = jax.lax.fori_loop(0, _num_chunks(w, vc, layout), chunk, init)
  lse = m + jnp.log(s)
  # (the empty array carries h's dtype to the backward)
  return lse - tl, (acc / s[:, None] - w_t, jnp.zeros((0,), h.dtype))


def _ce_fixed_bwd(vc, vocab, layout, res, g):
  dh, like = res
  return (g[:, None] * dh).astype(like.dtype), None, None


_cross_entropy_fixed_head.defvjp(_ce_fixed_fwd, _ce_fixed_bwd)


def token_losses(cfg: ModelConfig, params, h, targets, chunk_tokens: int = LOSS_CHUNK_TOKENS,
                 chunk_vocab: int = LOSS_CHUNK_VOCAB, head_trained: bool = True):
  """Per-token cross-entropy [B, T] in float32 of final hidden states h [B, T, D].

  The logits are made `chunk_tokens` x ~`chunk_vocab` at a time with an online log-sum-exp, and the
  output-projection dots run in cfg.dtype with float32 accumulation. The softmax the backward needs
  is kept from the forward in cfg.dtype when it fits in LOSS_SAVE_BYTES, else rebuilt chunk by
  chunk, so that beyond that size the full [B*T, vocab] logits never exist. With
  `head_trained=False` (the output projection gets no gradient) the forward forms the gradient
  for h itself and keeps only that."""
  if cfg.final_softcap:  # Gemma 2: the chunked kernels below assume plain logits
    return families.softcapped_token_losses(cfg, llama.output_kernel(cfg, params), h, targets,
                                            chunk_tokens)
  B, T, D = h.shape
  n = B * T
  dtype = jnp.dtype(cfg.dtype)
  if cfg.tie_embeddings:
    w, layout = params["embed"]["embedding"], "vd"
  else:
    w, layout = params["lm_head"]["kernel"], "dv"
  vocab = cfg.vocab_size
  vc = _vocab_chunk(vocab, chunk_vocab)
  if vocab % vc:
    pad = [(0, 0), (0, (-vocab) % vc)] if layout == "dv" else [(0, (-vocab) % vc), (0, 0)]
    w = jnp.pad(w, pad)
  hf = h.reshape(n, D).astype(dtype)
  tf = targets.reshape(n).astype(jnp.int32)
  save = n * w.size // D * dtype.itemsize <= LOSS_SAVE_BYTES
  if head_trained:
    ce = lambda a, t: _cross_entropy(a, w, t, vc, vocab, layout, save)
  else:
    ce = lambda a, t: _cross_entropy_fixed_head(a, w, t, vc, vocab, layout)
  if n <= chunk_tokens:
    return ce(hf, tf).reshape(B, T)
  pad = (-n) % chunk_tokens
  hf = jnp.pad(hf, ((0, pad), (0, 0))).reshape(-1, chunk_tokens, D)
  tf = jnp.pad(tf, (0, pad)).reshape(-1, chunk_tokens)
  losses = jax.lax.map(lambda a: ce(*a), (hf, tf))
  return losses.reshape(-1)[:n].reshape(B, T)


def _pack_kernels(layers):
  """The frozen layer tree with its 16-bit float kernels bit-cast to integers (llama.pack_16bit):
  XLA's CPU backend would otherwise upcast the whole stacked base to float32 every step to slice it
  per layer. llama.matmul casts them back inside the layer."""
  def one(v):  # quantized kernels (integer codes already) are left alone
    if isinstance(v, dict) and isinstance(v.get("kernel"), jax.Array):
      return {**v, "kernel": llama.pack_16bit(v["kernel"])}
    return v
  return {k: one(v) for k, v in layers.items()}


def pack_frozen(frozen):
  """The frozen tree as the train step reads it: the 16-bit float kernels of the layers and of the
  output projection, and the embedding (the output projection of tied models), bit-cast to 16-bit
  integers (llama.pack_16bit; quantized kernels and every other leaf unchanged). Frozen leaves are never differentiated, so the step may scan and slice
  them as integers, which XLA's CPU backend does natively (a bf16 slice there upcasts the whole
  array). `trainer.prepare` packs its frozen tree once, in place; the step packs whatever it is
  given (a no-op on a packed tree), and every reader (llama.matmul, the embedding lookup,
  llama.output_kernel, the loss head) casts back. Packing inside the step would cost a copy of
  every kernel per step (a tenth of a small bf16 model's step on CPU)."""
  out = dict(frozen)
  if "layers" in frozen:
    out["layers"] = _pack_kernels(frozen["layers"])
  for name, leaf in (("lm_head", "kernel"), ("embed", "embedding")):
    node = frozen.get(name)
    if isinstance(node, dict) and isinstance(node.get(leaf), jax.Array):
      out[name] = {**node, leaf: llama.pack_16bit(node[leaf])}
  return out


def loss_sum(cfg: ModelConfig, method: Method, trainable, frozen, batch, rng):
  """(sum of target-token losses, number of target tokens) of one micro-batch."""
  frozen = pack_frozen(frozen)  # frozen kernels are never differentiated: scan them as integers
  params = merge_trees(frozen, trainable)
  h, _ = llama.hidden_states(cfg, params, batch["inputs"], adapter=method,
                             positions=batch["positions"], segment_ids=batch["segment_ids"], rng=rng)
  head = "embed" if cfg.tie_embeddings else "lm_head"
  losses = token_losses(cfg, params, h, batch["targets"], head_trained=head in trainable)
  w = batch["weights"]
  return jnp.sum(losses * w), jnp.sum(w)


@dataclasses.dataclass(frozen=True)
class StepFns:
  train: Callable
  eval: Callable
  objective: Any = objectives.SFT()


def make_steps(cfg: ModelConfig, method: Method, tx: optax.GradientTransformation,
               schedule: optax.Schedule, skip_nonfinite: bool, dropout: bool,
               objective=None) -> StepFns:
  """Builds the (unjitted) train and eval step functions of `objective` (jaxft.objectives;
  default supervised fine-tuning).

  eval(trainable, frozen, batch) -> (terms, stats, counts) of one batch: sums that add up over
  batches; objective.loss / objective.metrics turn the totals into the logged values."""
  objective = objective or objectives.SFT()

  def train_step(state: State, batch, frozen):
    step_rng = jax.random.fold_in(state["rng"], state["step"])
    # The normalisers of the whole accumulated batch come from the data alone, so each
    # micro-batch's loss is already its share of the large batch's loss.
    counts = objective.counts(batch)

    def micro_loss(tr, mb, r):
      terms, stats = objective.sums(cfg, method, tr, frozen, mb, r if dropout else None)
      return objective.loss(terms, counts), (terms, stats)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def micro(g_acc, xs):
      mb, i = xs
      (_, aux), g = grad_fn(state["trainable"], mb, jax.random.fold_in(step_rng, i))
      return jax.tree.map(jnp.add, g_acc, g), aux

    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), state["trainable"])
    accum = batch["inputs"].shape[0]
    grads, (terms, stats) = jax.lax.scan(micro, zeros, (batch, jnp.arange(accum)))
    terms, stats = jax.tree.map(lambda x: jnp.sum(x, axis=0), (terms, stats))
    loss = objective.loss(terms, counts)
    n = counts["tokens"]
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
    new_tr = optax.apply_updates(state["trainable"], updates)
    new_tr = jax.tree.map(lambda new, old: new.astype(old.dtype), new_tr, state["trainable"])
    # Float32 gradients would promote bf16 moments (full fine-tuning with param_dtype=bfloat16):
    # keep the state's dtypes, or the second step recompiles and the moments double in size.
    opt_state = jax.tree.map(lambda new, old: new.astype(old.dtype), opt_state,
                             state["opt_state"])
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = finite | (not skip_nonfinite)  # by default a bad step is applied and the host stops
    pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(keep, a, b), new, old)
    new_state = {
        "step": state["step"] + 1,
        "trainable": pick(new_tr, state["trainable"]),
        "opt_state": pick(opt_state, state["opt_state"]),
        "rng": state["rng"],
        "skipped": state["skipped"] + (~finite).astype(jnp.int32),
    }
    metrics = {"loss": loss, "grad_norm": grad_norm, "target_tokens": n,
               "lr": schedule(state["step"]), "finite": finite,
               "skipped": new_state["skipped"] + 0,
               "objective": objective.metrics(terms, stats, counts)}
    return new_state, metrics

  def eval_step(trainable, frozen, batch):
    terms, stats = objective.sums(cfg, method, trainable, frozen, batch, None)
    return terms, stats, objective.counts(batch)

  return StepFns(train_step, eval_step, objective)

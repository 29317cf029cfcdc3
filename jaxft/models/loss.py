"""The language-model loss: chunked cross-entropy over the output projection.

`token_losses` makes the logits a block of tokens by a block of vocabulary at a time with an
online log-sum-exp, so that the full float32 [tokens, vocabulary] logits never exist; its custom
VJPs keep (or rebuild) one block of the softmax at a time, or, when the head is frozen, form the
gradient for the hidden states in the forward. `kl_sum` is the same for KL(base || tuned). Both
take hidden states; running the decoder under a fine-tuning method is jaxft/peft/loss.py's (so
that models/ never imports peft/).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxft.models import families, llama
from jaxft.models.config import ModelConfig
from jaxft.models.ops import pack_16bit, unpack_16bit


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
  wc = unpack_16bit(wc).astype(h.dtype)
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
  w_t = unpack_16bit(jnp.take(w, targets, axis=1 if layout == "dv" else 0)).astype(h.dtype)
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
      wc = unpack_16bit(wc).astype(h.dtype)
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
  packed = pack_16bit(w)
  _, tl = _target_columns(h, packed, targets, layout)

  def chunk(c, carry):
    m, s = carry
    wc = unpack_16bit(jax.lax.dynamic_slice_in_dim(packed, c * vc, vc, axis=axis))
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
  # are sliced as 16-bit integers, see pack_16bit).
  n = h.shape[0]
  axis = 1 if layout == "dv" else 0
  packed = pack_16bit(w)  # (already so when the trainer packed the frozen tree)
  w_t, tl = _target_columns(h, packed, targets, layout)

  def chunk(c, carry):
    m, s, acc = carry
    wc = unpack_16bit(jax.lax.dynamic_slice_in_dim(packed, c * vc, vc, axis=axis))
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


# Tokens per chunk of the KL term: a few [chunk, vocabulary] float32 blocks at a time.
KL_CHUNK_TOKENS = 256


def kl_sum(cfg: ModelConfig, params, h, ref_params, h_ref, weights, head_trained: bool = True,
           chunk_tokens: int = KL_CHUNK_TOKENS):
  """Sum over tokens of weights [B, T] * KL(p_ref || p) (float32), where p and p_ref are the
  next-token distributions of hidden states h and h_ref [B, T, D] through `params`' and
  `ref_params`' output projections; the gradient flows to h (and params).

  Made `chunk_tokens` rows at a time, so the full [B*T, vocab] logits never exist. The weighted
  tokens are gathered first and a chunk with none is skipped, so the cost follows the marked
  tokens, not the batch. With `head_trained=False` (the output projection is the same untrained
  one in both: every PEFT method) the forward also forms d KL / d h and keeps only that; else
  the chunk's logits are rebuilt in the backward (jax.checkpoint)."""
  B, T, D = h.shape
  n = B * T
  if head_trained or cfg.final_softcap:
    @jax.checkpoint
    def chunk(a, r, w):
      lp = jax.nn.log_softmax(llama.logits(cfg, params, a), axis=-1)
      lq = jax.lax.stop_gradient(jax.nn.log_softmax(llama.logits(cfg, ref_params, r), axis=-1))
      return jnp.sum(w * jnp.sum(jnp.exp(lq) * (lq - lp), axis=-1))
  else:
    kernel = llama.output_kernel(cfg, params)
    chunk = lambda a, r, w: jnp.sum(w * _kl_fixed_head(a.astype(cfg.dtype), r, kernel))

  hf, rf, wf = h.reshape(n, D), h_ref.reshape(n, D), weights.reshape(n).astype(jnp.float32)
  if n <= chunk_tokens:
    return chunk(hf, rf, wf)
  order = jnp.argsort(wf != 0, descending=True, stable=True)  # the weighted tokens first
  pad = (-n) % chunk_tokens
  blocks = lambda x: jnp.pad(x[order], [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(
      -1, chunk_tokens, *x.shape[1:])
  skip = lambda a, r, w: jnp.zeros((), jnp.float32)
  one = lambda a: jax.lax.cond(jnp.any(a[2] != 0), chunk, skip, *a)
  return jnp.sum(jax.lax.map(one, (blocks(hf), blocks(rf), blocks(wf))))


@jax.custom_vjp
def _kl_fixed_head(h, h_ref, kernel):
  """Per-token KL(p_ref || p) [N] (float32) of h and h_ref [N, D] through one untrained output
  kernel [D, V]; differentiated, the forward forms d KL / d h = (p - p_ref) @ kernel^T, and
  nothing of the logits is kept for the backward."""
  return _kl_fixed_fwd(h, h_ref, kernel)[0]


def _kl_fixed_fwd(h, h_ref, kernel):
  w = kernel.astype(h.dtype)
  logits = lambda x: jnp.dot(x.astype(h.dtype), w, preferred_element_type=jnp.float32)
  lp = jax.nn.log_softmax(logits(h), axis=-1)
  lq = jax.nn.log_softmax(logits(h_ref), axis=-1)
  q = jnp.exp(lq)
  dh = jnp.dot((jnp.exp(lp) - q).astype(h.dtype), w.T, preferred_element_type=jnp.float32)
  # (the empty array carries h's dtype to the backward)
  return jnp.sum(q * (lq - lp), axis=-1), (dh, jnp.zeros((0,), h.dtype))


def _kl_fixed_bwd(res, g):
  dh, like = res
  return (g[:, None] * dh).astype(like.dtype), None, None


_kl_fixed_head.defvjp(_kl_fixed_fwd, _kl_fixed_bwd)

"""Text generation from a SimVLM model: greedy, beam search and sampling with a KV cache.

The prefix (image + prompt tokens) is encoded once; the decoder then runs one token per step with
cached self-attention keys/values and cross-attention keys/values projected once. The whole loop is
one `lax.while_loop` inside jit, batched, and stops early once every row is done.

Shapes: `images` uint8 `[batch, H, W, 3]` or None, `prompt_tokens` int32 `[batch, Lp]` (the text
prefix for the encoder, no EOS, 0-padded), `forced_tokens` int32 `[batch, F]` (an optional forced
start of the decoder output, 0-padded). Outputs exclude both prompts.
"""
import functools
from typing import Any, Callable, Optional

import flax
import gin
import jax
import jax.numpy as jnp

from simvlm_jax.errors import UserError
from simvlm_jax.models import SimVLM

Array = jax.Array
EOS_ID = 1
NEG_INF = -1e9  # for log-probabilities; finite so sums stay well defined.


@flax.struct.dataclass
class Output:
  tokens: Array  # [batch, max_decode_length] (greedy/sampling) or [batch, beams, ...] (beam)
  scores: Array  # [batch] log-probability (length-normalised for beam search), or [batch, beams]


def _apply_step(model: SimVLM, params, cache, encoded, encoder_mask, token, position, step,
                decode_length):
  """One cached decoder step: `token, position: [batch]` -> logits `[batch, vocab]`, new cache."""
  logits, variables = model.apply(
      {"params": params, "cache": cache}, encoded, encoder_mask, token[:, None],
      position[:, None], decode_length=decode_length, decode_step=step, method="decode",
      mutable=["cache"])
  return logits[:, 0].astype(jnp.float32), variables["cache"]


def _prefill(model: SimVLM, params, images, prompt_tokens, decode_length):
  (encoded, mask), variables = model.apply({"params": params}, images, prompt_tokens,
                                           decode_length, method="prefill",
                                           mutable=["cache"])
  return encoded, mask, variables.get("cache", {})


def _force(logits: Array, forced_tokens: Optional[Array], step: Array) -> Array:
  """Never padding (id 0); where step < forced length, only the forced token keeps a finite logit."""
  logits = logits.at[:, 0].set(NEG_INF)
  if forced_tokens is None:
    return logits
  forced = jnp.take(jnp.pad(forced_tokens, ((0, 0), (0, 1))), step, axis=1, mode="clip")
  only = jnp.where(jnp.arange(logits.shape[-1])[None] == forced[:, None], logits, NEG_INF)
  return jnp.where((forced > 0)[:, None], only, logits)


def _strip_forced(tokens: Array, forced_tokens: Optional[Array]) -> Array:
  """Removes the forced start of each row (its length varies per row)."""
  if forced_tokens is None:
    return tokens
  n = jnp.sum(forced_tokens > 0, axis=1)
  length = tokens.shape[-1]
  idx = n[:, None] + jnp.arange(length)[None]
  idx = idx.reshape(idx.shape[:1] + (1,) * (tokens.ndim - 2) + idx.shape[1:])
  out = jnp.take_along_axis(tokens, jnp.minimum(idx, length - 1), axis=-1)
  return jnp.where(idx < length, out, 0)


def filter_logits(logits: Array, top_k: int = 0, top_p: float = 1.0) -> Array:
  """Keeps the `top_k` largest logits and the smallest set with probability mass >= `top_p`."""
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, NEG_INF, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # The threshold is the logit of the first token at which the mass reaches top_p.
    cutoff_idx = jnp.sum(cum < top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
    logits = jnp.where(logits < cutoff, NEG_INF, logits)
  return logits


def _positions(prompt_tokens: Array) -> Array:
  """Text position of decoder step 0: right after the prompt."""
  return jnp.sum(prompt_tokens > 0, axis=1).astype(jnp.int32)


def sample_or_greedy(model: SimVLM, params, images: Optional[Array], prompt_tokens: Array,
                     max_decode_length: int, forced_tokens: Optional[Array] = None,
                     rng: Optional[Array] = None, temperature: float = 1.0, top_k: int = 0,
                     top_p: float = 1.0) -> Output:
  """Greedy decoding (`rng=None`) or ancestral sampling with temperature / top-k / top-p."""
  batch = prompt_tokens.shape[0]
  encoded, mask, cache = _prefill(model, params, images, prompt_tokens, max_decode_length)
  start_pos = _positions(prompt_tokens)
  step_fn = functools.partial(_apply_step, model, params, encoded=encoded, encoder_mask=mask,
                              decode_length=max_decode_length)

  def choose(logits, step):
    logits = _force(logits, forced_tokens, step)
    logp = jax.nn.log_softmax(logits)
    if rng is None:
      token = jnp.argmax(logits, axis=-1)
    else:
      filtered = filter_logits(logits / temperature, top_k, top_p)
      token = jax.random.categorical(jax.random.fold_in(rng, step), filtered)
    return token.astype(jnp.int32), jnp.take_along_axis(logp, token[:, None], 1)[:, 0]

  def body(carry):
    step, token, cache, tokens, scores, done = carry
    logits, cache = step_fn(cache, token=token, position=start_pos + step, step=step)
    new, logp = choose(logits, step)
    new = jnp.where(done, 0, new)
    scores = scores + jnp.where(done, 0.0, logp)
    tokens = tokens.at[:, step].set(new)
    return step + 1, new, cache, tokens, scores, done | (new == EOS_ID)

  init = (jnp.int32(0), jnp.zeros(batch, jnp.int32), cache,
          jnp.zeros((batch, max_decode_length), jnp.int32), jnp.zeros(batch), jnp.zeros(batch, bool))
  # Step 0 outside the loop creates the decoder caches, so the loop carry has a fixed structure.
  carry = body(init)
  cond = lambda c: (c[0] < max_decode_length) & ~jnp.all(c[5])
  _, _, _, tokens, scores, _ = jax.lax.while_loop(cond, body, carry)
  return Output(_strip_forced(tokens, forced_tokens), scores)


def length_penalty(length: Array, alpha: float) -> Array:
  """GNMT length penalty ((5 + length) / 6) ** alpha."""
  return ((5.0 + length) / 6.0) ** alpha


def _gather_beams(x: Array, beam_idx: Array) -> Array:
  """`x: [batch, beams, ...]` reordered by `beam_idx: [batch, k]` -> `[batch, k, ...]`."""
  return jnp.take_along_axis(x, beam_idx.reshape(beam_idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _gather_cache(cache: Any, beam_idx: Array, batch_axis: int) -> Any:
  """Reorders a decoding cache's `[..., batch * beams, ...]` leaves by `beam_idx: [batch, k]`.

  `batch_axis` is 1 when the layers are scanned (each leaf has a leading layer axis).
  """
  batch, k = beam_idx.shape

  def gather(path, x):
    # The index is shared by all rows. Cross-attention keys/values are projected from the
    # encoder output, the same for every beam of a row: reordering beams leaves them as they are
    # (gathering them anyway moved ~0.5 GB a step for Base at batch 8 x 4 beams).
    if getattr(path[-1], "key", None) in ("cache_index", "cross_key", "cross_value"):
      return x
    x = jnp.moveaxis(x, batch_axis, 0)
    y = _gather_beams(x.reshape((batch, k) + x.shape[1:]), beam_idx).reshape(x.shape)
    return jnp.moveaxis(y, 0, batch_axis)
  return jax.tree_util.tree_map_with_path(gather, cache)


def _repeat_cache(cache: Any, k: int, batch_axis: int) -> Any:
  """Each row of a decoding cache's `[..., batch, ...]` leaves repeated `k` times (its beams)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x if getattr(path[-1], "key", None) == "cache_index"
      else jnp.repeat(x, k, axis=batch_axis), cache)


def beam_search(model: SimVLM, params, images: Optional[Array], prompt_tokens: Array,
                max_decode_length: int, beam_size: int = 4, alpha: float = 0.6,
                forced_tokens: Optional[Array] = None) -> Output:
  """Beam search; returns all `beam_size` finished hypotheses per row, best first.

  Score = log P(sequence) / length_penalty(length, alpha). A hypothesis is finished when it emits
  EOS or reaches `max_decode_length`. Stops early once no live beam can beat the worst finished one.
  """
  batch, k, steps = prompt_tokens.shape[0], beam_size, max_decode_length
  rep = lambda x: None if x is None else jnp.repeat(x, k, axis=0)
  # The prefix is encoded once per row, then copied to its k beams (not encoded k times).
  encoded, mask, cache = _prefill(model, params, images, prompt_tokens, steps)
  encoded, mask = rep(encoded), rep(mask)
  cache = _repeat_cache(cache, k, batch_axis=1 if model.config.scan_layers else 0)
  start_pos = _positions(rep(prompt_tokens))
  forced = rep(forced_tokens)
  step_fn = functools.partial(_apply_step, model, params, encoded=encoded, encoder_mask=mask,
                              decode_length=steps)

  def body(carry):
    step, cache, seqs, logp, fin_seqs, fin_scores = carry
    last = jnp.where(step > 0, jnp.take(seqs, jnp.maximum(step - 1, 0), axis=2), 0)
    logits, cache = step_fn(cache, token=last.reshape(-1), position=start_pos + step, step=step)
    logits = _force(logits, forced, step)
    vocab = logits.shape[-1]
    cand = logp[..., None] + jax.nn.log_softmax(logits).reshape(batch, k, vocab)
    top_logp, top_idx = jax.lax.top_k(cand.reshape(batch, k * vocab), 2 * k)
    beam_idx, token = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
    cand_seqs = _gather_beams(seqs, beam_idx).at[:, :, step].set(token)
    last_step = step == steps - 1
    ends = (token == EOS_ID) | last_step
    # Finished: merge the candidates that end here into the finished set.
    end_scores = jnp.where(ends, top_logp / length_penalty(step + 1.0, alpha), NEG_INF)
    all_scores = jnp.concatenate([fin_scores, end_scores], axis=1)
    all_seqs = jnp.concatenate([fin_seqs, cand_seqs], axis=1)
    fin_scores, keep = jax.lax.top_k(all_scores, k)
    fin_seqs = _gather_beams(all_seqs, keep)
    # Alive: the best k candidates that do not end.
    alive_logp, keep = jax.lax.top_k(jnp.where(ends, NEG_INF, top_logp), k)
    seqs = _gather_beams(cand_seqs, keep)
    cache = _gather_cache(cache, jnp.take_along_axis(beam_idx, keep, axis=1),
                          batch_axis=1 if model.config.scan_layers else 0)
    return step + 1, cache, seqs, alive_logp, fin_seqs, fin_scores

  def cond(carry):
    step, _, _, logp, _, fin_scores = carry
    # The best a live beam can still reach: its log-prob only falls, the penalty is largest at max.
    best_alive = logp[:, 0] / length_penalty(float(steps), alpha)
    can_improve = jnp.any(best_alive > fin_scores[:, -1])
    return (step < steps) & can_improve

  init_logp = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1)), (batch, 1))
  zeros = jnp.zeros((batch, k, steps), jnp.int32)
  init = (jnp.int32(0), cache, zeros, init_logp, zeros, jnp.full((batch, k), NEG_INF))
  carry = body(init)
  _, _, _, _, fin_seqs, fin_scores = jax.lax.while_loop(cond, body, carry)
  fin_seqs = jnp.where(jnp.cumsum(fin_seqs == EOS_ID, axis=-1) - (fin_seqs == EOS_ID) > 0, 0,
                       fin_seqs)  # nothing after the first EOS.
  strip = None if forced_tokens is None else forced_tokens
  return Output(_strip_forced(fin_seqs, strip), fin_scores)


@gin.configurable
def make_decode_fn(model: SimVLM, method: str = "greedy", max_decode_length: int = 32,
                   beam_size: int = 4, alpha: float = 0.6, temperature: float = 1.0,
                   top_k: int = 0, top_p: float = 1.0) -> Callable:
  """`fn(params, images, prompt_tokens, forced_tokens=None, rng=None) -> Output` for one method.

  Beam search returns its best hypothesis per row (tokens `[batch, length]`), like the others.
  """
  if method not in ("greedy", "beam", "sample"):
    raise ValueError(f"method must be 'greedy', 'beam' or 'sample', got {method!r}")

  def fn(params, images, prompt_tokens, forced_tokens=None, rng=None):
    positions = prompt_tokens.shape[1] + max_decode_length
    if positions > model.config.max_text_len:
      # Past the table every token would share its last position: refuse rather than clip.
      raise UserError(f"a prompt of {prompt_tokens.shape[1]} tokens and max_decode_length "
                      f"{max_decode_length} need {positions} text positions, the model has "
                      f"{model.config.max_text_len}: shorten the prompt or max_decode_length")
    if method == "beam":
      out = beam_search(model, params, images, prompt_tokens, max_decode_length, beam_size, alpha,
                        forced_tokens)
      return Output(out.tokens[:, 0], out.scores[:, 0])
    if method == "sample" and rng is None:
      raise ValueError("sampling needs an explicit PRNG key (rng=...)")
    return sample_or_greedy(model, params, images, prompt_tokens, max_decode_length, forced_tokens,
                            rng if method == "sample" else None, temperature, top_k, top_p)
  return fn


@functools.lru_cache(maxsize=None)
def jitted(config: Any, method: str, max_decode_length: int = 32, beam_size: int = 4,
           alpha: float = 0.6, out_sharding: Any = None) -> Callable:
  """`jit(fn)(params, images, prompt_tokens) -> Output` (`make_decode_fn`) for a model config, or
  with method "classifier" its classifier head's logits `[batch, classes]`: one compiled function
  per (config, method, lengths, output sharding) for this process, shared by `predict`, `eval`
  and the evaluators inside training, so a demo that evaluates several runs of one architecture
  compiles once per input shape."""
  model = SimVLM(config)
  if method == "classifier":
    fn = lambda p, im, pre: model.apply({"params": p}, im, pre, method="classify")  # noqa: E731
  else:
    fn = make_decode_fn(model, method=method, max_decode_length=max_decode_length,
                        beam_size=beam_size, alpha=alpha)
  return jax.jit(fn, out_shardings=out_sharding)


def text_of(vocabulary: Any, ids: Any) -> str:
  """The text of generated ids up to EOS; ids past the vocabulary (padded embedding rows) and
  padding are left out."""
  ids = list(ids)
  ids = ids[:ids.index(EOS_ID)] if EOS_ID in ids else ids
  return vocabulary.decode([i for i in ids if 0 < i < vocabulary.vocab_size])

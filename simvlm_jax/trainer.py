"""The pure train and eval steps, the optimizer, and sharded train state creation.

A batch (see `simvlm_jax/data`) holds two sub-batches with their own static shapes:
  image_text: images uint8 [B_it, H, W, 3], text_tokens int32 [B_it, L_it]
  text:       text_tokens int32 [B_t, L_t]
The objective splits every row on device from (seed, step, example index), so the batch at step s
and every random draw of step s are functions of (seed, s).
"""
import functools
import re
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import flax
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import optax

from simvlm_jax import checkpoints, objectives
from simvlm_jax.errors import UserError
from simvlm_jax.models import ModelConfig, SimVLM
from simvlm_jax.partitioning import Partitioner, box_like_params

Array = jax.Array
Metrics = Dict[str, Array]
DROPOUT_STREAM = 2 ** 31 - 1  # fold-in id of the dropout key; row ids never reach it.


@flax.struct.dataclass
class TrainState:
  step: Array
  params: Any
  opt_state: Any


@gin.configurable
def learning_rate_schedule(total_steps: int, peak_learning_rate: float = 5e-4,
                           warmup_fraction: float = 0.02, end_fraction: float = 0.0,
                           decay: str = "linear") -> optax.Schedule:
  """Linear warmup over `warmup_fraction` of the steps, then linear or cosine decay."""
  warmup = max(int(total_steps * warmup_fraction), 1)
  decay_steps = max(total_steps - warmup, 1)
  end = peak_learning_rate * end_fraction
  if decay == "linear":
    tail = optax.linear_schedule(peak_learning_rate, end, decay_steps)
  elif decay == "cosine":
    tail = optax.cosine_decay_schedule(peak_learning_rate, decay_steps, alpha=end_fraction)
  else:
    raise ValueError(f"decay must be 'linear' or 'cosine', got {decay!r}")
  return optax.join_schedules([optax.linear_schedule(0.0, peak_learning_rate, warmup), tail],
                              [warmup])


def _decay_mask(params):
  # No weight decay on norms, biases and other vectors.
  return jax.tree.map(lambda p: p.ndim > 1, params)


def with_state_dtype(tx: optax.GradientTransformation, dtype: Any) -> optax.GradientTransformation:
  """`tx` with its floating-point state stored in `dtype` (e.g. bfloat16 moments: half the
  bytes) and its update computed in float32."""
  def cast(tree, to):
    return jax.tree.map(lambda x: x.astype(to) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                        tree)

  def update(updates, state, params=None):
    updates, state = tx.update(updates, cast(state, jnp.float32), params)
    return updates, cast(state, dtype)
  return optax.GradientTransformation(lambda params: cast(tx.init(params), dtype), update)


def scale_by_name(multipliers: Mapping[str, float]) -> optax.GradientTransformation:
  """Multiplies the update of every parameter whose name (`checkpoints.parameter_name`) fully
  matches a regex of `multipliers` by its value (the first that matches; big_vision's
  `lr_mults`): placed after the optimizer, a learning-rate multiplier for those parameters,
  weight decay included.
  A pattern that matches no parameter is refused when the state is created."""
  patterns = [(re.compile(p), float(m)) for p, m in multipliers.items()]

  def factor(path) -> float:
    name = checkpoints.parameter_name(path)
    return next((m for p, m in patterns if p.fullmatch(name)), 1.0)

  def init(params):
    names = [checkpoints.parameter_name(path)
             for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    unmatched = [p.pattern for p, _ in patterns if not any(p.fullmatch(n) for n in names)]
    if unmatched:
      raise UserError(f"make_optimizer.lr_multipliers: {unmatched} match no parameter (names "
                      f"look like {names[0]!r}; a pattern must match the whole name)")
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(lambda path, u: u * factor(path), updates), state
  return optax.GradientTransformation(init, update)


def adafactor(learning_rate: optax.Schedule, weight_decay: float, decay_rate: float,
              min_dim_size_to_factor: int, multiply_by_parameter_scale: bool
              ) -> optax.GradientTransformation:
  """`optax.adafactor` (block-RMS clipping at 1.0, no momentum) with decoupled weight decay as
  AdamW's: `p -= lr * (update + weight_decay * p)`, so it follows the learning rate (t5x's
  `weight_decay_rate_lr_exponent=1`). optax's own adds `weight_decay_rate * p` after the learning
  rate: a fixed share of every weight each step, whatever the schedule (measured: 0.01 left
  weights x0.366 after 100 steps at learning rate 0)."""
  chain = [optax.scale_by_factored_rms(decay_rate=decay_rate,
                                       min_dim_size_to_factor=min_dim_size_to_factor),
           optax.clip_by_block_rms(1.0)]
  if multiply_by_parameter_scale:
    chain.append(optax.scale_by_param_block_rms())
  if weight_decay:
    chain.append(optax.add_decayed_weights(weight_decay, mask=_decay_mask))
  chain.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*chain)


@gin.configurable
def make_optimizer(schedule: optax.Schedule, name: str = "adamw", b1: float = 0.9,
                   b2: float = 0.999, weight_decay: Optional[float] = None,
                   clip_norm: Optional[float] = 1.0, eps: float = 1e-8,
                   state_dtype: Optional[str] = None, adafactor_decay_rate: float = 0.8,
                   adafactor_min_dim_to_factor: int = 32, adafactor_parameter_scale: bool = True,
                   lr_multipliers: Optional[Mapping[str, float]] = None
                   ) -> optax.GradientTransformation:
  """Global-norm gradient clipping, then AdamW (the paper's) or Adafactor (t5x's default).

  Adafactor keeps factored second moments (for a tensor whose two largest dims are both >=
  `adafactor_min_dim_to_factor`, its statistics summed over each of them: 32 lets the
  `[embed, heads, head_dim]` attention kernels factor as t5x's 2D ones do) and no first moment,
  so its state is a small fraction of the parameters where AdamW's is twice them (Base: 0.008 GB
  against 1.86 GB); with `adafactor_parameter_scale` its steps are
  relative to each parameter's RMS (it wants a learning rate near 1e-2; see
  gin/optimizers/adafactor.gin). `state_dtype="bfloat16"` stores either one's state in bfloat16.
  `weight_decay` is decoupled and scaled by the learning rate in both (each step
  `p -= lr * weight_decay * p`, besides the gradient step); None: the optimizer's usual, 0.01 for
  AdamW and none for Adafactor (t5x's). It skips norms, biases and other vectors.
  `lr_multipliers` ({regex: factor} over parameter names, e.g. {"patchify/.*": 3.0}) scales some
  parameters' learning rate (`scale_by_name`).
  """
  chain = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
  if name == "adamw":
    chain.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps,
                             weight_decay=0.01 if weight_decay is None else weight_decay,
                             mask=_decay_mask))
  elif name == "adafactor":
    chain.append(adafactor(schedule, weight_decay or 0.0, adafactor_decay_rate,
                           adafactor_min_dim_to_factor, adafactor_parameter_scale))
  else:
    raise UserError(f"make_optimizer.name must be 'adamw' or 'adafactor', got {name!r}")
  if lr_multipliers:
    chain.append(scale_by_name(lr_multipliers))
  tx = optax.chain(*chain)
  if state_dtype is not None:
    if state_dtype not in ("bfloat16", "float32"):
      raise UserError(f"make_optimizer.state_dtype must be 'bfloat16', 'float32' or None, got "
                      f"{state_dtype!r}")
    tx = with_state_dtype(tx, jnp.dtype(state_dtype))
  return tx


def applied_learning_rate(schedule: optax.Schedule, opt_state: Any) -> Array:
  """The learning rate `make_optimizer`'s update from `opt_state` applies: the schedule at the
  count of its `scale_by_learning_rate`, which a skipped non-finite step does not advance (the
  train state's step does)."""
  is_count = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
  counts = [s.count for s in jax.tree.leaves(opt_state, is_leaf=is_count) if is_count(s)]
  if len(counts) != 1:
    raise ValueError(f"expected one learning-rate schedule in the optimizer state, found "
                     f"{len(counts)}")
  return schedule(counts[0])


def dummy_batch(config: ModelConfig, it_batch: int, it_len: int, txt_batch: int, txt_len: int):
  """A zero batch with the given static shapes (for initialisation and shape inference)."""
  z = lambda *s: jnp.zeros(s, jnp.int32)
  return {"image_text": {"images": jnp.zeros((it_batch, config.image_size, config.image_size, 3),
                                             jnp.uint8),
                         "text_tokens": z(it_batch, it_len)},
          "text": {"text_tokens": z(txt_batch, txt_len)}}


def split_batch(batch: Any, seed: int, step: Array, objective: Callable,
                microbatch: Tuple[Any, int] = (0, 1)) -> Dict[str, dict]:
  """Turns each sub-batch into model inputs and targets.

  Pretraining sub-batches (`text_tokens`) are split by the objective, rows indexed image-text
  first, then text, by their index in the global batch: `batch` may be microbatch `i` of
  `microbatch = (i, count)`, whose row j is global row j * count + i of its kind (see
  `microbatches`). Finetuning sub-batches come split already (`prefix_tokens` with
  `target_tokens`, or with `class_scores` for a classifier). Images, when present, ride along.
  """
  index, count = microbatch
  out = {}
  offset = 0
  for kind in sorted(batch, key=lambda k: k != "image_text"):
    sub = batch[kind]
    if "text_tokens" in sub:
      rows = sub["text_tokens"].shape[0]
      if not rows:
        continue
      keys = objectives.row_keys(seed, step, offset + jnp.arange(rows) * count + index)
      out[kind] = objective(sub["text_tokens"], keys, with_image=(kind == "image_text"))
      offset += rows * count
    elif "target_tokens" in sub:
      out[kind] = objectives.seq2seq(sub["prefix_tokens"], sub["target_tokens"])
    else:
      out[kind] = {"prefix_tokens": sub["prefix_tokens"], "class_scores": sub["class_scores"]}
    if "images" in sub:  # absent when image-text rows are scored without their images
      out[kind]["images"] = sub["images"]
  return out


def token_losses(model: SimVLM, params, split: dict, rng: Optional[Array]) -> Tuple[Array, Array]:
  """Per-token cross-entropy and correctness `[batch, length]` for one split sub-batch."""
  logits = model.apply({"params": params}, split.get("images"), split["prefix_tokens"],
                       split["decoder_input_tokens"], split["decoder_positions"],
                       deterministic=rng is None, rngs={"dropout": rng} if rng is not None else None)
  logits = logits.astype(jnp.float32)
  targets = split["decoder_target_tokens"]
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  # "The target is the top logit" as a max and a gather, which fuse with the softmax's own
  # reductions: XLA's CPU argmax over a 32k vocabulary cost as much as the softmax did (a tie
  # with another token counts as correct).
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  correct = (target_logit >= jnp.max(logits, axis=-1)).astype(jnp.float32)
  return loss, correct


def class_losses(model: SimVLM, params, split: dict, rng: Optional[Array]) -> Tuple[Array, Array]:
  """VQA-style soft-score classification: per-row sigmoid cross-entropy summed over the classes,
  and the score of the top class (the VQA accuracy of the classifier's answer). `[batch]` each."""
  logits = model.apply({"params": params}, split.get("images"), split["prefix_tokens"],
                       deterministic=rng is None, method="classify",
                       rngs={"dropout": rng} if rng is not None else None)
  scores = split["class_scores"]
  loss = jnp.sum(optax.sigmoid_binary_cross_entropy(logits, scores), axis=-1)
  top = jnp.take_along_axis(scores, jnp.argmax(logits, -1)[:, None], axis=-1)[:, 0]
  return loss, top


def _sums(model, params, splits, rng) -> Dict[str, Array]:
  """Summed loss, correct predictions, target count and rows with a target over every sub-batch."""
  sums = {"loss_sum": 0.0, "correct_sum": 0.0, "weight_sum": 0.0, "rows_sum": 0.0}
  for i, (kind, split) in enumerate(sorted(splits.items())):
    sub_rng = None if rng is None else jax.random.fold_in(rng, i)
    if "class_scores" in split:
      loss, correct = class_losses(model, params, split, sub_rng)
      w = jnp.any(split["prefix_tokens"] > 0, axis=-1).astype(jnp.float32)  # padding rows: 0
    else:
      loss, correct = token_losses(model, params, split, sub_rng)
      w = split["loss_weights"]
    sums["loss_sum"] += jnp.sum(loss * w)
    sums["correct_sum"] += jnp.sum(correct * w)
    sums["weight_sum"] += jnp.sum(w)
    sums["rows_sum"] += jnp.sum(jnp.any(w > 0, axis=-1) if w.ndim > 1 else w > 0)
    sums[f"{kind}/loss_sum"] = jnp.sum(loss * w)
    sums[f"{kind}/weight_sum"] = jnp.sum(w)
  return sums


def microbatches(batch: Any, count: int) -> Any:
  """`[rows, ...]` leaves -> `[count, rows / count, ...]`: microbatch i holds rows i, i + count, ...

  Strided rather than contiguous: a device's rows of the batch split evenly over the microbatches,
  so no microbatch moves rows between devices.
  """
  def split(x):
    if x.shape[0] % count:
      raise UserError(f"train.num_microbatches = {count} does not divide a sub-batch of "
                      f"{x.shape[0]} rows: choose batch sizes it divides")
    return jnp.swapaxes(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def _grads_and_sums(model: SimVLM, params, batch: Any, *, seed: int, step: Array,
                    objective: Callable, dropout_rng: Array, num_microbatches: int):
  """Gradient of the mean token loss and the `_sums` of the whole batch, in `num_microbatches`
  sequential pieces whose summed losses and gradients are normalised once at the end.

  The objective's draws are keyed by global row, so without dropout the result is the one-piece
  step's up to float summation order. Dropout masks are not: piece i draws its own from
  `fold_in(dropout_rng, i)`, so with dropout the result differs from the one-piece step's, equal
  to it in expectation over the masks (each row's masks have the same distribution either way),
  and still a function of (seed, step)."""
  if num_microbatches == 1:
    splits = split_batch(batch, seed, step, objective)

    def loss_fn(p):
      sums = _sums(model, p, splits, dropout_rng)
      return sums["loss_sum"] / jnp.maximum(sums["weight_sum"], 1.0), sums
    (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, sums

  stacked = microbatches(batch, num_microbatches)

  def piece(micro, index):
    splits = split_batch(micro, seed, step, objective, microbatch=(index, num_microbatches))

    def loss_sum_fn(p):
      sums = _sums(model, p, splits, jax.random.fold_in(dropout_rng, index))
      return sums["loss_sum"], sums
    (_, sums), grads = jax.value_and_grad(loss_sum_fn, has_aux=True)(params)
    return grads, sums

  def accumulate(total, xs):
    return jax.tree.map(jnp.add, total, piece(*xs)), None

  shapes = jax.eval_shape(piece, jax.tree.map(lambda x: x[0], stacked), 0)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  (grads, sums), _ = jax.lax.scan(accumulate, zeros, (stacked, jnp.arange(num_microbatches)))
  grads = jax.tree.map(lambda g: g / jnp.maximum(sums["weight_sum"], 1.0), grads)
  return grads, sums


def train_step(state: TrainState, batch: Any, *, model: SimVLM, tx: optax.GradientTransformation,
               schedule: optax.Schedule, objective: Callable, seed: int,
               num_microbatches: int = 1) -> Tuple[TrainState, Metrics]:
  """One optimizer step. Loss = mean cross-entropy over all real target tokens of both row kinds.

  `num_microbatches` > 1 accumulates the gradient over that many sequential pieces of the batch
  (gradient accumulation: the activations of one piece at a time), the same update up to float
  summation order without dropout, and the same in expectation with it (`_grads_and_sums`).
  A step whose loss or gradient norm is not finite changes neither the parameters nor the
  optimizer state (only the step advances, so the next batch and draws follow as usual); the
  metrics `nonfinite_loss` / `nonfinite_grad` (0 or 1) say so, and the loop applies its policy.
  The schedule follows the optimizer's count of applied updates, not the step: the metric
  `learning_rate` is the rate this step applies (at a skipped step, would have applied), which
  after a skipped step is the schedule at an earlier step than `state.step`.
  """
  step_key = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)
  dropout_rng = jax.random.fold_in(step_key, DROPOUT_STREAM)
  grads, sums = _grads_and_sums(model, state.params, batch, seed=seed, step=state.step,
                                objective=objective, dropout_rng=dropout_rng,
                                num_microbatches=num_microbatches)
  loss = sums["loss_sum"] / jnp.maximum(sums["weight_sum"], 1.0)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  learning_rate = applied_learning_rate(schedule, state.opt_state)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # An elementwise select that XLA fuses into the update itself: no extra pass over the state.
  params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                   (params, opt_state), (state.params, state.opt_state))
  denom = jnp.maximum(sums["weight_sum"], 1.0)
  metrics = {"loss": loss, "accuracy": sums["correct_sum"] / denom,
             "grad_norm": grad_norm, "learning_rate": learning_rate,
             "target_tokens": sums["weight_sum"],
             "nonfinite_loss": (~jnp.isfinite(loss)).astype(jnp.int32),
             "nonfinite_grad": (~jnp.isfinite(grad_norm)).astype(jnp.int32)}
  for kind in sorted(k[:-len("/loss_sum")] for k in sums if k.endswith("/loss_sum")):
    metrics[f"{kind}/loss"] = sums[f"{kind}/loss_sum"] / jnp.maximum(sums[f"{kind}/weight_sum"], 1.)
  return TrainState(state.step + 1, params, opt_state), metrics


def eval_step(params, batch: Any, *, model: SimVLM, objective: Callable, seed: int) -> Metrics:
  """Summed teacher-forced loss/accuracy (deterministic; split drawn at a fixed step 0)."""
  splits = split_batch(batch, seed, jnp.zeros((), jnp.int32), objective)
  return _sums(model, params, splits, None)


def check_batch(config: ModelConfig, host_batch: Any) -> None:
  """See `Trainer.check_batch`. Shapes are static, so the first batch speaks for the run."""
  size = config.image_size
  for kind, sub in host_batch.items():
    if "images" in sub and tuple(sub["images"].shape[-3:-1]) != (size, size):
      height, width = sub["images"].shape[-3:-1]
      raise UserError(f"the {kind} images are {height}x{width} but the model takes {size}x{size} "
                      "(ModelConfig.image_size): give the data iterator the model's image size "
                      "(image_size = %IMAGE_SIZE)")
    if "images" in sub and sub["images"].ndim == 5 and sub["images"].shape[1] > config.max_images:
      raise UserError(f"the {kind} examples have {sub['images'].shape[1]} images each but the "
                      f"model takes at most {config.max_images} (ModelConfig.max_images; NLVR2's "
                      "finetuning file sets 2)")
    if "text_tokens" in sub:
      length, what = sub["text_tokens"].shape[-1], "rows of"
    elif "prefix_tokens" in sub:
      target = sub["target_tokens"].shape[-1] if "target_tokens" in sub else 1
      length, what = sub["prefix_tokens"].shape[-1] + target, "prefix + target tokens of"
    else:
      continue
    if length > config.max_text_len:
      raise UserError(f"the {kind} batches have {what} {length} text tokens but the model has "
                      f"{config.max_text_len} text positions (ModelConfig.max_text_len): shorten "
                      "the data's lengths or raise max_text_len")


def init_params(model: SimVLM, config: ModelConfig, rng: Array) -> Any:
  """Freshly initialised (logically boxed) parameters of every head the config has."""
  batch = dummy_batch(config, 1, 4, 1, 4)["image_text"]
  tokens = batch["text_tokens"]

  def init(module, images, tokens):
    out = [module(images, tokens, tokens, tokens)]
    if config.num_classes:
      out.append(module.classify(images, tokens))
    if config.max_images > 1:  # the image index embedding
      out.append(module.encode(jnp.stack([images] * config.max_images, axis=1), tokens))
    return out
  return model.init(rng, batch["images"], tokens, method=init)["params"]


class Trainer:
  """Builds sharded state and the jitted, donated train/eval steps for one model and mesh."""

  def __init__(self, config: ModelConfig, partitioner: Partitioner, total_steps: int,
               objective: Callable = objectives.prefix_lm, seed: int = 0,
               num_microbatches: int = 1):
    if isinstance(num_microbatches, bool) or not isinstance(num_microbatches, int) or (
        num_microbatches < 1):
      raise UserError(f"train.num_microbatches must be a positive integer, got "
                      f"{num_microbatches!r}")
    self.config = config
    self.num_microbatches = num_microbatches
    self.model = SimVLM(config)
    self.partitioner = partitioner
    self.seed = seed
    self.schedule = learning_rate_schedule(total_steps)
    self.tx = make_optimizer(self.schedule)
    self.objective = objective
    self.state_shardings = self.partitioner.shardings_for(self._abstract_boxed_state())
    step_fn = functools.partial(train_step, model=self.model, tx=self.tx, schedule=self.schedule,
                                objective=objective, seed=seed,
                                num_microbatches=num_microbatches)
    data = partitioner.data_sharding
    self._train_step = jax.jit(step_fn, in_shardings=(self.state_shardings, data),
                               out_shardings=(self.state_shardings, partitioner.replicated),
                               donate_argnums=(0,))
    eval_fn = functools.partial(eval_step, model=self.model, objective=objective, seed=seed)
    self._eval_step = jax.jit(eval_fn, in_shardings=(self.state_shardings.params, data),
                              out_shardings=partitioner.replicated)

  def _init_boxed(self, rng):
    params = init_params(self.model, self.config, rng)
    opt_state = box_like_params(self.tx.init(nn.meta.unbox(params)), params)
    return TrainState(jnp.zeros((), jnp.int32), params, opt_state)

  def _abstract_boxed_state(self):
    with self.partitioner.activate():
      return jax.eval_shape(self._init_boxed, jax.random.PRNGKey(0))

  @property
  def abstract_state(self) -> TrainState:
    """ShapeDtypeStructs carrying the target shardings (for restoring a checkpoint)."""
    shapes = nn.meta.unbox(self._abstract_boxed_state())
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, self.state_shardings)

  def init_state(self) -> TrainState:
    """Initial state, created directly in its sharded layout (never whole on one device)."""
    init = jax.jit(lambda rng: nn.meta.unbox(self._init_boxed(rng)),
                   out_shardings=self.state_shardings)
    with self.partitioner.activate():
      return init(jax.random.PRNGKey(self.seed))

  def state_from_params(self, params) -> TrainState:
    """A step-0 state around given (sharded) params, with a fresh optimizer state."""
    make = jax.jit(lambda p: TrainState(jnp.zeros((), jnp.int32), p, self.tx.init(p)),
                   out_shardings=self.state_shardings)
    with self.partitioner.activate():
      return make(params)

  def check_batch(self, host_batch: Any) -> None:
    """Raises UserError when a batch does not fit the model: image size, or more text tokens than
    the model has text positions (they would all share the last position, silently)."""
    check_batch(self.config, host_batch)

  def train_step(self, state: TrainState, global_batch: Any) -> Tuple[TrainState, Metrics]:
    if self.num_microbatches > 1:
      self._check_microbatches(global_batch)
    with self.partitioner.activate():
      return self._train_step(state, global_batch)

  def _check_microbatches(self, global_batch: Any) -> None:
    """Each microbatch must split evenly over the batch shards: XLA pads an uneven split, and the
    padding rows corrupt gradients (measured: a 0.1% wrong gradient norm on a 2x2x2 mesh)."""
    count, shards = self.num_microbatches, self.partitioner.batch_shards
    for kind, sub in global_batch.items():
      rows = jax.tree.leaves(sub)[0].shape[0]
      if rows % (count * shards):
        raise UserError(
            f"train.num_microbatches = {count} leaves the {rows} {kind} rows of a step in pieces "
            f"that do not split over the mesh's {shards} batch shards (data x fsdp): make each "
            f"sub-batch a multiple of {count * shards} rows, or use fewer microbatches")

  def eval_step(self, params, global_batch: Any) -> Metrics:
    with self.partitioner.activate():
      return self._eval_step(params, global_batch)

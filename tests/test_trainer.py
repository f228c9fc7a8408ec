"""Optimizer, schedule, train step and the gin train loop."""
import glob
import os
import re

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow as tf

from jax.extend import core as jax_core

from simvlm_jax import evaluators, flops, gin_utils, objectives, train, trainer
from simvlm_jax.data.synthetic import SyntheticIterator
from simvlm_jax.errors import UserError
from simvlm_jax.models import ModelConfig, SimVLM
from simvlm_jax.partitioning import Partitioner

ONE_DEVICE = jax.devices()[:1]


def test_schedule_warmup_then_linear_decay():
  sched = trainer.learning_rate_schedule(100, peak_learning_rate=1e-3, warmup_fraction=0.1)
  # 10 warmup steps from 0 to 1e-3, then linear to 0 over the remaining 90.
  np.testing.assert_allclose([sched(0), sched(5), sched(10), sched(55), sched(100)],
                             [0.0, 5e-4, 1e-3, 5e-4, 0.0], atol=1e-9)


def test_weight_decay_skips_vectors():
  params = {"kernel": jnp.ones((2, 2)), "scale": jnp.ones((2,))}
  tx = trainer.make_optimizer(lambda _: 0.5, weight_decay=0.1, clip_norm=None)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  np.testing.assert_allclose(updates["kernel"], -0.5 * 0.1 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_allclose(updates["scale"], 0.0)


def test_gradient_clipping():
  """The optimizer clips the global gradient norm before Adam. Adam's first step is scale-free,
  so the effect shows on the second: a large then a small gradient, clipped or not."""
  params = {"w": jnp.zeros((4,))}
  grads = [{"w": jnp.full((4,), 10.0)}, {"w": jnp.full((4,), 0.1)}]

  def run(tx, gs):
    state, out = tx.init(params), None
    for g in gs:
      out, state = tx.update(g, state, params)
    return out["w"]

  adam = optax.adamw(1.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
  clip = lambda g: optax.clip_by_global_norm(1.0).update(g, optax.EmptyState())[0]
  got = run(trainer.make_optimizer(lambda _: 1.0, weight_decay=0.0, clip_norm=1.0), grads)
  np.testing.assert_allclose(got, run(adam, [clip(g) for g in grads]), rtol=1e-5)
  assert not np.allclose(got, run(adam, grads), rtol=1e-2)  # unclipped differs
  unclipped = run(trainer.make_optimizer(lambda _: 1.0, weight_decay=0.0, clip_norm=None), grads)
  np.testing.assert_allclose(unclipped, run(adam, grads), rtol=1e-5)


def test_train_step_is_deterministic_and_learns(tiny_config):
  config = tiny_config()
  part = Partitioner((1, 1, 1), devices=ONE_DEVICE)
  batch = part.shard_batch(next(SyntheticIterator(image_size=config.image_size,
                                                  vocab_size=config.vocab_size)))
  runs = []
  gin.clear_config()
  gin.bind_parameter("learning_rate_schedule.peak_learning_rate", 3e-3)
  for _ in range(2):
    tr = trainer.Trainer(config, part, total_steps=20)
    state = tr.init_state()
    losses = []
    for _ in range(8):
      state, metrics = tr.train_step(state, batch)
      losses.append(float(metrics["loss"]))
    runs.append(losses)
  gin.clear_config()
  assert runs[0] == runs[1]
  # Fits a repeated batch of random tokens: below the uniform-guess loss log(vocab).
  assert runs[0][-1] < min(0.9 * runs[0][0], np.log(config.vocab_size))
  assert set(metrics) >= {"loss", "accuracy", "grad_norm", "learning_rate", "target_tokens",
                          "image_text/loss", "text/loss"}
  assert int(state.step) == 8


POISON = 3  # the first token of a row whose loss is made infinite


def _poisoned_prefix_lm(tokens, keys, with_image):
  """prefix_lm, but a row that starts with POISON weighs its loss infinitely: a loss that
  becomes inf (the step is not finite) whenever the batch holds such a row."""
  split = objectives.prefix_lm(tokens, keys, with_image)
  split["loss_weights"] = jnp.where(tokens[:, :1] == POISON, jnp.inf, split["loss_weights"])
  return split


def test_logged_learning_rate_is_the_one_applied_after_a_skipped_step(tiny_config):
  """Step 1's loss is not finite, so it is skipped and the optimizer's count stays at 1: step 2
  applies schedule(1) and step 3 schedule(2) (warmup: 2e-3 per step), and logs them, not the
  schedule at the step. What was applied is read off the weights: the text-position rows no
  token reaches (positions >= 8 of 32) get zero gradients, so AdamW moves them by its decoupled
  weight decay alone: p *= 1 - lr * wd."""
  config = tiny_config()
  part = Partitioner((1, 1, 1), devices=ONE_DEVICE)
  clean = next(SyntheticIterator(image_text_batch=2, image_text_length=8, text_batch=2,
                                 text_length=8, image_size=config.image_size,
                                 vocab_size=config.vocab_size))
  for sub in clean.values():
    sub["text_tokens"][sub["text_tokens"] == POISON] = POISON + 1
  poisoned = jax.tree.map(np.copy, clean)
  poisoned["text"]["text_tokens"][0, 0] = POISON
  gin.clear_config()
  gin.parse_config(["learning_rate_schedule.peak_learning_rate = 1e-2",
                    "learning_rate_schedule.warmup_fraction = 0.5",
                    "make_optimizer.weight_decay = 10.0"])
  try:
    tr = trainer.Trainer(config, part, total_steps=10, objective=_poisoned_prefix_lm)
  finally:
    gin.clear_config()
  state = tr.init_state()
  unused = lambda s: np.asarray(s.params["text_positions"]["embedding"][8:])  # noqa: E731
  logged, applied, skipped = [], [], []
  for batch in (clean, poisoned, clean, clean):
    before = unused(state)
    state, metrics = tr.train_step(state, part.shard_batch(batch))
    logged.append(float(metrics["learning_rate"]))
    applied.append(float(np.mean(1.0 - unused(state) / before)) / 10.0)
    skipped.append(int(metrics["nonfinite_loss"]))
  assert skipped == [0, 1, 0, 0] and np.abs(before).min() > 0
  np.testing.assert_allclose(logged, [0.0, 2e-3, 2e-3, 4e-3], rtol=1e-6)
  # What the optimizer applied (nothing at the skipped step) is what was logged.
  np.testing.assert_allclose(applied, [0.0, 0.0, 2e-3, 4e-3], rtol=1e-3, atol=1e-8)


def _np_sigmoid_ce(logits, labels):
  """Sigmoid cross-entropy written out: -(y log s(x) + (1 - y) log(1 - s(x)))."""
  sig = 1.0 / (1.0 + np.exp(-logits))
  return -(labels * np.log(sig) + (1.0 - labels) * np.log(1.0 - sig))


def test_vqa_classifier_loss_and_training(tiny_config):
  """The 3,129-way head's loss: summed sigmoid cross-entropy over the classes against the VQA
  soft scores, averaged over real rows (a padding row, prefix all zero, counts nothing); its
  "accuracy" is the soft score of the top class. On a repeated batch it learns every answer."""
  classes = 5
  config = tiny_config(num_classes=classes)
  part = Partitioner((1, 1, 1), devices=ONE_DEVICE)
  rng = np.random.default_rng(0)
  rows = 4
  prefix = rng.integers(2, config.vocab_size, (rows, 6)).astype(np.int32)
  prefix[:, 4:] = 0
  prefix[3] = 0  # a padding row of the last eval batch
  scores = np.zeros((rows, classes), np.float32)
  scores[0, 1], scores[1, [2, 3]], scores[2, 4], scores[3, 0] = 1.0, (0.6, 0.3), 0.9, 1.0
  batch = part.shard_batch({"image_text": {
      "images": rng.integers(0, 255, (rows, config.image_size, config.image_size, 3), np.uint8),
      "prefix_tokens": prefix, "class_scores": scores}})
  gin.clear_config()
  gin.bind_parameter("learning_rate_schedule.peak_learning_rate", 3e-3)
  gin.bind_parameter("learning_rate_schedule.warmup_fraction", 0.0)
  tr = trainer.Trainer(config, part, total_steps=100)
  gin.clear_config()
  state = tr.init_state()
  logits = np.asarray(tr.model.apply({"params": state.params}, batch["image_text"]["images"],
                                     batch["image_text"]["prefix_tokens"], method="classify"))
  assert logits.shape == (rows, classes)
  row_loss = _np_sigmoid_ce(logits.astype(np.float64), scores).sum(-1)
  top = scores[np.arange(rows), logits.argmax(-1)]
  sums = jax.device_get(tr.eval_step(state.params, batch))
  np.testing.assert_allclose(sums["loss_sum"], row_loss[:3].sum(), rtol=1e-5)
  np.testing.assert_allclose(sums["correct_sum"], top[:3].sum(), rtol=1e-5)
  assert sums["weight_sum"] == 3.0

  for _ in range(30):
    state, metrics = tr.train_step(state, batch)
  assert float(metrics["accuracy"]) == pytest.approx((1.0 + 0.6 + 0.9) / 3, abs=1e-6)
  logits = np.asarray(tr.model.apply({"params": state.params}, batch["image_text"]["images"],
                                     batch["image_text"]["prefix_tokens"], method="classify"))
  np.testing.assert_array_equal(logits[:3].argmax(-1), [1, 2, 4])
  assert float(metrics["loss"]) < 0.5 * row_loss[:3].mean()


def test_split_batch_uses_global_row_index():
  tokens = jnp.array([[5, 6, 7, 8, 1, 0]] * 4, jnp.int32)
  batch = {"image_text": {"images": jnp.zeros((2, 4, 4, 3), jnp.uint8), "text_tokens": tokens[:2]},
           "text": {"text_tokens": tokens[2:]}}
  splits = trainer.split_batch(batch, seed=3, step=jnp.int32(7), objective=objectives.prefix_lm)
  keys = objectives.row_keys(3, 7, jnp.arange(4))
  expected_text = objectives.draw_prefix_lengths(keys[2:], tokens[2:], 1)
  got_text = jnp.sum(splits["text"]["prefix_tokens"] > 0, axis=1)
  np.testing.assert_array_equal(got_text, expected_text)
  assert "images" in splits["image_text"] and "images" not in splits["text"]


def _parse(bindings):
  gin.clear_config()
  gin_utils.parse_gin(["runs/synthetic_tiny.gin"], bindings)


def test_bad_gin_binding_fails_before_training(tmp_path):
  with pytest.raises(ValueError, match="no_such_param"):
    _parse([f"train.model_dir = '{tmp_path}'", "train.no_such_param = 3"])
  gin.clear_config()


def _product_flops(jaxpr) -> int:
  """FLOPs (2 per multiply-add) of every dot_general in `jaxpr` and the jaxprs inside it."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contracted, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * int(
          np.prod([lhs[d] for d in contracted]))
    assert eqn.primitive.name != "conv_general_dilated"  # linear patches: products only
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        if isinstance(sub, (jax_core.ClosedJaxpr, jax_core.Jaxpr)):
          total += _product_flops(getattr(sub, "jaxpr", sub))
  return total


def test_batch_flops_are_three_times_the_forward_pass_products(tiny_config):
  """A train step's model FLOPs (what MFU divides by the time and the peak) are 3x those of every
  matrix product the forward pass of its loss runs, counted from the traced program: patches,
  Transformer, attention, logits, over 2 image-text rows of 8 tokens and 3 text rows of 12."""
  config = tiny_config(patchifier="linear")
  model = SimVLM(config)
  params = jax.eval_shape(lambda: trainer.init_params(model, config, jax.random.PRNGKey(0)))
  batch = next(SyntheticIterator(image_text_batch=2, image_text_length=8, text_batch=3,
                                 text_length=12, image_size=config.image_size,
                                 vocab_size=config.vocab_size))

  def loss(params, batch):
    splits = trainer.split_batch(batch, 0, jnp.int32(0), objectives.prefix_lm)
    sums = trainer._sums(model, params, splits, None)  # pylint: disable=protected-access
    return sums["loss_sum"]
  forward = _product_flops(jax.make_jaxpr(loss)(params, batch).jaxpr)
  assert forward == 6_934_528
  assert flops.batch_flops(config, batch) == 3 * forward


def test_conv_stage_flops_by_hand(tiny_config):
  """The tiny ResNet conv stage (32px images, stem 8, stages 16 and 32 of one bottleneck each,
  patch 8), per image, as multiply-adds x 2:
    stem 7x7, 3 -> 8 at 16x16                                     602,112
    stage 16 at 8x8 (mid 4): 1x1 8->4, 3x3 4->4, 1x1 4->16,
      projection 1x1 8->16:  4,096 + 18,432 + 8,192 + 16,384     =  47,104
    stage 32, stride 2 (mid 8): 1x1 16->8 at 8x8, 3x3 8->8 at 4x4,
      1x1 8->32 and projection 16->32 at 4x4:
      16,384 + 18,432 + 8,192 + 16,384                            =  59,392
    projection to embed: 1x1 32->32 on 16 tokens                   32,768
  (The strided convolutions run as stride-1 ones over folded, zero-padded kernels, which do
  more arithmetic; MFU counts the model's.)"""
  assert flops.conv_stage_flops(tiny_config()) == 602_112 + 47_104 + 59_392 + 32_768
  assert flops.conv_stage_flops(tiny_config(patchifier="linear")) == 2 * 16 * 8 * 8 * 3 * 32


def test_gin_train_loop_writes_config_metrics_and_checkpoints(tmp_path, capsys, monkeypatch):
  model_dir = str(tmp_path / "run")
  _parse([f"train.model_dir = '{model_dir}'", "train.total_steps = 4", "train.log_every = 2",
          "train.checkpoint_every = 2", "SyntheticIterator.text_batch = 8",
          "train.profile_steps = (2, 3)"])
  # A known peak (on CPU the loop times a matmul for it) and the step's FLOPs (`batch_flops`,
  # checked against the traced program above): MFU = step FLOPs / step time / peak.
  peak = 7.5e10
  monkeypatch.setattr(flops, "matmul_peak", lambda *args, **kwargs: peak)
  step_flops = flops.batch_flops(ModelConfig(), next(SyntheticIterator()))
  state = train.train()  # on all 8 devices: (data=8, fsdp=1, model=1)
  gin.clear_config()
  assert int(state.step) == 4
  out = capsys.readouterr().out
  assert "step 2/4 | loss" in out and "eta" in out and "ex/s" in out and "tok/s" in out
  # The profile window, where TensorBoard's profile plugin looks for it.
  assert f"profiled steps 2-3: {model_dir}/plugins/profile (TensorBoard's profile tab)" in out
  assert glob.glob(os.path.join(model_dir, "plugins", "profile", "*", "*.xplane.pb"))
  assert "MFU against a float32 matmul peak measured here: 0.075 TFLOP/s x 1 hosts" in out
  # Bytes per device, printed before compiling against what the device holds.
  assert re.search(r"^memory per device: parameters [\d.]+ MiB \+ optimizer state [\d.]+ MiB \+ "
                   r"gradients [\d.]+ MiB \+ activations [\d.]+ MiB \(estimated\) = [\d.]+ MiB of "
                   r"[\d.]+ GiB$", out, re.M)
  assert sorted(os.listdir(os.path.join(model_dir, "checkpoints")))[:2] == ["2", "4"]
  config = open(os.path.join(model_dir, "config.gin")).read()
  assert "train.total_steps = 4" in config
  assert "ModelConfig.emb_dim = 128" in open(os.path.join(model_dir, "operative_config.gin")).read()
  scalars = {}
  for path in glob.glob(os.path.join(model_dir, "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        if v.metadata.plugin_data.plugin_name == "scalars":
          scalars.setdefault(v.tag, {})[event.step] = float(tf.make_ndarray(v.tensor))
  assert {"loss", "accuracy", "learning_rate", "grad_norm", "examples_per_s", "tokens_per_s",
          "perf/step_time_s", "perf/mfu_measured_peak"} <= set(scalars)
  # Live efficiency: a window's step time and the MFU it implies, both from the same clock.
  for step in (2, 4):
    step_s, mfu = scalars["perf/step_time_s"][step], scalars["perf/mfu_measured_peak"][step]
    assert 0 < step_s < 60
    assert mfu == pytest.approx(step_flops / step_s / peak, rel=1e-5)
    rows = scalars["examples_per_s"][step] * step_s
    assert rows == pytest.approx(8 + 8, rel=1e-3)  # 8 image-text + 8 text rows a step


def test_checkpoints_keep_the_newest_the_best_and_every_period(tmp_path):
  """keep_checkpoints = 1, the best by an eval scalar, and every multiple of keep_period. The
  "best" here is the *highest* eval loss (keep_best_mode = "max"), so that it is not simply the
  newest step: the ranking is what is tested."""
  model_dir = str(tmp_path / "run")
  bindings = [f"train.model_dir = '{model_dir}'", "train.total_steps = 8", "train.log_every = 2",
              "train.checkpoint_every = 2", "SyntheticIterator.text_batch = 8",
              "train.keep_checkpoints = 1", "train.eval_iterator_fn = @eval/SyntheticIterator",
              "eval/SyntheticIterator.num_examples = 16", "train.eval_every = 2",
              "train.keep_best_by = 'eval/loss'", "train.keep_best_mode = 'max'",
              "train.keep_period = 4"]
  _parse(bindings)
  train.train()
  gin.clear_config()
  losses = {}
  for path in glob.glob(os.path.join(model_dir, "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        if v.tag == "eval/loss":
          losses[event.step] = float(tf.make_ndarray(v.tensor))
  assert sorted(losses) == [2, 4, 6, 8]
  worst = max(losses, key=losses.get)
  kept = sorted(int(d) for d in os.listdir(os.path.join(model_dir, "checkpoints")) if d.isdigit())
  assert kept == sorted({worst, 4, 8}), (kept, losses)
  _parse([b for b in bindings if "eval" not in b.split("=")[0]])
  with pytest.raises(UserError, match="ranks checkpoints by an evaluation: name a scalar one "
                     r"writes, eval/<name>/<metric> of train.evaluators \(none set\), or one of "
                     "eval/loss, eval/accuracy with train.eval_iterator_fn and train.eval_every "
                     "set"):
    train.train()
  gin.clear_config()


def test_keep_best_by_must_name_what_an_evaluation_writes():
  """Before step 1, the evaluator must exist (or the teacher-forced eval be set) and the metric
  must be one it writes whatever the data: a typo names the real ones, and never costs the steps
  since the last checkpoint (it used to raise at the first evaluation, before that step's save)."""
  official = {"vqa": evaluators.OfficialMetric(task="shapes_vqa_v2", every=10),
              "cap": evaluators.OfficialMetric(task="coco_captions", every=10),
              "ve": evaluators.OfficialMetric(task="snli_ve", every=10)}
  for ok in ("eval/vqa/accuracy", "eval/cap/CIDEr", "eval/cap/Bleu_4",
             "eval/ve/per_class_accuracy/neutral"):
    train._check_keep_best_by(ok, official, teacher_forced=False)
  train._check_keep_best_by("eval/loss", {}, teacher_forced=True)
  train._check_keep_best_by("eval/accuracy", {}, teacher_forced=True)
  for name, specs, teacher_forced in (("eval/vqa/accuracy", {}, True),
                                      ("eval/loss", official, False), ("loss", {}, True),
                                      ("eval/los", {}, True)):
    with pytest.raises(UserError, match="ranks checkpoints by an evaluation"):
      train._check_keep_best_by(name, specs, teacher_forced)
  with pytest.raises(UserError, match=r"'eval/vqa/acuracy': evaluator 'vqa' \(shapes_vqa_v2\) "
                     "writes eval/vqa/accuracy$"):
    train._check_keep_best_by("eval/vqa/acuracy", official, teacher_forced=False)
  with pytest.raises(UserError, match="eval/cap/Bleu_1, eval/cap/Bleu_2, eval/cap/Bleu_3, "
                     "eval/cap/Bleu_4, eval/cap/ROUGE_L, eval/cap/CIDEr$"):
    train._check_keep_best_by("eval/cap/METEOR", official, teacher_forced=False)  # not computed


def test_evaluator_settings_are_checked_before_the_run():
  ok = evaluators.OfficialMetric(task="shapes_coco_captions", every=5)
  assert evaluators.check({"zero_shot": ok}) == {"zero_shot": ok} and evaluators.check(None) == {}
  for specs, message in (
      ({"a/b": ok}, "'a/b' is not a usable evaluator name"),
      ({"x": evaluators.OfficialMetric(task="shapes_coco_captions", every=0)},
       r"train.evaluators\['x'\].every must be a positive integer, got 0"),
      ({"x": evaluators.OfficialMetric(task="imagenet", every=5)}, "no metric for task 'imagenet'"),
      ({"x": evaluators.OfficialMetric(task="vqa_v2", every=5, vqa_metric_version="2019")},
       "2019"),
      (["shapes_vqa_v2"], "train.evaluators must be a dict of name -> @OfficialMetric()")):
    with pytest.raises(UserError, match=message):
      evaluators.check(specs)

r"""Can the image stage alone tell the shapes apart? A supervised probe on the shapes world.

  .venv/bin/python benchmarks/vision_probe.py [--steps 400] [--patchifier resnet|linear]
      [--pool mean|max|attention] [--learning_rate 2e-3]
      [--stem_width 32 --stage_widths 64 128 --stage_blocks 1 1] [--image_size 64]
      [--init_from RUN_DIR [--freeze]] [--save DIR]

Trains SimVLM-Tiny's image stage (`simvlm_jax.models.conv_stage`, the model's own module and
normalisation) plus pooling (mean, max or attention over the image tokens) and a linear head, from
scratch, to say which of the six shapes are in a scene (6 independent yes/no labels, the visual
half of a caption's shape claims), and prints held-out accuracy: per label and per scene (all six
right). If this probe learns the shapes quickly where PrefixLM pretraining does not, the image
stage is not what holds captions back; if it does not, it is. With --init_from a run's own image
stage is the start (and with --freeze only the head trains: how much shape its pretraining put
there); --save writes the trained stage where `train.init_from` reads it (a diagnostic: does the
model use shape features once they exist?). Pure JAX on rendered numpy images: no TFDS build
needed (a run directory's config needs seqio, like `eval`).
"""
import argparse
import os
import sys
import time

import numpy as np


def _data(count: int, size: int, split: str, target: str):
  from tasks import shapes_world
  names = list(shapes_world.SHAPES if target == "shape" else shapes_world.COLOURS)
  images = np.empty((count, size, size, 3), np.uint8)
  labels = np.zeros((count, len(names)), np.float32)
  for i in range(count):
    rng = shapes_world.example_rng(7, split, i)
    scene = shapes_world.sample_scene(rng)
    images[i] = shapes_world.render(scene, size, rng)
    for obj in scene.objects:
      labels[i, names.index(getattr(obj, target))] = 1.0
  return images, labels


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--target", default="shape", choices=["shape", "colour"],
                      help="which attribute's presence to predict (colour: a sanity check)")
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--learning_rate", type=float, default=2e-3)
  parser.add_argument("--train_images", type=int, default=8192)
  parser.add_argument("--image_size", type=int, default=64)
  parser.add_argument("--patchifier", default="resnet", choices=["resnet", "linear", "plain"],
                      help="plain: a reference CNN (3x3 convs, ReLU, no normalisation), not the "
                           "model's")
  parser.add_argument("--pool", default="mean", choices=["mean", "max", "attention"],
                      help="how the head pools the image tokens (max: an object on a few tokens "
                           "is not averaged away; attention: one learned query, 4 heads, as "
                           "big_vision's MAP head and the decoder's cross-attention)")
  parser.add_argument("--patch_size", type=int, default=8)
  parser.add_argument("--stem_width", type=int, default=32)
  parser.add_argument("--stage_widths", type=int, nargs="+", default=[64, 128])
  parser.add_argument("--stage_blocks", type=int, nargs="+", default=[1, 1])
  parser.add_argument("--init_from", default=None,
                      help="a run directory (or one of its steps): start from its image stage "
                           "(and take its sizes), e.g. to see how much shape pretraining put in it")
  parser.add_argument("--freeze", action="store_true",
                      help="train the head only: a linear probe of the stage (without "
                           "--init_from: of a randomly initialised one, the baseline)")
  parser.add_argument("--save", default=None,
                      help="write the trained stage as a checkpoint of its parameters alone "
                           "(under `patchify`) that `train.init_from` reads into a model of "
                           "the same sizes (embed 128: SimVLM-Tiny's), the rest initialised")
  args = parser.parse_args(argv)
  if args.save and args.patchifier == "plain":
    parser.error("--save writes the model's image stage; the plain CNN is not one")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax
  from simvlm_jax.models import conv_stage, simvlm
  pretrained, emb_dim = None, 128  # SimVLM-Tiny's width
  if args.init_from:
    import tasks  # noqa: F401  (the configurables a run's config.gin names)
    from simvlm_jax import run_dir, train  # noqa: F401
    run = run_dir.open_run(args.init_from, need_vocabulary=False)
    c = run.config
    if c.patchifier != args.patchifier:
      parser.error(f"{args.init_from} has a {c.patchifier!r} image stage")
    args.patch_size, args.stem_width = c.patch_size, c.resnet_stem_width
    args.stage_widths, args.stage_blocks = c.resnet_stage_widths, c.resnet_stage_blocks
    emb_dim, pretrained = c.emb_dim, jax.device_get(run.params["patchify"])
    print(f"image stage from {run.directory}, step {run.step}", flush=True)

  def _plain_cnn(x, deterministic):
    del deterministic
    for features, stride in ((32, 1), (64, 2), (128, 2), (128, 2)):  # stride 8: 8x8 at 64 px
      x = nn.relu(nn.Conv(features, (3, 3), strides=stride)(x))
    return x.reshape(x.shape[0], -1, x.shape[-1])

  class Probe(nn.Module):
    @nn.compact
    def __call__(self, images):
      x = (images.astype(jnp.float32) - simvlm._MEAN) / simvlm._STD  # the model's normalisation
      if args.patchifier == "resnet":
        stage = conv_stage.ResNetStage(emb_dim, args.patch_size, args.stem_width,
                                       tuple(args.stage_widths), tuple(args.stage_blocks),
                                       name="stage")
      elif args.patchifier == "linear":
        stage = conv_stage.LinearPatchify(emb_dim, args.patch_size, name="stage")
      else:
        stage = _plain_cnn
      tokens = stage(x, deterministic=True)  # [batch, patches, embed]
      if args.freeze:
        tokens = jax.lax.stop_gradient(tokens)
      if args.pool == "attention":
        query = self.param("query", nn.initializers.normal(0.02), (1, 1, tokens.shape[-1]))
        pooled = nn.MultiHeadDotProductAttention(4)(
            jnp.broadcast_to(query, (tokens.shape[0], 1, tokens.shape[-1])), tokens)[:, 0]
      else:
        pooled = tokens.max(axis=1) if args.pool == "max" else tokens.mean(axis=1)
      return nn.Dense(train_y.shape[1])(nn.LayerNorm()(pooled))

  start = time.time()
  train_x, train_y = _data(args.train_images, args.image_size, "train", args.target)
  test_x, test_y = _data(1024, args.image_size, "validation", args.target)
  print(f"always 'absent': {100 * (1 - test_y.mean()):.1f}% of the held-out labels right")
  print(f"rendered {args.train_images} + 1024 scenes in {time.time() - start:.0f}s", flush=True)
  model = Probe()
  params = model.init(jax.random.PRNGKey(0), train_x[:2])["params"]
  if pretrained is not None:
    params = {**params, "stage": pretrained}
  schedule = optax.warmup_cosine_decay_schedule(0.0, args.learning_rate, args.steps // 20,
                                                args.steps)
  optimizer = optax.adamw(schedule, weight_decay=0.01)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    loss_fn = lambda p: optax.sigmoid_binary_cross_entropy(model.apply({"params": p}, x), y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  predict = jax.jit(lambda p, x: model.apply({"params": p}, x) > 0)
  rng = np.random.default_rng(0)
  start = time.time()
  for i in range(1, args.steps + 1):
    batch = rng.integers(0, len(train_x), args.batch)
    params, opt_state, loss = step(params, opt_state, train_x[batch], train_y[batch])
    if i % max(args.steps // 8, 1) == 0 or i == args.steps:
      right = np.concatenate([np.asarray(predict(params, test_x[j:j + 256])) == test_y[j:j + 256]
                              for j in range(0, len(test_x), 256)])
      print(f"step {i}: loss {float(loss):.3f} | held-out: {100 * right.mean():.1f}% of "
            f"{args.target} labels right, {100 * right.all(axis=1).mean():.1f}% of scenes all right "
            f"({time.time() - start:.0f}s)", flush=True)
  if args.save:
    from simvlm_jax import checkpoints
    ckpt = checkpoints.Checkpointer(os.path.join(os.path.abspath(args.save), "checkpoints"),
                                    keep=None, async_save=False)
    try:
      ckpt.save({"params": {"patchify": nn.unbox(params["stage"])}}, force=True, step=args.steps)
    finally:
      ckpt.close()
    print(f"image stage -> {args.save} (train.init_from reads it)")


if __name__ == "__main__":
  main()

r"""Text for your images from any trained run: captions, VQA answers, NLVR2 and SNLI-VE labels.

  python -m simvlm_jax.predict --checkpoint_dir=demo_output/pretrain --image=my_photos/
  python -m simvlm_jax.predict --checkpoint_dir=runs/vqa --image='photos/*.jpg' \
      --prompt="what colour is the square?" --format=json
  python -m simvlm_jax.predict --checkpoint_dir=runs/nlvr2 --image=left.png --image2=right.png \
      --prompt="there are two circles"
  python -m simvlm_jax.predict --checkpoint_dir=runs/snli_ve --image=premise.jpg \
      --prompt="a dog is sleeping"

The model, its vocabulary (and a VQA classifier's answers) come from the run directory
(`simvlm_jax.run_dir`): no data, task registration or model flag is needed. What the prompt means
follows the run: a caption prefix for pretraining and captioning runs (default "a picture of"), the
question for VQA, the statement for NLVR2 (one image pair per --image / --image2 match), the
hypothesis for SNLI-VE. `--image` takes a file, a glob or a folder (its image files).

An image that cannot be read costs one line on stderr (`error: cannot read image ...`) and the rest
go on; the exit status is 0 when at least one image got its result (1 when none did), and
`--strict` makes the first unreadable image end the run (exit status 2).
"""
import dataclasses
import json
import os
import sys
from typing import List, Optional, Sequence

import jax
import numpy as np
from absl import app, flags

from simvlm_jax import console, decoding, distributed, gin_utils, run_dir
from simvlm_jax.data import image_ops
from simvlm_jax import train  # noqa: F401  (registers `train`, which saved configs bind)
from simvlm_jax.errors import UserError, run_main
from simvlm_jax.partitioning import Partitioner

CAPTION_PROMPT = "a picture of"
# What the prompt is for each kind of run (the text the run's task put before the target).
PROMPT_ROLE = {"vqa_v2": "the question", "nlvr2": "the statement about the image pair",
               "snli_ve": "the hypothesis", "snli_ve_text": "the hypothesis"}


class Predictor:
  """A run opened for prediction (see `run_dir.open_run`); decodes or classifies batches.

  Args:
    model_dir: a run directory, or one of its `checkpoints/<step>` directories.
    step: the checkpoint step (default: the newest).
    restore: load the parameters now; False leaves it to `restore()` (the command checks its
      arguments against the run's config first, so a wrong one is refused in seconds).
    mesh_shape: (data, fsdp, model) over all devices of all processes: the parameters sharded by
      the training rules, each batch's rows over data x fsdp; default: one device.
  """

  def __init__(self, model_dir: str, step: Optional[int] = None, restore: bool = True,
               mesh_shape: Optional[Sequence[int]] = None):
    self.partitioner = (Partitioner(tuple(mesh_shape)) if mesh_shape is not None
                        else run_dir.single_device())
    self.run = run_dir.open_run(model_dir, step, restore=False)
    if restore:
      self.restore()
    self.config = self.run.config
    task = self.run.setting("make_finetune_iterator.task_name")
    self.benchmark = _benchmark(task) if isinstance(task, str) else None
    self.classifier = self.config.num_classes > 0
    if self.classifier and not self.run.answers:
      raise UserError(f"{self.run.directory} has a classifier head but no {run_dir.ANSWERS_FILE}, "
                      "so its classes have no names")

  def restore(self) -> None:
    self.run.restore(self.run.step, self.partitioner)

  @property
  def pairs(self) -> bool:
    """Whether the model reads an image pair (NLVR2)."""
    return self.benchmark == "nlvr2"

  @property
  def vocabulary(self):
    return self.run.vocabulary

  def default_prompt(self) -> Optional[str]:
    return None if self.benchmark in PROMPT_ROLE else CAPTION_PROMPT

  def encode_prompt(self, prompts: Sequence[str]) -> np.ndarray:
    """Prompt token ids (no EOS: the model continues them), 0-padded, `[batch, length]`."""
    ids = [list(self.vocabulary.encode(p)) for p in prompts]
    length = max(1, max(len(i) for i in ids))
    return np.array([i + [0] * (length - len(i)) for i in ids], np.int32)

  def generate(self, images: Optional[np.ndarray], prompts: Sequence[str], beam_size: int = 1,
               max_decode_length: int = 32) -> List[dict]:
    """`images`: uint8 `[batch, H, W, 3]` (`[batch, 2, H, W, 3]` for pairs) at the model's size,
    or None for text only. A classifier's "score" is its answer's probability; a decoder's, the
    sequence log-probability."""
    images, prompt_tokens = self.partitioner.shard_global_batch(
        (images, self.encode_prompt(prompts)))
    with self.partitioner.activate():
      fn = decoding.jitted(self.config, "classifier" if self.classifier else
                         "beam" if beam_size > 1 else "greedy", max_decode_length,
                         max(beam_size, 1), out_sharding=self.partitioner.replicated)
      out = fn(self.run.params, images, prompt_tokens)
    if self.classifier:
      probs = jax.device_get(jax.nn.sigmoid(out))
      top = np.argmax(probs, axis=-1)
      return [{"prediction": self.run.answers[i] if i < len(self.run.answers) else "",
               "score": float(p[i])} for i, p in zip(top, probs)]
    tokens, scores = jax.device_get((out.tokens, out.scores))
    return [{"prediction": self.run.decode(row.tolist()), "score": float(score)}
            for row, score in zip(tokens, scores)]


def _benchmark(task: str) -> Optional[str]:
  from simvlm_jax.evaluators import benchmark_of  # pylint: disable=import-outside-toplevel
  try:
    return benchmark_of(task)
  except UserError:
    return None  # a task of the user's own: treated as captioning


def load_image(path: str, size: int) -> np.ndarray:
  """Any JPEG/PNG/GIF/BMP -> uint8 `[size, size, 3]` (centre crop), as evaluation prepares it.
  Raises UserError naming the file and the reason when it cannot be read."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      encoded = f.read()
    image = image_ops.decode_rgb(tf.constant(encoded))
    return image_ops.crop_and_resize(image, (size, size)).numpy()
  except (OSError, tf.errors.OpError) as e:
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "Op:" in reason:  # TensorFlow's suffix names its kernel, not the problem
      reason = reason.split("[Op:")[0].rsplit("}}", 1)[-1].strip()
    raise UserError(f"cannot read image {path}: {reason}") from None


def expand_images(pattern: str) -> List[str]:
  """A file, a glob (sorted) or a folder (its image files, sorted); relative paths stay relative."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  if tf.io.gfile.isdir(pattern):
    paths = sorted(os.path.join(pattern, name) for name in tf.io.gfile.listdir(pattern)
                   if name.lower().endswith(image_ops.IMAGE_EXTENSIONS))
    if not paths:
      raise UserError(f"folder {pattern} holds no image file "
                      f"({', '.join(image_ops.IMAGE_EXTENSIONS)})")
    return paths
  if any(c in pattern for c in "*?["):
    paths = sorted(tf.io.gfile.glob(pattern))
    if not paths:
      raise UserError(f"no file matches {pattern!r}")
    return paths
  return [pattern]


def _define_flags():
  flags.DEFINE_string("checkpoint_dir", None, "A run directory (train.model_dir), or one of its "
                      "checkpoints/<step> directories.", required=True)
  flags.DEFINE_string("image", None, "An image file, glob or folder.", required=True)
  flags.DEFINE_string("image2", None, "NLVR2 runs: the second image of each pair (file, glob or "
                      "folder, matched to --image in sorted order).")
  flags.DEFINE_string("prompt", None, "Caption prefix (captioning runs, default 'a picture of'), "
                      "question (VQA), statement (NLVR2) or hypothesis (SNLI-VE).")
  flags.DEFINE_integer("beam_size", 1, "1: greedy; > 1: beam search.")
  flags.DEFINE_integer("max_decode_length", 32, "Most tokens to generate.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
  flags.DEFINE_integer("batch_size", 8, "Images decoded together.")
  flags.DEFINE_enum("format", "text", ["text", "json"], "text: path<TAB>prediction; json: one "
                    "object a line with the prompt and the score.")
  flags.DEFINE_list("mesh", None, "data,fsdp,model over all devices of all processes (e.g. "
                    "-1,1,1); default: one device. --batch_size must be a multiple of data x fsdp.")
  gin_utils.define_console_flags()
  flags.DEFINE_bool("strict", False, "The first unreadable image ends the run (exit status 2) "
                    "instead of costing one line on stderr.")


@dataclasses.dataclass
class Request:
  """What the command was asked (its flags; see `_define_flags`)."""
  checkpoint_dir: str
  image: str
  image2: Optional[str] = None
  prompt: Optional[str] = None
  beam_size: int = 1
  max_decode_length: int = 32
  step: Optional[int] = None
  batch_size: int = 8
  format: str = "text"
  mesh: Optional[Sequence[str]] = None
  strict: bool = False


def _inputs(predictor: Predictor, r: Request) -> List[tuple]:
  """(paths, ...) per example: (image,) or (image, image2)."""
  images = expand_images(r.image)
  if predictor.pairs:
    if not r.image2:
      raise UserError("this is an NLVR2 run: give the second image of each pair with --image2")
    second = expand_images(r.image2)
    if len(second) != len(images):
      raise UserError(f"--image gives {len(images)} images and --image2 {len(second)}; they are "
                      "paired in sorted order, so give as many of each")
    return list(zip(images, second))
  if r.image2:
    raise UserError(f"--image2 is for NLVR2 runs (image pairs); {r.checkpoint_dir} is "
                    f"{'a ' + predictor.benchmark if predictor.benchmark else 'a captioning'} run")
  return [(path,) for path in images]


def predict_files(r: Request, out=None, err=None) -> int:
  """The command: predicts every image of `r` and prints a line each (to `out`, default stdout;
  unreadable images and the summary to `err`, default stderr). Returns the exit status; a wrong
  request raises UserError before the parameters are loaded."""
  try:
    mesh = None if r.mesh is None else [int(x) for x in r.mesh]
  except ValueError:
    raise UserError("--mesh takes three integers data,fsdp,model, got "
                    f"{','.join(r.mesh)}") from None
  predictor = Predictor(r.checkpoint_dir, r.step, restore=False, mesh_shape=mesh)
  if r.batch_size % predictor.partitioner.batch_shards:
    raise UserError(f"--batch_size {r.batch_size} does not split over the mesh's "
                    f"{predictor.partitioner.batch_shards} batch shards (data x fsdp): make it a "
                    "multiple of them")
  # Every process reads every image and decodes its share of each batch; process 0 prints.
  main_process = jax.process_index() == 0

  def say(line: str, to_err: bool = False) -> None:
    if main_process:
      print(line, file=(err or sys.stderr) if to_err else (out or sys.stdout), flush=True)
  prompt = r.prompt if r.prompt is not None else predictor.default_prompt()
  if prompt is None:
    raise UserError(f"this is a {predictor.benchmark} run: give {PROMPT_ROLE[predictor.benchmark]}"
                    " with --prompt")
  examples, size = _inputs(predictor, r), predictor.config.image_size
  predictor.restore()
  done = failed = 0
  shape = (2 if predictor.pairs else 1, size, size, 3)
  for start in range(0, len(examples), r.batch_size):
    chunk, pixels, errors = examples[start:start + r.batch_size], [], []
    for paths in chunk:
      try:
        pixels.append(np.stack([load_image(p, size) for p in paths]))
        errors.append(None)
      except UserError as e:
        pixels.append(np.zeros(shape, np.uint8))
        errors.append(e)
    # Every process decodes every batch together: an image is predicted only where every process
    # read it (a host's flaky read must not make it skip a collective the others enter).
    read = distributed.all_processes_mask([e is None for e in errors])
    for paths, error, ok in zip(chunk, errors, read):
      if ok:
        continue
      error = error or UserError(f"cannot read image {', '.join(paths)}: another process could "
                                 "not read it")
      if r.strict:
        raise error
      say(f"error: {error}", to_err=True)
      failed += 1
    if not read.any():
      continue
    # A fixed batch shape (unread and missing rows blank): one compilation for every chunk.
    batch = np.zeros((r.batch_size,) + shape, np.uint8)
    batch[:len(pixels)] = np.where(read[:, None, None, None, None], np.stack(pixels), 0)
    if not predictor.pairs:
      batch = batch[:, 0]
    results = predictor.generate(batch, [prompt] * r.batch_size, r.beam_size,
                                 r.max_decode_length)
    for paths, ok, result in zip(chunk, read, results):
      if not ok:
        continue
      if r.format == "json":
        record = {"image": paths[0], **({"image2": paths[1]} if len(paths) > 1 else {}),
                  "prompt": prompt, **result}
        say(json.dumps(record))
      else:
        say("\t".join(paths) + f"\t{result['prediction']}")
      done += 1
  if failed:
    say(f"{done} of {done + failed} images predicted; {failed} could not be read", to_err=True)
  if not done:
    say("error: no image could be read", to_err=True)
    return 1
  return 0


def _predict() -> int:
  console.quiet_python()
  f = flags.FLAGS
  return predict_files(Request(**{field.name: getattr(f, field.name)
                                  for field in dataclasses.fields(Request)}))


def main(argv):
  del argv
  console.own_stdout()  # its stdout is data (JSON lines): no library may print there
  run_main(_predict)


if __name__ == "__main__":
  _define_flags()
  app.run(main, argv=gin_utils.main_argv())

"""A run directory: what a training run leaves behind, and the one place that opens it.

  <model_dir>/config.gin            the run's gin config; the model is rebuilt from it
  <model_dir>/vocabulary.model      the SentencePiece model the run's text was tokenized with
  <model_dir>/vocabulary.json       {"extra_ids": N, "size": V, "source": where it was copied from}
  <model_dir>/answers.txt           a VQA classifier's answers (line i is class i)
  <model_dir>/checkpoints/<step>/   Orbax checkpoints (state and data position)

`train` writes the vocabulary (and the answers) when it starts, after checking that the model can
hold every id of it (a vocabulary may be smaller than the embedding: padded rows, as in t5x).
`predict`, `eval`, the demo and finetuning (`train.init_from`) open runs here only, so decoding
needs neither the training data nor a task registration. Paths go through epath (`gs://` works).
"""
import dataclasses
import json
from typing import Any, Optional, Sequence

import gin
import jax
import seqio
from etils import epath

from simvlm_jax import checkpoints, gin_utils
from simvlm_jax.data import vocab  # noqa: F401  (registers sentencepiece_vocabulary, bound here)
from simvlm_jax.errors import UserError
from simvlm_jax.models import ModelConfig, SimVLM
from simvlm_jax.partitioning import Partitioner

CONFIG_FILE = "config.gin"
VOCABULARY_FILE = "vocabulary.model"
VOCABULARY_INFO = "vocabulary.json"
ANSWERS_FILE = "answers.txt"
CHECKPOINTS = "checkpoints"


def find_root(path: str) -> epath.Path:
  """The run directory of `path`: the directory itself, or the run a checkpoint step belongs to."""
  path = checkpoints.absolute(path)
  for candidate in (path, path.parent.parent, path.parent.parent.parent):
    if (candidate / CONFIG_FILE).exists():
      return candidate
  raise UserError(f"{path} is not a run directory: it holds no {CONFIG_FILE} (give the model_dir "
                  "of a training run, or one of its checkpoints/<step> directories)")


# Writing (train).

def check_vocabulary(vocabulary: seqio.Vocabulary, config: ModelConfig) -> None:
  """Raises UserError when the data has token ids the model's embedding cannot hold."""
  if vocabulary.vocab_size > config.vocab_size:
    raise UserError(
        f"the vocabulary has {vocabulary.vocab_size} ids but the model embeds only "
        f"{config.vocab_size} (ModelConfig.vocab_size): set VOCAB_SIZE to at least "
        f"{vocabulary.vocab_size}, or tokenize with a smaller vocabulary "
        "(sentencepiece_vocabulary.model_path)")


def write_vocabulary(model_dir: str, vocabulary: seqio.Vocabulary) -> None:
  """Copies the SentencePiece model into the run (once; a resumed run must not change it)."""
  if not isinstance(vocabulary, seqio.SentencePieceVocabulary):
    raise UserError(f"a run's vocabulary must be a SentencePiece model, got "
                    f"{type(vocabulary).__name__}")
  source = epath.Path(vocabulary.sentencepiece_model_file)
  data = source.read_bytes()
  target = epath.Path(model_dir) / VOCABULARY_FILE
  if target.exists():
    if target.read_bytes() != data:
      raise UserError(f"{model_dir} was trained with the vocabulary in {target}, but the data is "
                      f"now tokenized with {source}: a run cannot change its vocabulary; use a new "
                      "model_dir (and train.init_from to start from this run)")
    return
  tmp = target.parent / f"{VOCABULARY_FILE}.tmp"
  tmp.write_bytes(data)
  tmp.rename(target)
  (epath.Path(model_dir) / VOCABULARY_INFO).write_text(json.dumps(
      {"extra_ids": vocabulary.extra_ids, "size": vocabulary.vocab_size, "source": str(source)},
      indent=2) + "\n")


def write_answers(model_dir: str, answers: Sequence[str]) -> None:
  (epath.Path(model_dir) / ANSWERS_FILE).write_text("\n".join(answers) + "\n")


def config_text(model_dir: str) -> str:
  """The run's gin config, naming the vocabulary copy the run's text is tokenized with."""
  text = gin.config_str()
  if (epath.Path(model_dir) / VOCABULARY_FILE).exists():
    info = json.loads((epath.Path(model_dir) / VOCABULARY_INFO).read_text())
    text += ("\n# The vocabulary the run tokenized its text with, copied into the run directory.\n"
             f"sentencepiece_vocabulary.model_path = '{epath.Path(model_dir) / VOCABULARY_FILE}'\n"
             f"sentencepiece_vocabulary.extra_ids = {info['extra_ids']}\n")
  return text


def inherit_vocabulary(init_from: str) -> Optional[str]:
  """Finetuning: tokenize with the vocabulary of the run `init_from` points at, unless the gin
  config names one. Returns the path bound, if any."""
  try:
    root = find_root(init_from)
  except UserError:
    return None  # not a run directory (e.g. a bare checkpoint): nothing to inherit
  path = root / VOCABULARY_FILE
  if not path.exists():
    return None
  try:
    if gin.query_parameter("sentencepiece_vocabulary.model_path"):
      return None
  except ValueError:
    pass  # not bound
  info = json.loads((root / VOCABULARY_INFO).read_text())
  gin.bind_parameter("sentencepiece_vocabulary.model_path", str(path))
  gin.bind_parameter("sentencepiece_vocabulary.extra_ids", info["extra_ids"])
  return str(path)


def check_same_vocabulary(init_from: str, vocabulary: seqio.Vocabulary) -> None:
  """Finetuning: the data must be tokenized as the run it starts from was."""
  try:
    path = find_root(init_from) / VOCABULARY_FILE
  except UserError:
    return
  if (path.exists() and isinstance(vocabulary, seqio.SentencePieceVocabulary) and
      epath.Path(vocabulary.sentencepiece_model_file).read_bytes() != path.read_bytes()):
    raise UserError(f"the data is tokenized with {vocabulary.sentencepiece_model_file} but "
                    f"init_from {init_from} was trained with another vocabulary ({path}): its "
                    "embeddings would read the wrong tokens; drop the sentencepiece_vocabulary "
                    "binding (finetuning then uses the pretrained run's vocabulary)")


# Reading (predict, eval, demo).

def load_vocabulary(root: epath.Path) -> Optional[seqio.SentencePieceVocabulary]:
  path = root / VOCABULARY_FILE
  if not path.exists():
    return None
  info = json.loads((root / VOCABULARY_INFO).read_text())
  return seqio.SentencePieceVocabulary(str(path), extra_ids=info["extra_ids"])


def single_device() -> Partitioner:
  """Evaluation's and prediction's default: one device of this process."""
  return Partitioner((1, 1, 1), devices=jax.local_devices()[:1])


def abstract_params(config: ModelConfig, partitioner: Partitioner) -> Any:
  """The model's parameters as ShapeDtypeStructs with their shardings (no optimizer state)."""
  from simvlm_jax.trainer import init_params  # pylint: disable=import-outside-toplevel
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  with partitioner.activate():
    boxed = jax.eval_shape(lambda rng: init_params(SimVLM(config), config, rng),
                           jax.random.PRNGKey(0))
  shardings = partitioner.shardings_for(boxed)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      nn.meta.unbox(boxed), shardings)


@dataclasses.dataclass
class Run:
  """An opened run: its model config, vocabulary, answers and the parameters of one step."""
  directory: epath.Path
  config: ModelConfig
  model: SimVLM
  vocabulary: Optional[seqio.SentencePieceVocabulary]
  answers: Optional[list[str]]
  step: Optional[int]
  params: Any

  def setting(self, name: str, default: Any = None) -> Any:
    """A binding of the run's config (e.g. "make_finetune_iterator.task_name"), macros resolved,
    or `default` when it has none."""
    return gin_utils.query(name, default)

  def decode(self, ids: Sequence[int]) -> str:
    """Text of generated ids up to EOS (ids of padded embedding rows are left out)."""
    ids = list(ids)
    ids = ids[:ids.index(1)] if 1 in ids else ids
    return self.vocabulary.decode([i for i in ids if 0 < i < self.vocabulary.vocab_size])

  def steps(self) -> list[int]:
    ckpt = checkpoints.Checkpointer(str(self.directory / CHECKPOINTS), keep=None)
    try:
      return sorted(ckpt.all_steps())
    finally:
      ckpt.close()

  def restore(self, step: Optional[int] = None,
              partitioner: Optional[Partitioner] = None) -> None:
    """Loads the parameters of `step` (default: the newest), sharded by `partitioner` (default:
    onto one device)."""
    directory = self.directory / CHECKPOINTS
    if not directory.exists():
      raise UserError(f"no checkpoint in {self.directory} (expected {directory}/<step>/)")
    ckpt = checkpoints.Checkpointer(str(directory), keep=None)
    try:
      if ckpt.latest_step() is None:
        raise UserError(f"no checkpoint in {directory}")
      step = ckpt.latest_step() if step is None else step
      partitioner = partitioner or single_device()
      self.params = ckpt.restore_params(abstract_params(self.config, partitioner), step=step)
      self.step = step
    finally:
      ckpt.close()


def open_run(path: str, step: Optional[int] = None, restore: bool = True,
             need_vocabulary: bool = True) -> Run:
  """Opens a run directory (or one of its checkpoint steps): parses its config.gin (replacing the
  current gin config), binds the run's vocabulary copy so tasks tokenize as the run did, and,
  with `restore`, loads the parameters of `step` (default: that checkpoint, else the newest)."""
  root = find_root(path)
  path = checkpoints.absolute(path)
  if step is None and root != path and path.name.isdigit():
    step = int(path.name)
  gin.clear_config()
  gin_utils.parse_gin([str(root / CONFIG_FILE)], [])
  config = ModelConfig()
  vocabulary = load_vocabulary(root)
  if vocabulary is not None:
    gin.bind_parameter("sentencepiece_vocabulary.model_path", str(root / VOCABULARY_FILE))
    gin.bind_parameter("sentencepiece_vocabulary.extra_ids", vocabulary.extra_ids)
    check_vocabulary(vocabulary, config)
  elif need_vocabulary:
    raise UserError(f"{root} holds no {VOCABULARY_FILE}: it was trained on synthetic batches or "
                    "by a version that did not save its vocabulary, so its token ids cannot be "
                    "turned into text")
  answers = None
  if (root / ANSWERS_FILE).exists():
    answers = (root / ANSWERS_FILE).read_text().splitlines()
  run = Run(root, config, SimVLM(config), vocabulary, answers, step, None)  # step: as asked
  if restore:
    run.restore(step)
  return run

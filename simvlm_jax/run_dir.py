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
import re
from typing import Any, Optional, Sequence

import gin
import jax
import seqio
from etils import epath

from simvlm_jax import checkpoints, decoding, gin_utils
from simvlm_jax.data import vocab  # noqa: F401  (registers sentencepiece_vocabulary, bound here)
from simvlm_jax.errors import UserError, one_line
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
  if check_resumed_vocabulary(model_dir, vocabulary):
    return
  source = epath.Path(vocabulary.sentencepiece_model_file)
  data = source.read_bytes()
  target = epath.Path(model_dir) / VOCABULARY_FILE
  tmp = target.parent / f"{VOCABULARY_FILE}.tmp"
  tmp.write_bytes(data)
  tmp.rename(target)
  (epath.Path(model_dir) / VOCABULARY_INFO).write_text(json.dumps(
      {"extra_ids": vocabulary.extra_ids, "size": vocabulary.vocab_size, "source": str(source)},
      indent=2) + "\n")


def check_resumed_vocabulary(model_dir: str, vocabulary: seqio.Vocabulary) -> bool:
  """Whether `model_dir` already holds this vocabulary (False: it holds none yet); a UserError
  when it holds another one. Read-only, so every process of a run can ask it."""
  target = epath.Path(model_dir) / VOCABULARY_FILE
  if not target.exists():
    return False
  source = epath.Path(vocabulary.sentencepiece_model_file)
  if target.read_bytes() != source.read_bytes():
    raise UserError(f"{model_dir} was trained with the vocabulary in {target}, but the data is "
                    f"now tokenized with {source}: a run cannot change its vocabulary; use a new "
                    "model_dir (and train.init_from to start from this run)")
  return True


def write_answers(model_dir: str, answers: Sequence[str]) -> None:
  (epath.Path(model_dir) / ANSWERS_FILE).write_text("\n".join(answers) + "\n")


def vocabulary_bindings(root: epath.Path) -> dict[str, Any]:
  """The gin bindings that tokenize with the vocabulary copy in run directory `root` ({} when it
  holds none): what its config.gin ends with, what `open_run` binds for predict and eval, and
  what finetuning from it inherits."""
  if not (root / VOCABULARY_FILE).exists():
    return {}
  info = json.loads((root / VOCABULARY_INFO).read_text())
  return {"sentencepiece_vocabulary.model_path": str(root / VOCABULARY_FILE),
          "sentencepiece_vocabulary.extra_ids": info["extra_ids"]}


def _bind(bindings: dict[str, Any]) -> None:
  for name, value in bindings.items():
    gin.bind_parameter(name, value)


def config_text(model_dir: str) -> str:
  """The run's gin config, naming the vocabulary copy the run's text is tokenized with."""
  text = gin.config_str()
  bindings = vocabulary_bindings(epath.Path(model_dir))
  if bindings:
    text += ("\n# The vocabulary the run tokenized its text with, copied into the run directory.\n"
             + "".join(f"{name} = {value!r}\n" for name, value in bindings.items()))
  return text


def inherit_vocabulary(init_from: str) -> Optional[str]:
  """Finetuning: tokenize with the vocabulary of the run `init_from` points at, unless the gin
  config names one. Returns the path bound, if any."""
  try:
    root = find_root(init_from)
  except UserError:
    return None  # not a run directory (e.g. a bare checkpoint): nothing to inherit
  bindings = vocabulary_bindings(root)
  if not bindings or gin_utils.query("sentencepiece_vocabulary.model_path"):
    return None
  _bind(bindings)
  return bindings["sentencepiece_vocabulary.model_path"]


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
  bindings = vocabulary_bindings(root)
  if not bindings:
    return None
  return seqio.SentencePieceVocabulary(bindings["sentencepiece_vocabulary.model_path"],
                                       extra_ids=bindings["sentencepiece_vocabulary.extra_ids"])


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
    """Text of generated ids up to EOS (`decoding.text_of`)."""
    return decoding.text_of(self.vocabulary, ids)

  def steps(self) -> list[int]:
    """The run's committed checkpoint steps, ascending (read-only: the run may be training)."""
    return checkpoints.CheckpointReader(str(self.directory / CHECKPOINTS)).all_steps()

  def restore(self, step: Optional[int] = None,
              partitioner: Optional[Partitioner] = None) -> None:
    """Loads the parameters of `step` (default: the newest), sharded by `partitioner` (default:
    onto one device). Read-only: a training process may be writing into the run meanwhile."""
    directory = self.directory / CHECKPOINTS
    if not directory.exists():
      raise UserError(f"no checkpoint in {self.directory} (expected {directory}/<step>/)")
    reader = checkpoints.CheckpointReader(str(directory))
    step = reader.latest_step() if step is None else step
    if step is None:
      raise UserError(f"no checkpoint in {directory}")
    partitioner = partitioner or single_device()
    self.params = reader.restore_params(abstract_params(self.config, partitioner), step=step)
    self.step = step


def parse_run_config(root: epath.Path) -> None:
  """Parses the run's config.gin as a reader needs it: the model, the vocabulary and the run's
  settings. Its `import` lines of modules outside the library (the task zoo a training run
  imported) are not executed, and bindings of configurables nobody imported are skipped: predict
  and export need no task, and `eval` imports the one it reads (`--import_modules`) first."""
  # The library's own configurables that a run's settings bind (what `Run.setting` reads).
  # pylint: disable-next=import-outside-toplevel,unused-import
  from simvlm_jax.data import finetune, pipeline, synthetic  # noqa: F401
  lines = [line for line in (root / CONFIG_FILE).read_text().splitlines()
           if not re.match(r"\s*import\s+(?!simvlm_jax\b)", line)]
  try:
    gin.parse_config(lines, skip_unknown=True)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"{root / CONFIG_FILE} cannot be parsed: {one_line(e)}") from e


def parameter_shapes(config: ModelConfig) -> dict[str, tuple]:
  """{parameter name: shape} of a model config (traced, nothing allocated)."""
  from simvlm_jax.trainer import init_params  # pylint: disable=import-outside-toplevel
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  shapes = jax.eval_shape(lambda rng: nn.meta.unbox(init_params(SimVLM(config), config, rng)),
                          jax.ShapeDtypeStruct((2,), jax.numpy.uint32))
  return {checkpoints.parameter_name(p): tuple(v.shape)
          for p, v in jax.tree_util.tree_leaves_with_path(shapes)}


def _check_same_parameters(saved: ModelConfig, config: ModelConfig) -> None:
  """The user's bindings may change how the run's model computes (dtype, attention kernel,
  remat), never its parameters."""
  if saved == config:
    return
  before, after = parameter_shapes(saved), parameter_shapes(config)
  if before != after:
    changed = sorted(f.name for f in dataclasses.fields(ModelConfig)
                     if getattr(saved, f.name) != getattr(config, f.name))
    names = sorted(set(before) ^ set(after)) or sorted(
        k for k in before if before[k] != after[k])
    raise UserError(f"the bindings change the run's parameters ({', '.join(changed)}: "
                    f"{names[0]}{' and more' if len(names) > 1 else ''}); a run's checkpoints "
                    "fit only its own model shapes: drop those bindings")


def open_run(path: str, step: Optional[int] = None, restore: bool = True,
             need_vocabulary: bool = True,
             overrides: tuple[Sequence[str], Sequence[str]] = ((), ())) -> Run:
  """Opens a run directory (or one of its checkpoint steps): parses its config.gin (replacing the
  current gin config), binds the run's vocabulary copy so tasks tokenize as the run did, and,
  with `restore`, loads the parameters of `step` (default: that checkpoint, else the newest).

  `overrides` = (gin files, bindings), e.g. the command line's, is applied over the run's config:
  it may change how the model computes (`ModelConfig.attention`, `dtype`, ...) but a binding that
  changes its parameters is refused (UserError).
  """
  root = find_root(path)
  path = checkpoints.absolute(path)
  if step is None and root != path and path.name.isdigit():
    step = int(path.name)
  gin.clear_config()
  parse_run_config(root)
  config = ModelConfig()
  files, bindings = overrides
  if files or bindings:
    gin_utils.parse_gin(list(files), list(bindings))
    saved, config = config, ModelConfig()
    _check_same_parameters(saved, config)
  vocabulary = load_vocabulary(root)
  if vocabulary is not None:
    _bind(vocabulary_bindings(root))
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

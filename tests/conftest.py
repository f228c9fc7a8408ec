"""Shared test set-up: 8 forced CPU devices, a shared compilation cache, and a tiny, fast
ModelConfig factory."""
import io
import os
import socket

# Before jax is imported anywhere: the sharding tests need 8 (CPU) devices.
# The tests compile far more than they run: LLVM optimisation level 0 (about a fifth less time),
# and XLA:CPU's older loop emitters instead of its fusion emitters (the tiny train step compiles
# in 5.1 s instead of 6.6 s and runs 20% slower; `make test` 14:54 -> 12:15 on 2 cores).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count=8 {FAST_COMPILE}").strip()
# Most of the suite's time is XLA compiling the same tiny models again and again, in this process,
# the other xdist workers and the train/eval/predict subprocesses (which inherit these variables):
# one persistent compilation cache serves them all (entries are keyed by program, devices and jax
# version, so a stale entry is never used).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import gin  # noqa: E402
import pytest  # noqa: E402

from simvlm_jax.models.config import ModelConfig  # noqa: E402


def command_xla_flags(devices: int = 1) -> str:
  """XLA_FLAGS for a command a test runs as a user would: `devices` CPU devices (not the suite's
  8), compiled as fast as the suite compiles."""
  return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"


def predict_here(**request):
  """The predict command's function (`predict.predict_files`) in this process, for its variants
  (the command itself is run as a subprocess where the user's path is tested): (stdout, stderr,
  exit status); a refused request raises UserError."""
  from simvlm_jax import predict  # pylint: disable=import-outside-toplevel
  out, err = io.StringIO(), io.StringIO()
  try:
    status = predict.predict_files(predict.Request(**request), out=out, err=err)
  finally:
    gin.clear_config()  # the run's config.gin was parsed
  return out.getvalue(), err.getvalue(), status


def free_port() -> int:
  """A free TCP port on loopback (a two-process run's coordinator)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(devices: int, **extra) -> dict:
  """The environment of a command a test runs: `devices` CPU devices, no launcher variables from
  the surrounding shell (e.g. a SLURM allocation running pytest), plus `extra`."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "SIMVLM_", "TPU_WORKER_", "JAX_COORDINATOR"))}
  env["XLA_FLAGS"] = command_xla_flags(devices)
  env.update(extra)
  return env


def pair_env(devices: int, address: str, process_id: int, **extra) -> dict:
  """`process_env` of process `process_id` of a two-process run coordinated at `address`."""
  return process_env(devices, SIMVLM_COORDINATOR_ADDRESS=address, SIMVLM_NUM_PROCESSES="2",
                     SIMVLM_PROCESS_ID=str(process_id), **extra)


# Every field is given explicitly, so gin bindings left behind by another test cannot leak in.
TINY = dict(vocab_size=64, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64, num_encoder_layers=2,
            num_decoder_layers=2, architecture="encoder_decoder", max_text_len=32, image_size=32,
            patch_size=8, patchifier="resnet", resnet_stem_width=8, resnet_stage_widths=(16, 32),
            resnet_stage_blocks=(1, 1), image_relative_position=True, dropout_rate=0.0,
            stochastic_depth_rate=0.0, decoder_stochastic_depth_rate=0.0, dtype="float32",
            attention="plain", remat="none", scan_layers=False, num_classes=0, max_images=1)


def make_tiny_config(**overrides) -> ModelConfig:
  unknown = set(overrides) - set(TINY)
  if unknown:
    raise TypeError(f"unknown ModelConfig fields {sorted(unknown)}")
  return ModelConfig(**{**TINY, **overrides})


# A small corpus for SentencePiece models trained in tests.
SENTENCES = [f"a {size} {colour} {shape} is left of a {shape}" for size in ("small", "large")
             for colour in ("red", "green", "blue") for shape in ("circle", "square", "triangle")]


def write_run(tmp_path, tiny_config, model_path, vocab_size=300):
  """A finished run directory `tmp_path/run` (config.gin as train writes it, the vocabulary, an
  initial train state saved as checkpoint 7). Returns (model_dir, its params on the host)."""
  # pylint: disable=import-outside-toplevel
  import gin
  import jax
  import seqio
  from simvlm_jax import checkpoints, run_dir
  from simvlm_jax.partitioning import Partitioner
  from simvlm_jax.trainer import Trainer
  model_dir = tmp_path / "run"
  model_dir.mkdir()
  config = tiny_config(vocab_size=vocab_size)
  gin.clear_config()
  gin.parse_config([f"ModelConfig.{k} = {v!r}" for k, v in vars(config).items()])
  run_dir.write_vocabulary(str(model_dir), seqio.SentencePieceVocabulary(model_path))
  (model_dir / "config.gin").write_text(run_dir.config_text(str(model_dir)))
  gin.clear_config()
  trainer = Trainer(config, Partitioner((1, 1, 1), devices=jax.devices()[:1]), total_steps=1)
  state = trainer.init_state()
  ckpt = checkpoints.Checkpointer(str(model_dir / "checkpoints"))
  ckpt.save(state, force=True, step=7)
  ckpt.close()
  return model_dir, jax.device_get(state.params)


@pytest.fixture(scope="session")
def tiny_config():
  """`tiny_config(**overrides) -> ModelConfig`: emb 32, 4x8 heads, mlp 64, 2+2 layers, 32px images."""
  return make_tiny_config


# The longest modules (minutes each, measured with --durations=0), longest first. `make test` sends
# each module whole to one worker (--dist loadscope), and xdist would order them by test count,
# leaving a one-test six-minute module alone at the tail; these start first instead.
LONGEST_MODULES = ("tests/test_eval.py", "tests/test_demo_e2e.py", "tests/test_multihost.py",
                   "tests/test_resume_pipeline.py", "tests/test_sharding.py",
                   "tests/test_fast_step.py", "tests/test_trainer.py", "tests/test_faults.py",
                   "tests/test_fault_commands.py", "tests/test_own_data_e2e.py")


def pytest_xdist_make_scheduler(config, log):
  """--dist loadscope with LONGEST_MODULES first (longest-first keeps every worker busy)."""
  if config.getvalue("dist") != "loadscope":
    return None
  from xdist.scheduler import LoadScopeScheduling  # pylint: disable=import-outside-toplevel

  class LongestFirst(LoadScopeScheduling):
    def _assign_work_unit(self, node):
      if not getattr(self, "_ordered", False):
        self._ordered = True
        rank = {scope: i for i, scope in enumerate(LONGEST_MODULES)}
        for scope in sorted(self.workqueue, key=lambda s: rank.get(s, len(rank))):  # stable
          self.workqueue.move_to_end(scope)
      super()._assign_work_unit(node)

  return LongestFirst(config, log)

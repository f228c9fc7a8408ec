r"""Our train step and decoding against a PyTorch + Hugging Face transformers twin, in one run.

  pip install -e '.[peer]'        # torch and transformers (never needed by `make test`)
  python benchmarks/peer_pytorch.py --model=tiny                    # 32 + 8 rows, 64 px
  python benchmarks/peer_pytorch.py --model=base --image_text_batch=4 --text_batch=2

The twin (`Twin`) is the same model in eager PyTorch: our conv stage (ResNet stem and bottleneck
stages with GroupNorm, the same widths, blocks and strided projection to the embedding) feeding
image tokens through `inputs_embeds` to a `transformers` T5 encoder-decoder of the same width,
heads, head dimension, MLP width (GELU), depths and vocabulary, with tied embeddings. T5's bucketed
relative position bias stands in for our learned text positions and 2D image bias, and T5 has no
biases and RMSNorm: the parameter counts differ by well under 1% (printed). Both train in float32
with AdamW and gradient clipping at 1.0, on the same images and token rows split the PrefixLM way
(our step draws its own split per row; the shapes, and so the work, are the same).

Timing is interleaved: each round times `--steps` of our steps, then `--steps` of the twin's (the
median of each), and the figures are each side's best round with the spread of all rounds; the
ratio is ours over theirs (below 1: we are faster). Decoding: greedy and beam search (4 beams) of
`--decode_tokens` tokens after an image and a 3-token prompt, EOS never chosen on either side (our
EOS logit masked as `benchmarks/decode.py` does; `generate` with min_new_tokens = max_new_tokens),
batch 1 and `--decode_batch`: our jitted decode with its KV cache against `generate` (with its
cache). The last line is `key=value` pairs.
"""
import argparse
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from simvlm_jax import console  # noqa: E402

console.quiet_native()

import jax  # noqa: E402
import numpy as np  # noqa: E402

try:
  import torch  # noqa: E402
  import transformers  # noqa: E402
except ImportError as e:
  sys.exit(f"error: {e.name} is not installed: pip install -e '.[peer]'")

import decode as decode_bench  # noqa: E402  (benchmarks/decode.py)
import train_step  # noqa: E402  (benchmarks/train_step.py)
from simvlm_jax import gin_utils  # noqa: E402
from simvlm_jax.data.synthetic import synthetic_batch  # noqa: E402
from simvlm_jax.models import SimVLM  # noqa: E402
from simvlm_jax.models.param_count import count_params  # noqa: E402

EOS_ID = 1


def _group_norm(channels: int) -> torch.nn.GroupNorm:
  return torch.nn.GroupNorm(math.gcd(32, channels), channels)


class Bottleneck(torch.nn.Module):
  """`simvlm_jax.models.conv_stage.BottleneckBlock`: 1x1, 3x3 (strided), 1x1, GroupNorm."""

  def __init__(self, in_channels: int, width: int, stride: int):
    super().__init__()
    mid = width // 4
    self.body = torch.nn.Sequential(
        torch.nn.Conv2d(in_channels, mid, 1, bias=False), _group_norm(mid), torch.nn.ReLU(),
        torch.nn.Conv2d(mid, mid, 3, stride, padding=1, bias=False), _group_norm(mid),
        torch.nn.ReLU(), torch.nn.Conv2d(mid, width, 1, bias=False), _group_norm(width))
    self.proj = None
    if in_channels != width or stride != 1:
      self.proj = torch.nn.Sequential(torch.nn.Conv2d(in_channels, width, 1, stride, bias=False),
                                      _group_norm(width))

  def forward(self, x):
    return torch.relu((x if self.proj is None else self.proj(x)) + self.body(x))


class ConvStage(torch.nn.Module):
  """`simvlm_jax.models.conv_stage.ResNetStage`: `[b, 3, H, W]` -> `[b, tokens, embed]`."""

  def __init__(self, config):
    super().__init__()
    c = config
    layers = [torch.nn.Conv2d(3, c.resnet_stem_width, 7, 2, padding=3, bias=False),
              _group_norm(c.resnet_stem_width), torch.nn.ReLU(),
              torch.nn.MaxPool2d(3, 2, padding=1)]
    channels = c.resnet_stem_width
    for s, (width, blocks) in enumerate(zip(c.resnet_stage_widths, c.resnet_stage_blocks)):
      for b in range(blocks):
        layers.append(Bottleneck(channels, width, 2 if (s > 0 and b == 0) else 1))
        channels = width
    rest = c.patch_size // (4 * 2 ** max(len(c.resnet_stage_widths) - 1, 0))
    layers.append(torch.nn.Conv2d(channels, c.emb_dim, rest, rest))
    self.layers = torch.nn.Sequential(*layers)

  def forward(self, images):
    x = self.layers(images)
    return x.flatten(2).transpose(1, 2)


class Twin(torch.nn.Module):
  """Conv stage + a transformers T5 of our dimensions; image tokens enter as `inputs_embeds`."""

  def __init__(self, config):
    super().__init__()
    self.conv = ConvStage(config)
    self.t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=config.vocab_size, d_model=config.emb_dim, d_kv=config.head_dim,
        d_ff=config.mlp_dim, num_layers=config.num_encoder_layers,
        num_decoder_layers=config.num_decoder_layers, num_heads=config.num_heads,
        feed_forward_proj="gelu", dropout_rate=0.0, tie_word_embeddings=True,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=EOS_ID))

  def encoder_inputs(self, images, prefix):
    """(inputs_embeds `[b, tokens + Lp, embed]`, attention_mask) of images (or None) + prefix."""
    embeds, mask = self.t5.shared(prefix), (prefix > 0).long()
    if images is not None:
      x = (images.permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.25
      tokens = self.conv(x)
      embeds = torch.cat([tokens, embeds], 1)
      mask = torch.cat([torch.ones(tokens.shape[:2], dtype=torch.long), mask], 1)
    return embeds, mask

  def loss_sum(self, images, prefix, decoder_inputs, targets):
    """Summed token cross-entropy and the number of target tokens."""
    embeds, mask = self.encoder_inputs(images, prefix)
    logits = self.t5(inputs_embeds=embeds, attention_mask=mask,
                     decoder_input_ids=decoder_inputs).logits
    weights = (targets > 0).float()
    losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                               reduction="none")
    return (losses * weights.flatten()).sum(), weights.sum()


def prefix_lm_split(tokens: np.ndarray, rng: np.random.Generator, min_prefix: int):
  """(prefix, decoder inputs, targets) `[b, L]` each, split at a uniform k per row as
  `simvlm_jax.objectives.prefix_lm` does."""
  rows, length = tokens.shape
  prefix, targets = np.zeros_like(tokens), np.zeros_like(tokens)
  for i, row in enumerate(tokens):
    n = int(np.count_nonzero(row))
    k = rng.integers(min(min_prefix, n - 1), n) if n > 1 else 0
    prefix[i, :k] = row[:k]
    targets[i, :n - k] = row[k:n]
  decoder_inputs = np.pad(targets[:, :-1], ((0, 0), (1, 0)))
  return prefix, decoder_inputs, targets


def torch_batch(batch: dict, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  out = {}
  for kind, sub in batch.items():
    parts = prefix_lm_split(sub["text_tokens"], rng, 0 if "images" in sub else 1)
    out[kind] = {"images": torch.from_numpy(sub["images"]) if "images" in sub else None,
                 **dict(zip(("prefix", "decoder_inputs", "targets"),
                            (torch.from_numpy(p.astype(np.int64)) for p in parts)))}
  return out


def torch_step(twin: Twin, optimizer, batch: dict) -> float:
  total, count = 0.0, 0.0
  for sub in batch.values():
    loss, n = twin.loss_sum(sub["images"], sub["prefix"], sub["decoder_inputs"], sub["targets"])
    total, count = total + loss, count + n
  loss = total / count
  optimizer.zero_grad(set_to_none=True)
  loss.backward()
  torch.nn.utils.clip_grad_norm_(twin.parameters(), 1.0)
  optimizer.step()
  return float(loss.detach())


def _median_time(fn, repeats: int) -> float:
  """The median time of `fn(i)` for i in range(repeats)."""
  times = []
  for i in range(repeats):
    t = time.perf_counter()
    fn(i)
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def _best_and_spread(rounds: list) -> tuple[float, str]:
  return min(rounds), f"{min(rounds):.4f}-{max(rounds):.4f}"


def compare_steps(args, bindings, result: dict):
  """Times our step and the twin's, interleaved; returns (config, our parameters, twin)."""
  config, _, trainer, state, shapes, batches = train_step.setup(args, bindings)
  twin = Twin(config)
  optimizer = torch.optim.AdamW(twin.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                                weight_decay=0.01)
  peer_batches = [torch_batch(synthetic_batch(0, i, **shapes), seed=i) for i in range(2)]
  holder = [state]  # our step donates its input state

  def ours(i):
    holder[0], metrics = trainer.train_step(holder[0], batches[i % 2])
    jax.block_until_ready(metrics["loss"])

  def peer(i):
    torch_step(twin, optimizer, peer_batches[i % 2])

  for i in range(args.warmup):  # compiles ours; warms the twin's allocator
    ours(i)
    peer(i)
  ours_rounds, peer_rounds = [], []
  for _ in range(args.rounds):
    ours_rounds.append(_median_time(ours, args.steps))
    peer_rounds.append(_median_time(peer, args.steps))
  ours_s, ours_spread = _best_and_spread(ours_rounds)
  peer_s, peer_spread = _best_and_spread(peer_rounds)
  peer_params = sum(p.numel() for p in twin.parameters())
  result.update(params=count_params(config), peer_params=peer_params, step_s=round(ours_s, 4),
                peer_step_s=round(peer_s, 4), step_ratio=round(ours_s / peer_s, 3),
                step_s_spread=ours_spread, peer_step_s_spread=peer_spread)
  print(f"{args.model} train step ({args.image_text_batch} + {args.text_batch} rows): ours "
        f"{ours_s * 1e3:.1f} ms (rounds {ours_spread} s), PyTorch {peer_s * 1e3:.1f} ms (rounds "
        f"{peer_spread} s): ours / theirs = {ours_s / peer_s:.3f}; parameters "
        f"{count_params(config) / 1e6:.2f}M vs {peer_params / 1e6:.2f}M", flush=True)
  return config, holder[0].params, twin


def compare_decoding(args, config, params, twin: Twin, result: dict) -> None:
  model = decode_bench._never_eos(SimVLM(config))  # pylint: disable=protected-access
  twin.eval()
  tokens = args.decode_tokens
  for method, beams in (("greedy", 1), ("beam", 4)):
    for batch in (1, args.decode_batch):
      images = torch.zeros((batch, config.image_size, config.image_size, 3), dtype=torch.uint8)
      prompt = torch.tensor([[5, 6, 7]] * batch)

      def peer(_):
        with torch.inference_mode():
          embeds, mask = twin.encoder_inputs(images, prompt)
          out = twin.t5.generate(inputs_embeds=embeds, attention_mask=mask, num_beams=beams,
                                 do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens)
        assert out.shape[1] == tokens + 1, out.shape  # the start token + every token asked for
      peer(0)
      ours_rounds, peer_rounds = [], []
      for _ in range(args.rounds):
        ours_rounds.append(decode_bench.time_decode(model, params, batch, tokens, method,
                                                    args.decode_repeats))
        peer_rounds.append(_median_time(peer, args.decode_repeats))
      ours_s, peer_s = min(ours_rounds), min(peer_rounds)
      key = f"{method}_b{batch}"
      result.update({f"{key}_tok_s": round(batch * tokens / ours_s, 1),
                     f"{key}_peer_tok_s": round(batch * tokens / peer_s, 1),
                     f"{key}_ratio": round(ours_s / peer_s, 3)})
      print(f"{args.model} {method} decoding, batch {batch}, {tokens} tokens: ours "
            f"{batch * tokens / ours_s:.1f} tokens/s, generate {batch * tokens / peer_s:.1f} "
            f"tokens/s: ours / theirs (time) = {ours_s / peer_s:.3f}", flush=True)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  train_step.add_batch_flags(p)
  p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (best of each side)")
  p.add_argument("--decode_tokens", type=int, default=32)
  p.add_argument("--decode_batch", type=int, default=32)
  p.add_argument("--decode_repeats", type=int, default=3)
  p.add_argument("--no_decode", action="store_true", help="the train step only")
  args, rest = p.parse_known_args()
  bindings = [a[len("--gin_bindings="):] for a in gin_utils.rewrite_gin_args(rest)
              if a.startswith("--gin_bindings=")]
  torch.manual_seed(0)
  result = dict(model=args.model, torch=torch.__version__, transformers=transformers.__version__,
                torch_threads=torch.get_num_threads(), jax=jax.__version__,
                device=jax.devices()[0].device_kind.replace(" ", "_"))
  config, params, twin = compare_steps(args, bindings, result)
  if not args.no_decode:
    compare_decoding(args, config, params, twin, result)
  print(" ".join(f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
  main()

"""Parameter counts from `jax.eval_shape` against a closed-form formula in the model dimensions."""
import functools
import os

import pytest

from simvlm_jax.models import param_count
from simvlm_jax.models.config import ModelConfig

GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin", "models")


def expected_counts(c: ModelConfig) -> dict:
  """Closed form, from the module structure (bias-free Dense layers, pre-LN Transformer)."""
  D, H, dh, F = c.emb_dim, c.num_heads, c.head_dim, c.mlp_dim
  attention = 4 * D * H * dh  # query, key, value [D, H, dh] and out [H, dh, D]; no biases
  mlp = 2 * D * F  # wi [D, F], wo [F, D]; no biases
  norm = 2 * D  # LayerNorm scale + bias
  grid = c.image_size // c.patch_size
  rel_bias = (2 * grid - 1) ** 2 * H if c.image_relative_position else 0
  encoder_layer = attention + mlp + 2 * norm + rel_bias  # pre-attention, pre-mlp norms
  decoder_layer = 2 * attention + mlp + 3 * norm  # pre-self, pre-cross, pre-mlp norms

  embeddings = c.vocab_size * D + c.max_text_len * D + grid * grid * D  # tied token, text, image

  if c.patchifier == "linear":
    conv = c.patch_size ** 2 * 3 * D + D
  else:
    gn = lambda ch: 2 * ch  # GroupNorm scale + bias
    w = c.resnet_stem_width
    conv = 7 * 7 * 3 * w + gn(w)  # stem conv (no bias) + norm
    in_ch = w
    for s, (width, blocks) in enumerate(zip(c.resnet_stage_widths, c.resnet_stage_blocks)):
      mid = width // 4
      for b in range(blocks):
        stride = 2 if (s > 0 and b == 0) else 1
        conv += in_ch * mid + gn(mid)  # 1x1 in -> mid
        conv += 3 * 3 * mid * mid + gn(mid)  # 3x3 mid -> mid
        conv += mid * width + gn(width)  # 1x1 mid -> out
        if in_ch != width or stride != 1:
          conv += in_ch * width + gn(width)  # projection shortcut
        in_ch = width
    conv_stride = 4 * 2 ** (len(c.resnet_stage_widths) - 1)
    k = c.patch_size // conv_stride
    conv += k * k * in_ch * D + D  # final strided projection to embed, with bias

  if c.architecture == "encoder_decoder":
    stacks = {"encoder": c.num_encoder_layers * encoder_layer + norm,
              "decoder": c.num_decoder_layers * decoder_layer + norm}
  else:
    stacks = {"stack": (c.num_encoder_layers + c.num_decoder_layers) * encoder_layer + norm}
  return {**stacks, "conv stage": conv, "embeddings": embeddings}


def gin_config(size: str) -> ModelConfig:
  return param_count.config_from_gin(os.path.join(GIN_DIR, f"simvlm_{size}.gin"))


@functools.lru_cache(maxsize=None)
def gin_counts(size: str) -> dict:
  """eval_shape counts per part of a gin size (cached: tracing Huge takes a few seconds)."""
  return param_count.count_params_by_part(gin_config(size))


@pytest.mark.parametrize("size", ["tiny", "base", "large", "huge"])
def test_gin_sizes_match_formula(size):
  assert gin_counts(size) == expected_counts(gin_config(size))


def test_gin_sizes_are_what_the_files_say():
  base, huge = gin_config("base"), gin_config("huge")
  assert (base.emb_dim, base.num_encoder_layers, base.vocab_size) == (768, 12, 32128)
  assert (huge.emb_dim, huge.num_heads, huge.head_dim, huge.mlp_dim) == (1280, 16, 80, 5120)
  counts = {s: sum(gin_counts(s).values()) for s in ("tiny", "base", "large", "huge")}
  assert counts["tiny"] < counts["base"] < counts["large"] < counts["huge"]
  assert 1.4e9 <= counts["huge"] <= 1.6e9, counts["huge"]


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(patchifier="linear"),
    dict(architecture="decoder_only"),
    dict(image_relative_position=False),
    dict(architecture="decoder_only", image_relative_position=False, patchifier="linear"),
    dict(resnet_stage_widths=(16,), resnet_stage_blocks=(2,)),  # 1 stage, 4x4 final projection
    dict(resnet_stage_widths=(8, 16, 32), resnet_stage_blocks=(2, 1, 3), patch_size=16,
         image_size=64),  # stem width == first stage width: no projection in stage 0
    dict(num_encoder_layers=3, num_decoder_layers=1, mlp_dim=48, head_dim=6),
])
def test_variants_match_formula(tiny_config, overrides):
  config = tiny_config(**overrides)
  expect = expected_counts(config)
  assert param_count.count_params_by_part(config) == expect
  assert param_count.count_params(config) == sum(expect.values())


def test_tiny_hand_total(tiny_config):
  # The default tiny test config, added up by hand once:
  #   embeddings 64*32 + 32*32 + 16*32 = 3584
  #   encoder layer 4*32*32 + 2*32*64 + 4*32 + 49*4 = 8516 -> 2 layers + final norm = 17096
  #   decoder layer 8*32*32 + 2*32*64 + 6*32 = 12480 -> 2 layers + final norm = 25024
  #   conv: stem 1176 + 16; stage0 (8->16, mid 4) 32+8 + 144+8 + 64+32 + 128+32 = 448;
  #         stage1 (16->32, mid 8) 128+16 + 576+16 + 256+64 + 512+64 = 1632; proj 1*1*32*32 + 32
  #         = 1192 + 448 + 1632 + 1056 = 4328
  assert param_count.count_params(tiny_config()) == 3584 + 17096 + 25024 + 4328


def test_main_prints_a_line_per_gin_file(capsys):
  param_count.main([os.path.join(GIN_DIR, "simvlm_tiny.gin")])
  line = capsys.readouterr().out.strip()
  n = param_count.count_params(gin_config("tiny"))
  assert n == sum(gin_counts("tiny").values())
  assert line.startswith(f"simvlm_tiny: {n:,} params (encoder ")
  for part in ("decoder", "conv stage", "embeddings"):
    assert part in line
  # Without arguments it walks gin/models, smallest size first.
  names = [os.path.basename(p) for p in param_count._gin_files(GIN_DIR)]
  sizes = [n for n in names if n in {f"simvlm_{s}.gin" for s in ("tiny", "base", "large", "huge")}]
  assert sizes == ["simvlm_tiny.gin", "simvlm_base.gin", "simvlm_large.gin", "simvlm_huge.gin"]

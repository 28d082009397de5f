"""Parameter counts of every scale (n, s, m, l, x), layer by layer, with their derivation.

Sources of the expected numbers (docs/architecture.md, "Parameter counts"):

* The YOLO11 layers (0-7, 9, 10, 13, 17, 20: the same modules with the same inputs as YOLO11's) equal
  Ultralytics' own per-layer counts of yolo11{n,s,m,l,x}.yaml, computed once with ultralytics 8.4.190 and
  torch 2.13.0 (CPU) by the command in docs/architecture.md; `YOLO11_LAYERS` holds those numbers.
* The OptiSAR-Net++ layers (8 PL-MoE, 16/19/22 TGDF-SSA, 23 head without SAVPE) are counted below from
  the reference's module definitions (`plmoe`, `tgdf_ssa`, `head`), independently of our modules.

Counts are nnx.Param scalars (BatchNorm running statistics are buffers in both frameworks); the reference
also counts the 16 weights of its frozen DFL conv, which `TOTALS` includes. The model is built abstractly.
"""

import math

import pytest

from optisar_jax.config import load_config
from optisar_jax.models.moe import router_width
from optisar_jax.models.summary import build_abstract_model, count_params, layer_param_counts

# Ultralytics 8.4.190: [sum(p.numel() for p in layer.parameters()) for layer in DetectionModel(yaml).model]
YOLO11_LAYERS = {
    'n': [464, 4672, 6640, 36992, 26080, 147712, 87040, 295424, 346112, 164608, 249728, 0, 0, 111296, 0, 0,
          32096, 36992, 0, 86720, 147712, 0, 378880, 464912],
    's': [928, 18560, 26080, 147712, 103360, 590336, 346112, 1180672, 1380352, 656896, 990976, 0, 0, 443776,
          0, 0, 127680, 147712, 0, 345472, 590336, 0, 1511424, 850368],
    'm': [1856, 73984, 111872, 590336, 444928, 2360320, 1380352, 2360320, 1380352, 656896, 990976, 0, 0,
          1642496, 0, 0, 542720, 590336, 0, 1511424, 2360320, 0, 1642496, 1472704],
    'l': [1856, 73984, 173824, 590336, 691712, 2360320, 2234368, 2360320, 2234368, 656896, 1455616, 0, 0,
          2496512, 0, 0, 756736, 590336, 0, 2365440, 2360320, 0, 2496512, 1472704],
    'x': [2784, 166272, 389760, 1327872, 1553664, 5309952, 5022720, 5309952, 5022720, 1476864, 3264768, 0, 0,
          5612544, 0, 0, 1700352, 1327872, 0, 5317632, 5309952, 0, 5612544, 3237952],
}
YOLO11_TOTALS = {'n': 2_624_080, 's': 9_458_752, 'm': 20_114_688, 'l': 25_372_160, 'x': 56_966_176}
SHARED_LAYERS = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 17, 18, 20, 21)

# The reference's convention (PyTorch parameters() without SAVPE, with the 16 frozen DFL weights).
TOTALS = {'n': 7_130_828, 's': 16_131_456, 'm': 28_123_336, 'l': 34_610_443, 'x': 71_354_627}
DFL = 16

# ------------------------------------------------------------- the reference's modules, counted by hand

SCALES = {'n': (0.50, 0.25, 1024), 's': (0.50, 0.50, 1024), 'm': (0.50, 1.00, 512), 'l': (1.00, 1.00, 512),
          'x': (1.00, 1.50, 512)}


def conv(c1, c2, k=1, groups=1):
  """Ultralytics Conv: bias-free conv + BatchNorm (weight, bias)."""
  return c1 // groups * k * k * c2 + 2 * c2


def linear(c1, c2):
  """nn.Linear, or a 1x1 nn.Conv2d with bias."""
  return c1 * c2 + c2


def plmoe(c1, c2, n, experts=8, rank=256, reduction=4):
  """PLoRA_MoE(c1, c2, n, e=0.5) with n DAAM_SharedLoRA_MoE_Block(c = c2 / 2)."""
  c = c2 // 2
  mid, proj = c // reduction, min(c // 2, 256)              # DAA width; CosineTopKGate's proj_dim
  daa = linear(c, mid) + linear(mid, c) + linear(c, mid) + 2 * mid + linear(mid, 1)
  gate = linear(c, proj) + proj * experts + 1 + c * experts  # projector, sim_matrix, temperature, w_noise
  lora = experts * rank * (c // 2) * 2 + experts * rank * c * 2 + 1
  shared = 9 * c * (c // 2) + 2 * (c // 2) + 9 * (c // 2) * c + 2 * c
  block = 2 * (2 * c) + daa + 2 * c + gate + lora + shared   # norm1, norm2, DAA, layer scales, MoE
  return conv(c1, 2 * c) + conv((2 + n) * c, c2) + n * block


def tgdf_ssa(c1, c2, n, ec=256, nh=4, groups=32, hidden=512, text=512):
  """TGDG_SSA(c1, c2, n, ec, nh, groups, use_enhanced_guide, gc=512, e=0.5)."""
  c = c2 // 2
  ssa = 4 * (c1 // groups // 2)
  bottleneck = conv(c, c // 2, 3) + conv(c // 2, c, 3)
  guide = linear(text, hidden) + 2 * hidden + linear(hidden, ec) + 2 * ec
  attn = (conv(c, ec) if c != ec else 0) + guide + nh + 1 + 2 * nh + conv(c, c, 3)
  return ssa + conv(c1, 2 * c) + n * bottleneck + attn + conv((3 + n) * c, c2)


def head(ch, embed=512, reg_max=16, nc=16, swiglu=2048, region_hidden=256, regions=(16, 4, 4)):
  """OptiSARNetPlusPlusDetect without SAVPE and without the frozen DFL conv."""
  box, cls = max(16, ch[0] // 4, 4 * reg_max), max(ch[0], min(nc, 100))
  total = linear(embed, swiglu) + linear(swiglu // 2, embed)   # reprta
  for x, r in zip(ch, regions):
    total += conv(x, box, 3) + conv(box, box, 3) + linear(box, 4 * reg_max)
    total += conv(x, x, 3, x) + conv(x, cls) + conv(cls, cls, 3, cls) + conv(cls, cls) + linear(cls, embed)
    total += 2 * embed + 2                                       # BNContrastiveHead: norm, bias, logit_scale
    total += linear(embed, region_hidden) + linear(region_hidden, r)
  return total


def optisar_layers(scale):
  """Reference layer counts of the OptiSAR-Net++ yaml at `scale`: YOLO11's where the module is the same."""
  depth, width, max_channels = SCALES[scale]
  ch = lambda c: int(math.ceil(min(c, max_channels) * width / 8) * 8)
  reps = lambda n: max(round(n * depth), 1) if n > 1 else n
  layers = list(YOLO11_LAYERS[scale][:23]) + [0]
  layers[8] = plmoe(ch(1024), ch(1024), reps(2))
  layers[16] = tgdf_ssa(ch(512) + ch(512), ch(256), reps(3))
  layers[19] = tgdf_ssa(ch(256) + ch(512), ch(512), reps(3))
  layers[22] = tgdf_ssa(ch(512) + ch(1024), ch(1024), reps(3))
  layers[23] = head((ch(256), ch(512), ch(1024)))
  return layers


# ---------------------------------------------------------------------------------------------- tests

def test_hand_counts_reproduce_the_design_numbers_at_scale_m():
  layers = optisar_layers('m')
  assert layers[8] == 2_908_099
  assert (layers[16], layers[19], layers[22]) == (1_299_277, 3_217_725, 3_348_813)
  assert layers[23] == 3_784_414
  assert sum(YOLO11_LAYERS['m']) == YOLO11_TOTALS['m'] == 20_114_688


def test_router_width_follows_the_block_width():
  assert [router_width(c) for c in (128, 256, 384, 1024)] == [64, 128, 192, 256]
  assert router_width(256, 16) == 16
  with pytest.raises(ValueError, match='model.moe.gate_dim'):
    router_width(256, -1)


@pytest.mark.parametrize('scale', ['n', 's', 'm', 'l', 'x'])
def test_every_scale_layer_by_layer(scale):
  config = load_config('configs/optsar_rsvg.py')
  config.model.scale = scale
  model = build_abstract_model(config)
  counts = layer_param_counts(model)
  assert [counts[i] for i in SHARED_LAYERS] == [YOLO11_LAYERS[scale][i] for i in SHARED_LAYERS]
  assert counts == optisar_layers(scale)
  assert count_params(model) + DFL == sum(optisar_layers(scale)) + DFL == TOTALS[scale]

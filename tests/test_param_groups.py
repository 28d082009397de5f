"""Optimizer parameter groups of the REAL scale-m model against the reference's rule on the reference's names.

The reference (Ultralytics `BaseTrainer.build_optimizer`) walks `model.named_modules()` and, for each
parameter with full name `module.param`:

    'bias' in name                                   -> bias     (no decay)
    module is a torch.nn *Norm* class, or 'logit_scale' in name -> no_decay
    otherwise                                        -> decay

`reference_name` below is the map from our parameter paths to the reference's names (docs/architecture.md,
"Parameter names"). The test applies the reference rule to the mapped names and compares with our groups,
parameter by parameter, and pins the group sizes (parameter counts per group). The model is built
abstractly (`grounding.abstract_model`: no FLOPs, no memory).
"""

import math
import re

import jax
import pytest
from flax import nnx

from optisar_jax.config import load_config
from optisar_jax.grounding import abstract_model
from optisar_jax.runtime.sharding import path_to_str
from optisar_jax.train import optimizer

# ------------------------------------------------------------------------------- our name -> reference's

# Per-module renames of path pieces, applied to the path below `detector/layers/<i>/` (our '/'-joined
# path) before '/' becomes '.'. Layer kinds by index (the reference yaml's rows).
_PLMOE = 8
_HEAD = 23

_COMMON = [
    (r'(^|/)ffn1/', r'\1ffn/0/'),                                   # PSABlock: ffn = Sequential(Conv, Conv)
    (r'(^|/)ffn2/', r'\1ffn/1/'),
    # TGDF-SSA attention: EnhancedGuideProjection.proj = Sequential(Linear, LN, GELU, Identity, Linear, LN)
    (r'attn/gl/fc1/', 'attn/gl/proj/0/'),
    (r'attn/gl/ln1/', 'attn/gl/proj/1/'),
    (r'attn/gl/fc2/', 'attn/gl/proj/4/'),
    (r'attn/gl/ln2/', 'attn/gl/proj/5/'),
]
_PLMOE_RULES = [
    # PLoRA_MoE's cv1 / cv2 are Sequential(Conv2d, BatchNorm2d, SiLU), not ultralytics Conv.
    (r'^(cv[12])/conv/', r'\1/0/'),
    (r'^(cv[12])/bn/', r'\1/1/'),
    # DualAdaptiveAttention: channel_attn = Sequential(pool, flatten, Linear, ReLU, Linear, Sigmoid),
    # spatial_attn = Sequential(Conv2d, BatchNorm2d, ReLU, Conv2d, Sigmoid).
    (r'/daa/fc1/', '/daa/channel_attn/2/'),
    (r'/daa/fc2/', '/daa/channel_attn/4/'),
    (r'/daa/sa_conv1/', '/daa/spatial_attn/0/'),
    (r'/daa/sa_bn/', '/daa/spatial_attn/1/'),
    (r'/daa/sa_conv2/', '/daa/spatial_attn/3/'),
    # CosineTopKGate.cosine_projector; w_noise belongs to PatchSharedLoRAMoE, not to its gate.
    (r'/moe/gate/projector/', '/moe/gate/cosine_projector/'),
    (r'/moe/gate/w_noise$', '/moe/w_noise'),
    # SharedLoRAExperts: shared_conv1 = Sequential(Conv2d, BN, SiLU), shared_conv2 = Sequential(Conv2d, BN).
    (r'/moe/experts/conv([12])/conv/', r'/moe/experts/shared_conv\1/0/'),
    (r'/moe/experts/conv([12])/bn/', r'/moe/experts/shared_conv\1/1/'),
    (r'/lora([12])_a$', r'/lora\1_A'),
    (r'/lora([12])_b$', r'/lora\1_B'),
]
_HEAD_RULES = [
    # Detect.cv2[i] = Sequential(Conv, Conv, Conv2d)
    (r'^box/(\d+)/conv1/', r'cv2/\1/0/'),
    (r'^box/(\d+)/conv2/', r'cv2/\1/1/'),
    (r'^box/(\d+)/pred/', r'cv2/\1/2/'),
    # cv3[i] = Sequential(Sequential(DWConv, Conv), Sequential(DWConv, Conv), Conv2d)
    (r'^cls/(\d+)/dw1/', r'cv3/\1/0/0/'),
    (r'^cls/(\d+)/pw1/', r'cv3/\1/0/1/'),
    (r'^cls/(\d+)/dw2/', r'cv3/\1/1/0/'),
    (r'^cls/(\d+)/pw2/', r'cv3/\1/1/1/'),
    (r'^cls/(\d+)/pred/', r'cv3/\1/2/'),
    (r'^contrast/(\d+)/', r'cv4/\1/'),                              # BNContrastiveHead: norm, bias, logit_scale
    # SpatialGridHead.grid_head = Sequential(Conv2d, ReLU, Conv2d)
    (r'^region/(\d+)/fc1/', r'cv_region/\1/grid_head/0/'),
    (r'^region/(\d+)/fc2/', r'cv_region/\1/grid_head/2/'),
    (r'^refine/', 'reprta/m/'),                                    # Residual(SwiGLUFFN): reprta.m.w12 / w3
]

# Reference names of the parameters owned by a torch.nn *Norm* module (BatchNorm2d, LayerNorm).
_REFERENCE_NORM = re.compile(
    r'(\.bn|\.norm[12]?|spatial_attn\.1|shared_conv[12]\.1|^model\.8\.cv[12]\.1|gl\.proj\.[15])\.(weight|bias)$')


def reference_name(path: str) -> str:
  """Our parameter path ('detector/layers/16/ssa/bias_avg') -> the reference's ('model.16.ssa.bias_avg').

  Leaves: flax `kernel` -> torch `weight`; a norm's `scale` -> `weight`; `bias` stays `bias`.
  """
  match = re.fullmatch(r'detector/layers/(\d+)/(.+)', path)
  if match is None:
    raise ValueError(f'not a detector parameter: {path}')
  index, rest = int(match.group(1)), match.group(2)
  rules = _COMMON + (_PLMOE_RULES if index == _PLMOE else []) + (_HEAD_RULES if index == _HEAD else [])
  for pattern, replacement in rules:
    rest = re.sub(pattern, replacement, rest)
  rest = re.sub(r'(^|/)kernel$', r'\1weight', rest)
  rest = re.sub(r'(^|/)scale$', r'\1weight', rest)   # only norms own a leaf called 'scale' here
  return f'model.{index}.' + rest.replace('/', '.')


def reference_group(name: str) -> str:
  """The reference's rule on a reference parameter name."""
  if 'bias' in name:
    return optimizer.GROUP_BIAS
  if _REFERENCE_NORM.search(name) or 'logit_scale' in name:
    return optimizer.GROUP_NO_DECAY
  return optimizer.GROUP_DECAY


# ------------------------------------------------------------------------------------------------ tests

# Group sizes (parameter scalars) of the scale-m detector, configs/optsar_rsvg.py, text width 512.
# Reference groups = optim.decay_tgdg_gates True; our default moves the 3 layers x 2 gates x 4 heads = 24
# gate scalars from 'decay' to 'no_decay'.
REFERENCE_GROUP_SIZES_M = {'decay': 28_061_301, 'no_decay': 27_011, 'bias': 35_008}
GATE_SCALARS_M = 24


@pytest.fixture(scope='module')
def scale_m():
  config = load_config('configs/optsar_rsvg.py')
  return config, abstract_model(config)


def _flat(tree):
  return {path_to_str(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _sizes(groups, params):
  sizes = {optimizer.GROUP_DECAY: 0, optimizer.GROUP_NO_DECAY: 0, optimizer.GROUP_BIAS: 0}
  for name, group in groups.items():
    sizes[group] += math.prod(params[name].shape)
  return sizes


def test_reference_name_examples():
  assert reference_name('detector/layers/16/ssa/bias_avg') == 'model.16.ssa.bias_avg'
  assert reference_name('detector/layers/8/m/0/moe/gate/w_noise') == 'model.8.m.0.moe.w_noise'
  assert reference_name('detector/layers/8/cv1/bn/scale') == 'model.8.cv1.1.weight'
  assert reference_name('detector/layers/8/m/0/moe/experts/conv2/conv/kernel') == (
      'model.8.m.0.moe.experts.shared_conv2.0.weight')
  assert reference_name('detector/layers/10/m/0/ffn2/bn/bias') == 'model.10.m.0.ffn.1.bn.bias'
  assert reference_name('detector/layers/19/attn/gl/ln2/scale') == 'model.19.attn.gl.proj.5.weight'
  assert reference_name('detector/layers/23/cls/2/dw2/conv/kernel') == 'model.23.cv3.2.1.0.conv.weight'
  assert reference_name('detector/layers/23/contrast/1/logit_scale') == 'model.23.cv4.1.logit_scale'
  assert reference_name('detector/layers/23/refine/w3/bias') == 'model.23.reprta.m.w3.bias'


def test_every_parameter_is_in_the_reference_group(scale_m):
  """Our groups with decay_tgdg_gates=True equal the reference rule on the reference names, for every
  parameter of the scale-m model; no two of our parameters map to one reference name."""
  config, model = scale_m
  params = _flat(nnx.state(model, nnx.Param))
  ours = _flat(optimizer.param_groups(model, decay_gates=True))
  names = {path: reference_name(path) for path in params}
  assert len(set(names.values())) == len(names)
  mismatched = {path: (ours[path], reference_group(names[path])) for path in params
                if ours[path] != reference_group(names[path])}
  assert not mismatched
  assert _sizes(ours, params) == REFERENCE_GROUP_SIZES_M
  assert sum(REFERENCE_GROUP_SIZES_M.values()) == 28_123_320


def test_default_groups_differ_only_in_the_gates(scale_m):
  config, model = scale_m
  assert config.optim.decay_tgdg_gates is False
  params = _flat(nnx.state(model, nnx.Param))
  reference = _flat(optimizer.param_groups(model, decay_gates=True))
  default = _flat(optimizer.param_groups(model, decay_gates=config.optim.decay_tgdg_gates))
  changed = {path for path in params if default[path] != reference[path]}
  assert changed == {f'detector/layers/{i}/attn/{gate}' for i in (16, 19, 22)
                     for gate in ('weight_gate', 'feature_gate')}
  assert all(default[path] == optimizer.GROUP_NO_DECAY for path in changed)
  sizes = _sizes(default, params)
  assert sizes == {'decay': REFERENCE_GROUP_SIZES_M['decay'] - GATE_SCALARS_M,
                   'no_decay': REFERENCE_GROUP_SIZES_M['no_decay'] + GATE_SCALARS_M,
                   'bias': REFERENCE_GROUP_SIZES_M['bias']}


def test_ssa_biases_are_biases(scale_m):
  """The SSA biases carry the reference's names, so the name rule keeps them out of weight decay."""
  _, model = scale_m
  groups = _flat(optimizer.param_groups(model))
  for i in (16, 19, 22):
    assert groups[f'detector/layers/{i}/ssa/bias_avg'] == optimizer.GROUP_BIAS
    assert groups[f'detector/layers/{i}/ssa/bias_max'] == optimizer.GROUP_BIAS
    assert groups[f'detector/layers/{i}/ssa/weight_avg'] == optimizer.GROUP_DECAY

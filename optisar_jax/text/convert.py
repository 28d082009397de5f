"""OpenCLIP text tower checkpoint -> HF-format CLIPTextModelWithProjection directory (loadable by
`load_text_encoder` and by transformers).

OpenCLIP text keys (CLIP: no prefix; CustomTextCLIP such as MobileCLIP2-B: prefix 'text.'):
  token_embedding.weight (V,W)        -> text_model.embeddings.token_embedding.weight
  positional_embedding (C,W)          -> text_model.embeddings.position_embedding.weight
  transformer.resblocks.N.ln_1/ln_2   -> text_model.encoder.layers.N.layer_norm1/layer_norm2
  transformer.resblocks.N.attn.in_proj_weight (3W,W), in_proj_bias (3W)  -> q/k/v_proj (split in thirds)
  transformer.resblocks.N.attn.out_proj                                  -> self_attn.out_proj
  transformer.resblocks.N.mlp.c_fc / c_proj                              -> mlp.fc1 / mlp.fc2
  ln_final                            -> text_model.final_layer_norm
  text_projection (W,D) parameter     -> text_projection.weight (D,W)  (transposed: HF stores a Linear)

Only the text tower is converted; every other key (visual.*, logit_scale, ...) is ignored. torch is needed
only to read .pt/.pth/.bin pickles; .safetensors and .npz state dicts are read with numpy.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from typing import Any

import numpy as np

from optisar_jax.runtime import paths

BPE_FILENAME = 'bpe_simple_vocab_16e6.txt.gz'


def open_clip_package_dir() -> str | None:
  """The installed open_clip package directory, found without importing it (it needs torchvision)."""
  spec = importlib.util.find_spec('open_clip')
  if spec is None or not spec.submodule_search_locations:
    return None
  return list(spec.submodule_search_locations)[0]


def open_clip_model_config(name_or_path: str) -> dict:
  """An OpenCLIP model config: a JSON path, or a model name looked up in open_clip/model_configs/."""
  path = name_or_path
  if not os.path.isfile(path):
    package = open_clip_package_dir()
    if package is None:
      raise FileNotFoundError(f'{name_or_path}: not a file, and open_clip (for its model_configs) is not '
                              'installed')
    path = os.path.join(package, 'model_configs', name_or_path + '.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: OpenCLIP model config not found')
  try:
    with open(path, encoding='utf-8') as f:
      config = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: malformed JSON ({e})') from None
  if 'text_cfg' not in config or 'embed_dim' not in config:
    raise ValueError(f'{path}: no "text_cfg"/"embed_dim" (not an OpenCLIP model config)')
  return config


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """A checkpoint file -> {name: float32/int numpy array}.

  .safetensors / .npz are read with numpy; .pt / .pth / .bin need torch (imported here only). Nested
  {'state_dict': ...} / {'model': ...} wrappers and 'module.' prefixes are removed.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: checkpoint not found')
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    try:
      state = dict(load_file(path))
    except Exception as e:  # SafetensorError
      raise ValueError(f'{path}: malformed safetensors file ({e})') from None
  elif path.endswith('.npz'):
    with np.load(path, allow_pickle=False) as data:
      state = {k: data[k] for k in data.files}
  else:
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ImportError(f'{path}: reading a torch checkpoint needs torch (pip install torch); or pass a '
                        '.safetensors / .npz state dict') from None
    try:
      loaded = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # unpickling errors of many kinds
      raise ValueError(f'{path}: cannot read torch checkpoint ({type(e).__name__}: {e})') from None
    for key in ('state_dict', 'model', 'module'):
      if isinstance(loaded, dict) and key in loaded and isinstance(loaded[key], dict):
        loaded = loaded[key]
    if not isinstance(loaded, dict):
      raise ValueError(f'{path}: expected a state dict, got {type(loaded).__name__}')
    state = {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
             for k, v in loaded.items() if hasattr(v, 'detach')}
  out = {}
  for name, value in state.items():
    name = name[len('module.'):] if name.startswith('module.') else name
    value = np.asarray(value)
    out[name] = value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value
  return out


def _text_prefix(state: dict[str, np.ndarray], source: str) -> str:
  candidates = [k[:-len('token_embedding.weight')] for k in state
                if k.endswith('token_embedding.weight') and not k.startswith('visual')]
  if not candidates:
    raise ValueError(f'{source}: no token_embedding.weight (not an OpenCLIP text checkpoint)')
  return sorted(candidates, key=len)[0]


def open_clip_text_to_hf(state: dict[str, np.ndarray], *, source: str, heads: int | None = None,
                         quick_gelu: bool = False, embed_dim: int | None = None) -> tuple[dict, dict]:
  """OpenCLIP text state dict -> (HF CLIPTextConfig dict, HF CLIPTextModelWithProjection state dict).

  Shapes (vocab, width, context, layers, mlp width, projection) are read from the tensors; heads must be
  given (or width // 64, OpenCLIP's default head width). Unsupported variants (layer scale, CLS token,
  projection with bias) raise ValueError naming `source`.
  """
  p = _text_prefix(state, source)
  text = {k[len(p):]: v for k, v in state.items() if k.startswith(p)}
  for marker in ('cls_emb', 'ls_1.gamma', 'text_projection.bias'):
    if any(k.endswith(marker) for k in text):
      raise ValueError(f'{source}: unsupported OpenCLIP text variant (has {p}...{marker})')

  def take(name):
    if name not in text:
      raise ValueError(f'{source}: missing tensor {p}{name}')
    return text[name]

  vocab, width = take('token_embedding.weight').shape
  context = take('positional_embedding').shape[0]
  blocks = sorted({int(m.group(1)) for k in text if (m := re.match(r'transformer\.resblocks\.(\d+)\.', k))})
  if not blocks or blocks != list(range(len(blocks))):
    raise ValueError(f'{source}: no or non-contiguous {p}transformer.resblocks.N tensors')
  mlp_width = take('transformer.resblocks.0.mlp.c_fc.weight').shape[0]
  if 'text_projection' in text:
    projection = text['text_projection'].T                       # parameter (W, D) -> Linear weight (D, W)
  elif 'text_projection.weight' in text:
    projection = text['text_projection.weight']                  # nn.Linear, already (D, W)
  else:
    raise ValueError(f'{source}: missing tensor {p}text_projection')
  if embed_dim is not None and projection.shape[0] != embed_dim:
    raise ValueError(f'{source}: text_projection gives {projection.shape[0]}-d output, config says {embed_dim}')
  heads = heads or max(1, width // 64)
  if width % heads:
    raise ValueError(f'{source}: width {width} is not divisible by heads {heads}')

  hf = {
      'text_model.embeddings.token_embedding.weight': take('token_embedding.weight'),
      'text_model.embeddings.position_embedding.weight': take('positional_embedding'),
      'text_model.final_layer_norm.weight': take('ln_final.weight'),
      'text_model.final_layer_norm.bias': take('ln_final.bias'),
      'text_projection.weight': projection,
  }
  for i in blocks:
    src = f'transformer.resblocks.{i}.'
    dst = f'text_model.encoder.layers.{i}.'
    in_w = take(src + 'attn.in_proj_weight')
    in_b = take(src + 'attn.in_proj_bias')
    for j, name in enumerate(('q_proj', 'k_proj', 'v_proj')):
      hf[dst + f'self_attn.{name}.weight'] = in_w[j * width:(j + 1) * width]
      hf[dst + f'self_attn.{name}.bias'] = in_b[j * width:(j + 1) * width]
    hf[dst + 'self_attn.out_proj.weight'] = take(src + 'attn.out_proj.weight')
    hf[dst + 'self_attn.out_proj.bias'] = take(src + 'attn.out_proj.bias')
    hf[dst + 'layer_norm1.weight'] = take(src + 'ln_1.weight')
    hf[dst + 'layer_norm1.bias'] = take(src + 'ln_1.bias')
    hf[dst + 'layer_norm2.weight'] = take(src + 'ln_2.weight')
    hf[dst + 'layer_norm2.bias'] = take(src + 'ln_2.bias')
    hf[dst + 'mlp.fc1.weight'] = take(src + 'mlp.c_fc.weight')
    hf[dst + 'mlp.fc1.bias'] = take(src + 'mlp.c_fc.bias')
    hf[dst + 'mlp.fc2.weight'] = take(src + 'mlp.c_proj.weight')
    hf[dst + 'mlp.fc2.bias'] = take(src + 'mlp.c_proj.bias')
  config = {
      'architectures': ['CLIPTextModelWithProjection'],
      'model_type': 'clip_text_model',
      'vocab_size': int(vocab),
      'hidden_size': int(width),
      'intermediate_size': int(mlp_width),
      'num_hidden_layers': len(blocks),
      'num_attention_heads': int(heads),
      'max_position_embeddings': int(context),
      'hidden_act': 'quick_gelu' if quick_gelu else 'gelu',
      'layer_norm_eps': 1e-5,
      'projection_dim': int(projection.shape[0]),
      'bos_token_id': int(vocab) - 2,
      'eos_token_id': int(vocab) - 1,
      'pad_token_id': 0,
  }
  return config, {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in hf.items()}


def find_bpe_file(bpe: str | None, checkpoint: str) -> str:
  """The CLIP BPE vocabulary: the given path, else next to the checkpoint, else inside open_clip."""
  if bpe:
    if not os.path.isfile(bpe):
      raise FileNotFoundError(f'{bpe}: BPE vocabulary file not found')
    return bpe
  candidates = [os.path.join(os.path.dirname(os.path.abspath(checkpoint)), BPE_FILENAME)]
  package = open_clip_package_dir()
  if package:
    candidates.append(os.path.join(package, BPE_FILENAME))
  for candidate in candidates:
    if os.path.isfile(candidate):
      return candidate
  raise FileNotFoundError(f'{candidates[0]}: CLIP BPE vocabulary not found; pass --bpe PATH '
                          '(bpe_simple_vocab_16e6.txt.gz ships with the open-clip-torch package)')


def write_hf_directory(output_dir: str, config: dict, state: dict[str, np.ndarray], tokenizer: Any,
                       extra: dict | None = None) -> None:
  """Writes config.json, model.safetensors and the tokenizer files to a temporary local directory and
  moves it to output_dir at the end (renamed when local; uploaded with config.json last when remote, e.g.
  gs://bucket/encoders/name); an existing output_dir is replaced."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  tmp = paths.staging_dir(output_dir, prefix='.' + paths.path(output_dir).name + '.')
  try:
    with open(os.path.join(tmp, 'config.json'), 'w', encoding='utf-8') as f:
      json.dump(dict(config, **(extra or {})), f, indent=2, sort_keys=True)
    save_file(state, os.path.join(tmp, 'model.safetensors'), metadata={'format': 'pt'})
    tokenizer.save_pretrained(tmp)
    paths.publish_dir(tmp, output_dir, last=['config.json'])
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp)


def convert_open_clip_text(checkpoint: str, output_dir: str, *, model_config: str | None = None,
                           bpe: str | None = None, heads: int | None = None,
                           quick_gelu: bool | None = None) -> dict:
  """Converts the text tower of an OpenCLIP checkpoint; returns the written HF config dict.

  model_config: an OpenCLIP model name (e.g. 'MobileCLIP2-B', needs open_clip installed) or JSON path;
  supplies heads, the activation (`quick_gelu`) and checks the shapes. Without it, heads = width // 64.
  """
  from optisar_jax.text import tokenization  # pylint: disable=g-import-not-at-top
  embed_dim = None
  if model_config:
    oc = open_clip_model_config(model_config)
    text_cfg = oc['text_cfg']
    heads = heads or int(text_cfg.get('heads', 0)) or None
    if quick_gelu is None:
      quick_gelu = bool(oc.get('quick_gelu', False))
    embed_dim = int(oc['embed_dim'])
    if text_cfg.get('no_causal_mask') or text_cfg.get('pool_type', 'argmax') != 'argmax':
      raise ValueError(f'{model_config}: only causal, argmax-pooled OpenCLIP text towers are supported')
  state = load_state_dict(checkpoint)
  config, hf_state = open_clip_text_to_hf(state, source=checkpoint, heads=heads,
                                          quick_gelu=bool(quick_gelu), embed_dim=embed_dim)
  if model_config:
    for key, ours in (('width', 'hidden_size'), ('layers', 'num_hidden_layers'),
                      ('context_length', 'max_position_embeddings'), ('vocab_size', 'vocab_size')):
      if key in text_cfg and int(text_cfg[key]) != config[ours]:
        raise ValueError(f'{checkpoint}: {ours} = {config[ours]} but {model_config} says {key} = '
                         f'{text_cfg[key]}')
  bpe_path = find_bpe_file(bpe, checkpoint)
  vocab_size = config['vocab_size']
  max_merges = vocab_size - 512 - 2
  tokenizer = tokenization.build_clip_tokenizer(bpe_path, max_merges=max_merges,
                                                model_max_length=config['max_position_embeddings'])
  if len(tokenizer) != vocab_size:
    raise ValueError(f'{bpe_path}: gives a {len(tokenizer)}-token vocabulary, the checkpoint has {vocab_size}')
  write_hf_directory(output_dir, config, hf_state, tokenizer, extra={
      'converted_from': os.path.basename(checkpoint),
      'open_clip_model': model_config or ''})
  return config

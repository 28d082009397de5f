"""`load_text_encoder(path)`: a frozen pretrained text encoder (CLIP family or BERT family) from an
HF-format directory, run with JAX; no torch.

Directory layout (what `save_pretrained` writes, and what scripts/convert_text_encoder.py produces):
  config.json                      model_type 'clip' / 'clip_text_model' / 'bert' (+ BERT relatives)
  model.safetensors                (or model.safetensors.index.json + shards)
  tokenizer.json / tokenizer_config.json / vocab files
  sentence_bert_config.json        optional (sentence-transformers: max_seq_length)

A remote directory (`gs://bucket/encoders/name`) is copied into a local temporary directory first
(transformers and safetensors read local files only), loaded into memory, and the copy removed.

`encode(strings)` tokenizes with the model's tokenizer, puts every string in the smallest fixed length
bucket that holds it (its own length decides, never the batch's), runs batches of exactly `batch_size` rows
(the last one padded with empty rows) through one jitted function per length bucket, and L2-normalises in
float32. A string's vector is therefore bitwise the same whatever else is in the batch (XLA's matmul
blocking depends on the row count, so a varying row count would change the last bits).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from optisar_jax.runtime import paths
from optisar_jax.text.files import read_json_object
from optisar_jax.text import bert as bert_lib
from optisar_jax.text import clip as clip_lib
from optisar_jax.text import layers
from optisar_jax.text import tokenization

CLIP_TYPES = ('clip', 'clip_text_model')
BERT_TYPES = ('bert', 'roberta', 'xlm-roberta')
LENGTH_BUCKETS = (16, 32, 64, 128, 256, 512)
HF_SCHEME = 'hf://'


# ------------------------------------------------------------------------------------------- files


def weight_files(model_dir: str) -> list[str]:
  """The safetensors file(s) of a model directory (single file or sharded with an index)."""
  single = os.path.join(model_dir, 'model.safetensors')
  if os.path.isfile(single):
    return [single]
  index = os.path.join(model_dir, 'model.safetensors.index.json')
  if os.path.isfile(index):
    weight_map = read_json_object(index, 'safetensors index').get('weight_map')
    if not isinstance(weight_map, dict):
      raise ValueError(f'{index}: no "weight_map" object')
    files = [os.path.join(model_dir, f) for f in sorted(set(weight_map.values()))]
    for f in files:
      if not os.path.isfile(f):
        raise FileNotFoundError(f'{f}: weight shard named in {index} not found')
    return files
  raise FileNotFoundError(f'{single}: weights not found (model.safetensors or model.safetensors.index.json)')


def read_safetensors(files: Sequence[str]) -> dict[str, np.ndarray]:
  """All tensors of the files as float32 numpy arrays (integer buffers such as position_ids are kept)."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  state = {}
  for path in files:
    try:
      tensors = load_file(path)
    except Exception as e:  # safetensors raises SafetensorError / OSError on a bad header or truncation
      raise ValueError(f'{path}: malformed safetensors file ({type(e).__name__}: {e})') from None
    for name, value in tensors.items():
      state[name] = value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value
  return state


def _files_digest(paths: Sequence[str]) -> str:
  digest = hashlib.sha256()
  for path in paths:
    digest.update(os.path.basename(path).encode())
    with open(path, 'rb') as f:
      for chunk in iter(lambda: f.read(1 << 22), b''):
        digest.update(chunk)
  return digest.hexdigest()[:16]


def resolve_model_dir(path: str) -> str:
  """The local directory of the encoder at `path`: `path` itself when local, `hf://owner/name[@revision]`
  downloaded with huggingface_hub (needs network), a remote URL (`gs://...`) copied to a new temporary
  directory `<tmp>/<name>` (the caller removes `<tmp>`)."""
  if path.startswith(HF_SCHEME):
    repo = path[len(HF_SCHEME):]
    repo, _, revision = repo.partition('@')
    from huggingface_hub import snapshot_download  # pylint: disable=g-import-not-at-top
    try:
      return snapshot_download(repo, revision=revision or None, allow_patterns=[
          '*.json', '*.safetensors', '*.txt', '*.model', '1_Pooling/*'])
    except Exception as e:  # offline, unknown repo, ...
      raise OSError(f'{path}: cannot download from the Hugging Face Hub ({type(e).__name__}: {e})') from None
  if not paths.isdir(path):
    raise FileNotFoundError(f'{path}: text encoder directory not found')
  if paths.is_remote(path):
    local = os.path.join(tempfile.mkdtemp(prefix='optisar-text-encoder-'), paths.path(path).name)
    paths.copy_tree(path, local)
    return local
  return path


# ------------------------------------------------------------------------------------------ params


def build_module(factory: Callable[[], nnx.Module], params: dict[str, np.ndarray], source: str) -> nnx.Module:
  """Creates the module abstractly and fills every parameter from `params` (path 'a.0.b' -> array).

  Raises ValueError naming `source` on a missing, unexpected or wrongly shaped tensor.
  """
  abstract = nnx.eval_shape(factory)
  graphdef, state = nnx.split(abstract)
  pure = nnx.to_pure_dict(state)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(pure)
  filled = []
  used = set()
  for path, leaf in leaves:
    name = '.'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)
    if name not in params:
      raise ValueError(f'{source}: no tensor for parameter {name}')
    value = np.asarray(params[name], dtype=leaf.dtype)
    if value.shape != leaf.shape:
      raise ValueError(f'{source}: parameter {name} has shape {value.shape}, the config needs {leaf.shape}')
    filled.append(jnp.asarray(value))
    used.add(name)
  extra = sorted(set(params) - used)
  if extra:
    raise ValueError(f'{source}: tensors not used by the model: {extra[:5]}')
  nnx.replace_by_pure_dict(state, jax.tree_util.tree_unflatten(treedef, filled))
  return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------------------- encoder


def length_buckets(max_length: int, candidates: Sequence[int] = LENGTH_BUCKETS) -> tuple[int, ...]:
  """Fixed sequence lengths used by encode(): the candidates below max_length, then max_length."""
  return tuple(sorted({int(b) for b in candidates if 0 < int(b) < max_length})) + (int(max_length),)


class TextEncoder:
  """A frozen text encoder. `encode(list[str]) -> float32 (N, dim)` with unit-norm rows.

  Attributes: `dim` (output width), `identity` (architecture, directory name and a content hash of config,
  weights and tokenizer files; the embedding cache key), `kind` ('clip' or 'bert'), `max_length`.
  """

  def __init__(self, module: nnx.Module, tokenizer: Any, *, kind: str, dim: int, max_length: int,
               pad_id: int, identity: str, batch_size: int = 64,
               buckets: Sequence[int] = LENGTH_BUCKETS):
    self.module = module
    self.tokenizer = tokenizer
    self.kind = kind
    self.dim = int(dim)
    self.max_length = int(max_length)
    self.pad_id = int(pad_id)
    self.identity = identity
    self.batch_size = int(batch_size)
    self.length_buckets = length_buckets(self.max_length, buckets)
    graphdef, state = nnx.split(module)
    self._state = state

    def forward(state, input_ids, attention_mask):
      model = nnx.merge(graphdef, state)
      return layers.l2_normalize(model(input_ids, attention_mask))

    self._forward = jax.jit(forward)

  def __repr__(self) -> str:
    return f'TextEncoder({self.identity}, dim={self.dim})'

  def token_ids(self, strings: Sequence[str]) -> list[list[int]]:
    """Unpadded token ids (with the model's special tokens), truncated to max_length."""
    return tokenization.hf_token_ids(self.tokenizer, strings, self.max_length)

  def encode(self, strings: Sequence[str]) -> np.ndarray:
    """list[str] (N) -> float32 (N, dim), L2-normalised; N = 0 gives (0, dim)."""
    strings = [str(s) for s in strings]
    out = np.zeros((len(strings), self.dim), dtype=np.float32)
    if not strings:
      return out
    ids = self.token_ids(strings)
    buckets = self.length_buckets
    by_length: dict[int, list[int]] = {}
    for row, seq in enumerate(ids):
      length = next(b for b in buckets if b >= len(seq))
      by_length.setdefault(length, []).append(row)
    with jax.default_matmul_precision('highest'):
      for length, rows in sorted(by_length.items()):
        for start in range(0, len(rows), self.batch_size):
          chunk = rows[start:start + self.batch_size]
          input_ids = np.full((self.batch_size, length), self.pad_id, dtype=np.int32)
          mask = np.zeros((self.batch_size, length), dtype=np.int32)
          for i, row in enumerate(chunk):
            input_ids[i, :len(ids[row])] = ids[row]
            mask[i, :len(ids[row])] = 1
          vectors = self._forward(self._state, jnp.asarray(input_ids), jnp.asarray(mask))
          out[chunk] = np.asarray(vectors)[:len(chunk)]
    return out


def _clip_config(hf_config: Any, config_path: str) -> clip_lib.CLIPTextConfig:
  if hf_config.model_type == 'clip':
    text_config = hf_config.text_config
    projection = hf_config.projection_dim
  else:
    text_config = hf_config
    architectures = getattr(hf_config, 'architectures', None) or []
    projection = hf_config.projection_dim if 'CLIPTextModelWithProjection' in architectures else None
  try:
    return clip_lib.CLIPTextConfig.from_hf(text_config, projection)
  except (AttributeError, TypeError, ValueError) as e:
    raise ValueError(f'{config_path}: bad CLIP text config ({e})') from None


def _bert_max_length(model_dir: str, config: bert_lib.BertConfig, tokenizer: Any) -> int:
  limit = config.max_position_embeddings
  st_path = os.path.join(model_dir, 'sentence_bert_config.json')
  if os.path.isfile(st_path):
    st = read_json_object(st_path, 'sentence-transformers config')
    if st.get('max_seq_length'):
      limit = min(limit, int(st['max_seq_length']))
  model_max = getattr(tokenizer, 'model_max_length', None)
  if isinstance(model_max, int) and 0 < model_max < limit:
    limit = model_max
  return limit


def load_text_encoder(path: str, *, batch_size: int = 64,
                      buckets: Sequence[int] = LENGTH_BUCKETS) -> TextEncoder:
  """Loads a CLIP* or BERT text encoder from a local HF-format directory or `hf://owner/name`.

  CLIP: HF CLIPModel (text half + text_projection), CLIPTextModelWithProjection, CLIPTextModel (no
  projection, EOT hidden state), or a converted OpenCLIP tower (scripts/convert_text_encoder.py).
  BERT: BertModel-style weights, mean pooling over real tokens (sentence-transformers).
  batch_size: rows per jitted call (every call has exactly this many). buckets: candidate sequence
  lengths (max_length is always added); fewer buckets = fewer compilations, more padding.
  Errors are one line and name the offending file.
  """
  model_dir = resolve_model_dir(path)
  if not paths.is_remote(path):
    return _load_from_dir(path, model_dir, batch_size, buckets)
  try:
    return _load_from_dir(path, model_dir, batch_size, buckets)
  except (FileNotFoundError, ValueError) as e:     # name the remote file, not its temporary copy
    kind = FileNotFoundError if isinstance(e, FileNotFoundError) else ValueError
    raise kind(str(e).replace(model_dir, str(paths.path(path)))) from None
  finally:
    shutil.rmtree(os.path.dirname(model_dir), ignore_errors=True)


def _load_from_dir(path: str, model_dir: str, batch_size: int, buckets: Sequence[int]) -> TextEncoder:
  """`load_text_encoder` of the local directory `model_dir` (`path` as the user gave it)."""
  from transformers import AutoConfig  # pylint: disable=g-import-not-at-top
  config_path = os.path.join(model_dir, 'config.json')
  raw = read_json_object(config_path, 'text encoder config')
  model_type = raw.get('model_type')
  if model_type not in CLIP_TYPES + BERT_TYPES:
    raise ValueError(f'{config_path}: unsupported model_type {model_type!r} '
                     f'(supported: {", ".join(CLIP_TYPES + BERT_TYPES)})')
  try:
    hf_config = AutoConfig.from_pretrained(model_dir)
  except (OSError, ValueError, TypeError, KeyError) as e:
    raise ValueError(f'{config_path}: cannot parse config ({type(e).__name__}: {e})') from None
  files = weight_files(model_dir)
  state = read_safetensors(files)
  source = files[0] if len(files) == 1 else os.path.join(model_dir, 'model.safetensors.index.json')
  tokenizer = tokenization.load_hf_tokenizer(model_dir)
  if model_type in CLIP_TYPES:
    kind = 'clip'
    config = _clip_config(hf_config, config_path)
    try:
      params = clip_lib.hf_state_to_params(state, config)
    except KeyError as e:
      raise ValueError(f'{source}: missing tensor {e.args[0]!r} for a CLIP text model') from None
    module = build_module(lambda: clip_lib.CLIPTextTransformer(config, rngs=nnx.Rngs(0)), params, source)
    max_length = config.max_position_embeddings
    architecture = 'clip'
  else:
    kind = 'bert'
    try:
      config = bert_lib.BertConfig.from_hf(hf_config)
    except ValueError as e:
      raise ValueError(f'{config_path}: {e}') from None
    try:
      params = bert_lib.hf_state_to_params(state, config)
    except KeyError as e:
      raise ValueError(f'{source}: missing tensor {e.args[0]!r} for a BERT model') from None
    module = build_module(lambda: bert_lib.BertEncoder(config, rngs=nnx.Rngs(0)), params, source)
    max_length = _bert_max_length(model_dir, config, tokenizer)
    architecture = model_type
  tokenizer_files = sorted(
      os.path.join(model_dir, n) for n in os.listdir(model_dir)
      if n.startswith(('tokenizer', 'vocab', 'merges', 'special_tokens', 'sentence_bert')))
  digest = _files_digest([config_path] + list(files) + tokenizer_files)
  name = os.path.basename(os.path.normpath(model_dir)) if not path.startswith(HF_SCHEME) else path[5:]
  identity = f'{architecture}:{name}:{digest}'
  pad_id = getattr(tokenizer, 'pad_token_id', None)
  pad_id = config.pad_token_id if pad_id is None else pad_id
  return TextEncoder(module, tokenizer, kind=kind, dim=config.output_dim, max_length=max_length,
                     pad_id=pad_id, identity=identity, batch_size=batch_size,
                     buckets=buckets)

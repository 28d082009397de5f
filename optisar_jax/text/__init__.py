"""Text side of OptiSAR-Net++: frozen pretrained encoders (CLIP / MobileCLIP2, BERT) in flax.nnx, their
embedding cache, and the small trainable tower with its caption tokenizer.

  load_text_encoder(path) -> TextEncoder    .encode(list[str]) -> float32 (N,D) unit rows; .dim; .identity
  EmbeddingCache.load(dir)                  .lookup(strings) (n,D); .index(s); .matrix; .strings
  build_caption_tokenizer / tokenize        trainable-mode tokenizer and (N,L) int32 token ids
  build_text_table(config, strings, ...)    (V,D) float32 (frozen) or (V,L) int32 (trainable) text table
  TextTower(config.text.tower, out_dim)     trainable tower, token ids (N,L) -> (N,D) unit rows

Names are imported on first use, so `optisar_jax.text.convert` / `.cache` / `.tokenization` load without
JAX (light command-line tools).
"""

import importlib

_EXPORTS = {
    'BertConfig': 'bert', 'BertEncoder': 'bert',
    'EmbeddingCache': 'cache', 'build_embedding_cache': 'cache', 'prepare_text_embeddings': 'cache',
    'write_embedding_cache': 'cache',
    'CLIPTextConfig': 'clip', 'CLIPTextTransformer': 'clip', 'eot_positions': 'clip',
    'convert_open_clip_text': 'convert',
    'TextEncoder': 'loading', 'load_text_encoder': 'loading',
    'build_caption_tokenizer': 'tokenization', 'build_clip_tokenizer': 'tokenization',
    'load_caption_tokenizer': 'tokenization', 'save_caption_tokenizer': 'tokenization', 'tokenize': 'tokenization',
    'TextTower': 'tower', 'build_text_table': 'tower', 'text_embeddings_for_ids': 'tower',
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    value = getattr(importlib.import_module(f'{__name__}.{_EXPORTS[name]}'), name)
    globals()[name] = value
    return value
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted(list(globals()) + __all__)

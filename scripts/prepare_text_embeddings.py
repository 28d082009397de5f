"""Precomputes the frozen text-encoder embeddings of every training text (text.mode = 'frozen').

Reads the captions and category names of config.data.train_split with tfds.data_source, expands them with
optisar_jax.data.vocabulary.training_texts (background, adversarial variants; sorted unique), encodes them
with the encoder of config.text.encoder, and writes OUTPUT/strings.json + OUTPUT/embeddings.npy atomically.

Usage:
  python scripts/prepare_text_embeddings.py --config configs/optsar_rsvg.py --data_dir data/tfds \
      --output artifacts/text_embeddings/mobileclip2_b --config.text.encoder=artifacts/mobileclip2_b_text
"""

import argparse
import sys


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', required=True, help='config file or bare name under configs/')
  parser.add_argument('--data_dir', default=None, help='TFDS data dir (default: config.data.data_dir)')
  parser.add_argument('--output', required=True, help='cache directory to write')
  args, overrides = parser.parse_known_args(argv)
  from optisar_jax.config import load_config
  from optisar_jax.text.cache import prepare_text_embeddings
  try:
    config = load_config(args.config, overrides)
    cache = prepare_text_embeddings(config, args.data_dir or config.data.data_dir, args.output)
  except (FileNotFoundError, KeyError, ValueError, OSError) as err:
    sys.exit(f'prepare_text_embeddings: {err}')
  print(f'wrote {args.output}: {len(cache)} texts x {cache.dim} ({cache.encoder_identity})')


if __name__ == '__main__':
  main()

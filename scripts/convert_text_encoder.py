"""Converts the text tower of an OpenCLIP checkpoint (e.g. MobileCLIP2-B `mobileclip2_b.pt`) into an
HF-format CLIPTextModelWithProjection directory that `optisar_jax.text.load_text_encoder` (and transformers)
can load: config.json, model.safetensors, tokenizer files (the CLIP BPE tokenizer, built from OpenCLIP's
bpe_simple_vocab_16e6.txt.gz).

torch is needed only to read .pt/.pth/.bin pickles (pip install torch); .safetensors / .npz state dicts with
OpenCLIP key names are read with numpy.

Usage:
  python scripts/convert_text_encoder.py --checkpoint mobileclip2_b.pt --output artifacts/mobileclip2_b_text \
      --model_config MobileCLIP2-B [--bpe path/to/bpe_simple_vocab_16e6.txt.gz]
"""

import argparse
import sys


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--checkpoint', required=True, help='OpenCLIP state dict (.pt/.pth/.bin/.safetensors/.npz)')
  parser.add_argument('--output', required=True, help='HF-format directory to write (replaced if present)')
  parser.add_argument('--model_config', default=None,
                      help='OpenCLIP model name (e.g. MobileCLIP2-B; needs open-clip-torch installed) or its '
                           'JSON file; gives heads and the activation and checks shapes')
  parser.add_argument('--bpe', default=None, help='bpe_simple_vocab_16e6.txt.gz (default: next to the '
                      'checkpoint, else from the installed open_clip package)')
  parser.add_argument('--heads', type=int, default=None, help='attention heads (default: config, else width/64)')
  parser.add_argument('--quick_gelu', action='store_true', default=None,
                      help='QuickGELU activation (OpenAI-trained towers); default from the config, else GELU')
  args = parser.parse_args(argv)
  from optisar_jax.text.convert import convert_open_clip_text
  try:
    config = convert_open_clip_text(args.checkpoint, args.output, model_config=args.model_config, bpe=args.bpe,
                                    heads=args.heads, quick_gelu=args.quick_gelu)
  except (FileNotFoundError, KeyError, ValueError, ImportError, OSError) as err:
    sys.exit(f'convert_text_encoder: {err}')
  print(f'wrote {args.output}: {config["num_hidden_layers"]} layers, width {config["hidden_size"]}, '
        f'{config["num_attention_heads"]} heads, context {config["max_position_embeddings"]}, '
        f'vocab {config["vocab_size"]}, output {config["projection_dim"]}, {config["hidden_act"]}')


if __name__ == '__main__':
  main()

"""Shared command-line plumbing for the thin scripts in scripts/.

* `--config FILE` plus any number of `--config.a.b=value` (or `--config.a.b value`) overrides, parsed by
  `ml_collections.config_flags` through `optisar_jax.config.load_config`: each value is read with the
  type of the field it replaces; an unknown key or an unreadable value is an error naming the key. The
  script's other flags are argparse's.
* `run(main)`: bad input ends with ONE line on stderr naming the file or key and what is wrong, and exit
  status 2, instead of a traceback; so does a non-finite loss under `train.nonfinite = 'stop'`
  (a FloatingPointError naming the step). Set OPTISAR_TRACEBACK=1 to see the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Sequence

import ml_collections

from optisar_jax import config as config_lib


def enable_compilation_cache(directory: str | None = None) -> str | None:
  """Turns on JAX's persistent compilation cache (OPTISAR_JAX_CACHE_DIR, default ~/.cache/optisar_jax/xla;
  set it to an empty string to disable). A restarted run, the evaluator and the exporter then reuse the
  compiled programs instead of recompiling (the train step takes about a minute to compile on a CPU)."""
  import jax
  if directory is None:
    directory = os.environ.get('OPTISAR_JAX_CACHE_DIR',
                               os.path.join(os.path.expanduser('~'), '.cache', 'optisar_jax', 'xla'))
  if not directory:
    return None
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  return directory


def prepare_runtime() -> None:
  """Process-wide setup every entry point needs: absl flags parsed (grain reads them) and the
  persistent compilation cache."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  enable_compilation_cache()


def split_config_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separates `--config.a.b=v` / `--config.a.b v` items from the other arguments."""
  overrides, rest = [], []
  items = list(argv)
  i = 0
  while i < len(items):
    item = items[i]
    if item.startswith('--config.'):
      if '=' in item:
        overrides.append(item[len('--config.'):])
      else:
        if i + 1 >= len(items):
          raise ValueError(f'{item}: missing value')
        overrides.append(item[len('--config.'):] + '=' + items[i + 1])
        i += 1
    else:
      rest.append(item)
    i += 1
  return overrides, rest


def parse_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None,
                      *, config_required: bool = True
                      ) -> tuple[argparse.Namespace, ml_collections.ConfigDict | None]:
  """Parses `argv` with `parser` (which must define --config) and loads the config with overrides."""
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides, rest = split_config_overrides(argv)
  args = parser.parse_args(rest)
  if args.config is None:
    if config_required:
      raise ValueError('--config: a config file is required (e.g. configs/tiny.py)')
    if overrides:
      raise ValueError('--config.*: overrides given without --config')
    return args, None
  return args, config_lib.load_config(args.config, overrides)


def run(main: Callable[[], int | None]) -> None:
  """Runs `main`, turning expected input errors into one line on stderr and exit status 2."""
  prepare_runtime()
  try:
    code = main()
  except (FileNotFoundError, KeyError, ValueError, json.JSONDecodeError, OSError, FloatingPointError) as err:
    if os.environ.get('OPTISAR_TRACEBACK'):
      raise
    message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    print(f'error: {message}'.splitlines()[0] if message else f'error: {type(err).__name__}',
          file=sys.stderr)
    sys.exit(2)
  sys.exit(code or 0)

"""Loading ml_collections config files and applying `a.b=value` overrides.

Config files live in `configs/` (outside the package); each defines `get_config()`. Scripts use absl's
`config_flags` (which gives `--config.a.b=v`); library code and tests use `load_config` here, which
applies the same overrides and names the key when it does not exist.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from typing import Iterable

import ml_collections

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


def _load_module(path: str):
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: config file not found')
  name = 'optisar_config_' + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ValueError(f'{path}: config file defines no get_config()')
  return module


def load_sibling(this_file: str, name: str) -> ml_collections.ConfigDict:
  """`get_config()` of the config file `name`.py next to `this_file` (for configs built on others)."""
  return _load_module(os.path.join(os.path.dirname(os.path.abspath(this_file)), name + '.py')).get_config()


def resolve_config_path(path_or_name: str) -> str:
  """Accepts `configs/tiny.py`, an absolute path, or a bare name such as `tiny`."""
  if os.path.isfile(path_or_name):
    return path_or_name
  candidate = os.path.join(CONFIG_DIR, path_or_name if path_or_name.endswith('.py') else path_or_name + '.py')
  if os.path.isfile(candidate):
    return candidate
  raise FileNotFoundError(f'{path_or_name}: config file not found')


def _parse_value(text: str, old):
  if isinstance(old, bool):
    low = text.strip().lower()
    if low in ('1', 'true', 'yes'):
      return True
    if low in ('0', 'false', 'no'):
      return False
    raise ValueError(f'expected a boolean, got {text!r}')
  if isinstance(old, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if isinstance(old, tuple) and isinstance(value, list):
    value = tuple(value)
  return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
  """Applies `a.b.c=value` strings (a leading `--config.` or `config.` is accepted)."""
  for item in overrides:
    text = item
    for prefix in ('--config.', 'config.'):
      if text.startswith(prefix):
        text = text[len(prefix):]
    if '=' not in text:
      raise ValueError(f'config override {item!r}: expected key=value')
    key, raw = text.split('=', 1)
    parts = key.split('.')
    node = config
    for depth, part in enumerate(parts):
      if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
        raise KeyError(f"config key '{'.'.join(parts[:depth + 1])}' does not exist")
      if depth < len(parts) - 1:
        node = node[part]
    old = node[parts[-1]]
    try:
      value = _parse_value(raw, old)
    except ValueError as err:
      raise ValueError(f"config key '{key}': {err}") from None
    with config.unlocked() if hasattr(config, 'unlocked') else _nullcontext():
      node[parts[-1]] = value
  return config


class _nullcontext:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def load_config(path_or_name: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """Loads a config file (path or bare name under configs/) and applies overrides."""
  config = _load_module(resolve_config_path(path_or_name)).get_config()
  return apply_overrides(config, overrides)

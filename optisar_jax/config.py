"""Loading ml_collections config files and applying `a.b=value` overrides.

Config files live in `configs/` (outside the package); each defines `get_config()`. Every override, on a
script's command line (`--config.a.b=v`) or from library code and tests (`load_config(name, ['a.b=v'])`),
is parsed by `ml_collections.config_flags` (absl flags): a value is read with the type of the field it
replaces, so `train.num_steps=abc` is an error, not a string. An unknown key or an unreadable value is a
one-line error naming the key.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from typing import Iterable

import ml_collections
from absl import flags
from ml_collections import config_flags

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


def _flag_parse(define, overrides: Iterable[str], base: ml_collections.ConfigDict,
                config_path: str | None = None) -> ml_collections.ConfigDict:
  """Runs `config_flags` on `--config=...` plus `--config.<key>=<value>` items: absl parses each value
  with the type of the field it overrides. `base`: the config before the overrides (for error messages
  and the element-type check). Errors become one line naming the key."""
  items = []
  for item in overrides:
    text = item
    for prefix in ('--config.', 'config.'):
      if text.startswith(prefix):
        text = text[len(prefix):]
    if '=' not in text:
      raise ValueError(f'config override {item!r}: expected key=value')
    items.append(text)
  missing = _first_missing_key(base, items)
  if missing:
    raise KeyError(f"config key '{missing}' does not exist")
  argv = ['optisar_jax'] + ([f'--config={config_path}'] if config_path else []) + [f'--config.{t}' for t in items]
  flag_values = flags.FlagValues()
  try:
    define(flag_values, argv)
    flag_values(argv)
  except flags.IllegalFlagValueError as err:
    # absl: "flag --config.a.b=v: <reason>"
    message = str(err).splitlines()[0]
    if message.startswith('flag --config.') and ': ' in message:
      setting, reason = message[len('flag --config.'):].split(': ', 1)
      key, _, raw = setting.partition('=')
      if reason.startswith("('") and reason.endswith("')"):      # absl's tuple-shaped messages
        reason = reason[2:-2].replace("', '", ': ')
      raise ValueError(f"config key '{key}': cannot read {raw!r} ({reason})") from None
    raise ValueError(f'config: {message}') from None
  config = flag_values['config'].value
  for text in items:
    key, _, raw = text.partition('=')
    old, new = _get(base, key), _get(config, key)
    if (isinstance(old, tuple) and old and all(isinstance(v, (int, float)) for v in old)
        and not all(isinstance(v, (int, float)) for v in new)):
      raise ValueError(f"config key '{key}': cannot read {raw!r} (expected a tuple of numbers like {old})")
  return config


def _get(config, key: str):
  node = config
  for part in key.split('.'):
    node = node[part]
  return node


def _first_missing_key(base: ml_collections.ConfigDict, items: Iterable[str]) -> str | None:
  """The first overridden key path (of `a.b=v` items) that `base` does not have."""
  for text in items:
    parts = text.split('=', 1)[0].split('.')
    node = base
    for depth, part in enumerate(parts):
      if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
        return '.'.join(parts[:depth + 1])
      node = node[part]
  return None


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
  """`config` with `a.b.c=value` strings applied (a leading `--config.` or `config.` is accepted), parsed
  by `ml_collections.config_flags` exactly as a script's `--config.a.b.c=value` flags are. Returns a new
  ConfigDict; `config` is left as it was."""
  overrides = list(overrides)
  if not overrides:
    return config
  base = copy.deepcopy(config)
  def define(flag_values, argv):
    config_flags.DEFINE_config_dict('config', copy.deepcopy(config), flag_values=flag_values,
                                    lock_config=False, sys_argv=argv)
  return _flag_parse(define, overrides, base)


def load_config(path_or_name: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
  overrides = list(overrides)
  """Loads a config file (path or bare name under configs/) and applies `a.b=value` overrides, through
  `ml_collections.config_flags.DEFINE_config_file` (the `--config` / `--config.a.b=v` flags of absl)."""
  path = resolve_config_path(path_or_name)
  base = _load_module(path).get_config()     # a missing get_config() is named here, in one line
  if not overrides:
    return base
  def define(flag_values, argv):
    config_flags.DEFINE_config_file('config', default=None, flag_values=flag_values, lock_config=False,
                                    sys_argv=argv)
  return _flag_parse(define, overrides, base, config_path=path)

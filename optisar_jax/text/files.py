"""Small file helpers of the text package that need no JAX (the cache and conversion tools use them)."""

from __future__ import annotations

import json
import os


def read_json_object(path: str, what: str) -> dict:
  """The JSON object in `path`; one-line errors naming the file (missing, malformed, not an object)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: {what} not found')
  try:
    with open(path, encoding='utf-8') as f:
      data = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'{path}: malformed JSON ({e})') from None
  if not isinstance(data, dict):
    raise ValueError(f'{path}: expected a JSON object, got {type(data).__name__}')
  return data

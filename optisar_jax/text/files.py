"""Small file helpers of the text package that need no JAX (the cache and conversion tools use them)."""

from __future__ import annotations

from optisar_jax.runtime import paths


def read_json_object(path: str, what: str) -> dict:
  """The JSON object in `path` (local or remote); one-line errors naming the file (missing, malformed,
  not an object)."""
  data = paths.read_json(path, what)
  if not isinstance(data, dict):
    raise ValueError(f'{path}: expected a JSON object, got {type(data).__name__}')
  return data

"""The project's file I/O on local or remote paths, through `etils.epath`.

Every file the project writes or reads in a work directory, a TFDS data dir, an embedding cache or an
export goes through this module, so `gs://bucket/run` works wherever a local folder does. Remote paths
(`gs://`, `s3://`, `az://`) are handled by etils' fsspec backend: `gs://` needs gcsfs (the `gcs` extra,
`pip install -e '.[gcs]'`), which honours `STORAGE_EMULATOR_HOST` and the usual Google credentials.

* `path(p)`: an `epath.Path`; a local path is made absolute, a URL is left as it is (never
  `os.path.abspath`'ed: that would turn `gs://b/run` into `/cwd/gs:/b/run`).
* `write_bytes_atomic` / `write_text_atomic` / `write_json_atomic`: a reader sees the old file or the
  whole new one. On a local disk: a temporary file beside the target (created with the process umask, so
  0644 under the usual 022) renamed over it. On an object store an object becomes visible only when its
  upload completes and replaces the previous object whole, so a single write of the final object is
  already atomic; the write goes there directly (object stores have no cheap rename: it is a copy).
* `read_json(p, what)`: the parsed JSON; one-line errors that name the file.
* `staging_dir(dst)` + `publish_dir(src, dst, last=...)`: build a directory on the local disk, then move
  it into place: a rename on a local disk, an upload of every file on an object store with the file that
  marks the directory complete (`last`) uploaded after all the others.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shutil
import tempfile
import uuid
from typing import Any, Iterable

from etils import epath

_URL = re.compile(r'^([A-Za-z][A-Za-z0-9+.-]*)://')
REMOTE_SCHEMES = ('gs', 's3', 'az')
_CLIENTS = {'gs': ('gcsfs', "pip install -e '.[gcs]'"), 's3': ('s3fs', 'pip install s3fs'),
            'az': ('adlfs', 'pip install adlfs')}
_COPY_CHUNK = 8 << 20


def is_remote(p: epath.PathLike) -> bool:
  """Whether `p` (str or path) is a URL such as `gs://bucket/dir` rather than a local path."""
  return bool(_URL.match(os.fspath(p)))


def path(p: epath.PathLike) -> epath.Path:
  """`p` as an `epath.Path`: local paths made absolute, `gs://` / `s3://` / `az://` URLs unchanged.

  Raises ValueError (naming `p`) for a URL scheme epath cannot open, ImportError (naming `p` and the
  package to install) when the client library of the scheme is missing (gcsfs for gs://).
  """
  text = os.fspath(p)
  match = _URL.match(text)
  if match is None:
    return epath.Path(os.path.abspath(os.path.expanduser(text)))
  scheme = match.group(1)
  if scheme not in REMOTE_SCHEMES:
    raise ValueError(f'{text}: unsupported URL scheme {scheme!r}:// (supported: '
                     f'{", ".join(s + "://" for s in REMOTE_SCHEMES)} and local paths)')
  missing = _missing_client(scheme)
  if missing:
    raise ImportError(f'{text}: {scheme}:// paths need the {missing}')
  return epath.Path(text)


@functools.lru_cache(maxsize=None)
def _missing_client(scheme: str) -> str | None:
  """The package (and how to install it) that epath's fsspec backend lacks for `scheme`, or None.
  (With TensorFlow installed epath uses tf.io.gfile instead, which needs none of them.)"""
  module, hint = _CLIENTS[scheme]
  if importlib.util.find_spec(module) or importlib.util.find_spec('tensorflow'):
    return None
  return f'{module} package ({hint})'


def exists(p: epath.PathLike) -> bool:
  """Whether the file or directory `p` exists."""
  return path(p).exists()


def isfile(p: epath.PathLike) -> bool:
  """Whether `p` is an existing file (an object, on object stores)."""
  return path(p).is_file()


def isdir(p: epath.PathLike) -> bool:
  """Whether `p` is an existing directory (a prefix with objects under it, on object stores)."""
  return path(p).is_dir()


def makedirs(p: epath.PathLike) -> epath.Path:
  """Creates directory `p` and its parents if missing (no-op on object stores, which have no
  directories); returns it as an `epath.Path`."""
  directory = path(p)
  directory.mkdir(parents=True, exist_ok=True)
  return directory


def write_bytes_atomic(p: epath.PathLike, data: bytes) -> epath.Path:
  """Writes `data` to file `p` so that readers see the old content or all of the new (module docstring);
  creates missing parent directories. Returns the path written."""
  target = path(p)
  makedirs(target.parent)
  if is_remote(target):
    target.write_bytes(data)
    return target
  tmp = target.parent / f'.{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp'
  try:
    with open(tmp, 'xb') as f:         # mode 0666 & ~umask, unlike tempfile.mkstemp's 0600
      f.write(data)
    os.replace(tmp, target)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return target


def write_text_atomic(p: epath.PathLike, text: str) -> epath.Path:
  """`write_bytes_atomic` of `text` encoded as UTF-8; returns the path written."""
  return write_bytes_atomic(p, text.encode('utf-8'))


def write_json_atomic(p: epath.PathLike, obj: Any, *, indent: int | None = 2, sort_keys: bool = False,
                      allow_nan: bool = True, default=None) -> epath.Path:
  """Writes `obj` as JSON (plus a final newline) with `write_text_atomic`; the keyword arguments are
  `json.dumps`'s. Returns the path written."""
  text = json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=allow_nan, default=default,
                    ensure_ascii=False)
  return write_text_atomic(p, text + '\n')


def read_json(p: epath.PathLike, what: str = 'JSON file') -> Any:
  """The parsed content of JSON file `p`.

  Raises FileNotFoundError `'<p>: <what> not found'` when it is missing and ValueError `'<p>: malformed
  JSON (...)'` when it does not parse.
  """
  source = path(p)
  try:
    text = source.read_text(encoding='utf-8')
  except FileNotFoundError:
    raise FileNotFoundError(f'{source}: {what} not found') from None
  except IsADirectoryError:
    raise FileNotFoundError(f'{source}: {what} not found (it is a directory)') from None
  except UnicodeDecodeError as err:
    raise ValueError(f'{source}: not UTF-8 text ({err.reason} at byte {err.start})') from None
  try:
    return json.loads(text)
  except json.JSONDecodeError as err:
    raise ValueError(f'{source}: malformed JSON ({err.msg} at line {err.lineno}, column {err.colno})') from None


def copy_file(src: epath.PathLike, dst: epath.PathLike) -> epath.Path:
  """Copies one file between any two backends (streamed in 8 MiB chunks), replacing `dst`; returns it."""
  source, target = path(src), path(dst)
  makedirs(target.parent)
  with source.open('rb') as fin, target.open('wb') as fout:
    shutil.copyfileobj(fin, fout, _COPY_CHUNK)
  return target


def list_files(root: epath.PathLike) -> list[str]:
  """The files under directory `root`, as sorted '/'-separated paths relative to it."""
  base = path(root)
  found = []
  pending = [('', base)]
  while pending:
    prefix, directory = pending.pop()
    for child in directory.iterdir():
      name = prefix + child.name
      if child.is_dir():
        pending.append((name + '/', child))
      else:
        found.append(name)
  return sorted(found)


def copy_tree(src: epath.PathLike, dst: epath.PathLike, *, last: Iterable[str] = ()) -> list[str]:
  """Copies every file under directory `src` to the same relative path under `dst` (any backends),
  the relative paths named in `last` after all the others. Returns the relative paths copied."""
  source, target = path(src), path(dst)
  if not source.is_dir():
    raise FileNotFoundError(f'{source}: directory not found')
  files = list_files(source)
  final = [f for f in last if f in files]
  for name in [f for f in files if f not in final] + final:
    copy_file(source / name, target / name)
  return files


def staging_dir(dst: epath.PathLike, prefix: str = '.staging-') -> str:
  """A new local directory (mode 0755) to build `dst` in before `publish_dir`: beside `dst` when it is
  local (same file system, so the rename is atomic), in the system temp dir when it is remote."""
  if is_remote(dst):
    directory = tempfile.mkdtemp(prefix=prefix)
  else:
    parent = path(dst).parent
    makedirs(parent)
    directory = tempfile.mkdtemp(prefix=prefix, dir=os.fspath(parent))
  os.chmod(directory, 0o755)                   # mkdtemp makes it private
  return directory


def publish_dir(src: str, dst: epath.PathLike, *, last: Iterable[str] = ()) -> epath.Path:
  """Moves the local directory `src` to `dst`, replacing what is there; returns `dst`.

  Local `dst`: renamed into place (an existing `dst` is first renamed aside, then removed). Remote `dst`:
  the existing objects under it are removed, every file of `src` is uploaded (those named in `last`, the
  marker a reader checks for completeness, at the end), then `src` is removed.
  """
  target = path(dst)
  if is_remote(target):
    if target.exists():
      target.rmtree()
    copy_tree(src, target, last=last)
    shutil.rmtree(src, ignore_errors=True)
    return target
  makedirs(target.parent)
  trash = None
  if os.path.lexists(target):
    trash = os.fspath(target.parent / f'.{target.name}.old-{uuid.uuid4().hex[:8]}')
    os.rename(target, trash)
  os.replace(src, target)
  if trash is not None:
    shutil.rmtree(trash, ignore_errors=True)
  return target

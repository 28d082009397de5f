"""A fake GCS server for tests: `gcp-storage-emulator` (in memory) with two gaps to real GCS filled.

    python tests/gcs_emulator.py --port PORT --bucket NAME

Serves the GCS JSON API on 127.0.0.1:PORT with bucket NAME until terminated. Two behaviours of real GCS
that the emulator's download handler lacks, and that the project's clients rely on, are added around it
(nothing else is changed):

* Suffix byte ranges (`Range: bytes=-N`, the last N bytes; RFC 9110): the emulator answers with the whole
  object and status 200. ArrayRecord's GCS reader asks for a file's footer that way and then finds a
  corrupt file. The wrapper rewrites the range as the equivalent `bytes=START-`.
* The `x-goog-generation` / `x-goog-metageneration` headers on a media download: tensorstore (Orbax's
  array store, OCDBT) reads the object's generation from them ('Malformed StorageGeneration' without).
"""

from __future__ import annotations

import argparse
import re
from http import HTTPStatus

from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_SUFFIX = re.compile(r'^\s*bytes=-(\d+)\s*$')
_download = objects.download


def download(request, response, storage, *args, **kwargs):
  """The emulator's download handler, with `bytes=-N` rewritten as `bytes=max(size-N, 0)-` and the
  object's generation headers added to a successful answer."""
  match = _SUFFIX.match(request.get_header('range', None) or '')
  if match:
    try:
      size = len(storage.get_file(request.params['bucket_name'], request.params['object_id'], show_error=False))
    except NotFound:
      size = None
    if size is not None:
      start = max(size - int(match.group(1)), 0)
      get_header = request.get_header
      request.get_header = lambda key, default=None: (
          f'bytes={start}-' if key.lower() == 'range' else get_header(key, default))
  _download(request, response, storage, *args, **kwargs)
  if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
    obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
    response['x-goog-generation'] = str(obj['generation'])
    response['x-goog-metageneration'] = str(obj.get('metageneration', '1'))


def _install() -> None:
  objects.download = download                             # calls from inside the handlers module
  for _, methods in server.HANDLERS:                      # the route table holds the function itself
    for method, handler in list(methods.items()):
      if handler is _download:
        methods[method] = download


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--port', type=int, required=True)
  parser.add_argument('--bucket', required=True, help='bucket to create')
  args = parser.parse_args()
  _install()
  server.create_server('127.0.0.1', args.port, in_memory=True, default_bucket=args.bucket).run()


if __name__ == '__main__':
  main()

"""Work dirs, data dirs, caches and exports on `gs://` URLs, against a fake GCS server on 127.0.0.1.

Backend: the `gcp-storage-emulator` package (a pure-Python GCS JSON-API server, in memory), started as a
subprocess for this module by tests/gcs_emulator.py (which adds the suffix byte ranges real GCS serves and
ArrayRecord's reader needs). Every client of the project talks to it over HTTP as it would to GCS:

* etils.epath -> fsspec -> gcsfs (config.json, metrics.jsonl, TensorBoard, text/, Orbax metadata, the
  embedding cache, exports, TFDS metadata) via `STORAGE_EMULATOR_HOST`;
* tensorstore, which writes and reads Orbax's array data, via `TENSORSTORE_GCS_HTTP_URL` (and a fixed
  token, `GOOGLE_AUTH_TOKEN_FOR_TESTING`);
* ArrayRecord's GCS reader (google-cloud-cpp), which reads the TFDS records, via
  `CLOUD_STORAGE_EMULATOR_ENDPOINT`.

What lands in the bucket is checked with the server's JSON API directly (`_objects`, `_download`), not
through the code under test.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import jax
import numpy as np
import pytest

from conftest import tiny_config

BUCKET = 'optisar-test'
GS = f'gs://{BUCKET}'


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _clear_client_caches() -> None:
  """gcsfs and etils cache their filesystem objects (with the endpoint they were made with)."""
  import gcsfs
  from etils.epath import backend
  backend.fsspec_backend._get_filesystem.cache_clear()   # pylint: disable=protected-access
  gcsfs.GCSFileSystem.clear_instance_cache()


@pytest.fixture(scope='module')
def gcs(tmp_path_factory):
  """The fake GCS server's base URL, with bucket BUCKET; the clients' endpoint variables point at it."""
  port = _free_port()
  url = f'http://127.0.0.1:{port}'
  log = open(tmp_path_factory.mktemp('gcs') / 'emulator.log', 'w')
  proc = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), 'gcs_emulator.py'),
                           '--port', str(port), '--bucket', BUCKET], stdout=log, stderr=subprocess.STDOUT)
  # GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT (read when gcsfs is first imported): gcsfs's zonal-bucket probe asks
  # the Storage Control API, which the emulator does not serve, before every operation (a logged warning
  # each time); off, gcsfs is its plain JSON-API client. NO_GCE_CHECK: no metadata-server probe.
  env = {'STORAGE_EMULATOR_HOST': url, 'TENSORSTORE_GCS_HTTP_URL': url,
         'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'test-token', 'CLOUD_STORAGE_EMULATOR_ENDPOINT': url,
         'NO_GCE_CHECK': 'True', 'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false'}
  saved = {k: os.environ.get(k) for k in env}
  try:
    deadline = time.monotonic() + 30
    while True:
      try:
        urllib.request.urlopen(f'{url}/storage/v1/b/{BUCKET}', timeout=2).read()
        break
      except OSError:
        if proc.poll() is not None or time.monotonic() > deadline:
          raise RuntimeError(f'the GCS emulator did not start (see {log.name})') from None
        time.sleep(0.1)
    os.environ.update(env)
    _clear_client_caches()
    yield url
  finally:
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
    _clear_client_caches()
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def _objects(url: str, prefix: str) -> dict[str, dict]:
  """name -> object resource of every object under `prefix` in BUCKET (the server's listing)."""
  found, token = {}, None
  while True:
    query = {'prefix': prefix, 'maxResults': '1000'}
    if token:
      query['pageToken'] = token
    with urllib.request.urlopen(f'{url}/storage/v1/b/{BUCKET}/o?{urllib.parse.urlencode(query)}') as r:
      page = json.load(r)
    found.update({item['name']: item for item in page.get('items', [])})
    token = page.get('nextPageToken')
    if not token:
      return found


def _download(url: str, name: str) -> bytes:
  quoted = urllib.parse.quote(name, safe='')
  with urllib.request.urlopen(f'{url}/download/storage/v1/b/{BUCKET}/o/{quoted}?alt=media') as r:
    return r.read()


def _jsonl_steps(url: str, name: str) -> list[int]:
  return [json.loads(line)['step'] for line in _download(url, name).decode().splitlines()]


# ------------------------------------------------------------------------------------------- paths


def test_paths_keep_urls_and_write_json_objects(gcs, tmp_path):
  from optisar_jax.runtime import paths
  assert str(paths.path(f'{GS}/run/config.json')) == f'{GS}/run/config.json'
  assert str(paths.path('rel/x')) == os.path.join(os.getcwd(), 'rel', 'x')
  with pytest.raises(ValueError, match=r'memory://x: unsupported URL scheme'):
    paths.path('memory://x')
  paths.write_json_atomic(f'{GS}/p/a.json', {'b': [1, 2]}, indent=None)
  assert _download(gcs, 'p/a.json') == b'{"b": [1, 2]}\n'
  assert list(_objects(gcs, 'p/')) == ['p/a.json']              # written in place, no temporary object
  assert paths.read_json(f'{GS}/p/a.json') == {'b': [1, 2]}
  assert paths.isfile(f'{GS}/p/a.json') and paths.isdir(f'{GS}/p') and not paths.exists(f'{GS}/nope')
  with pytest.raises(FileNotFoundError, match=rf'^{GS}/p/missing.json: run config not found$'):
    paths.read_json(f'{GS}/p/missing.json', 'run config')
  paths.write_text_atomic(f'{GS}/p/bad.json', '{"b": ')
  with pytest.raises(ValueError, match=rf'^{GS}/p/bad.json: malformed JSON \('):
    paths.read_json(f'{GS}/p/bad.json')
  # A local directory published to the bucket: every file, the marker uploaded after all the others,
  # what was there before removed.
  paths.write_text_atomic(f'{GS}/pub/stale.txt', 'old')
  local = tmp_path / 'build'
  (local / 'sub').mkdir(parents=True)
  for name in ('DONE', 'a.bin', 'sub/b.bin'):
    (local / name).write_bytes(name.encode())
  paths.publish_dir(str(local), f'{GS}/pub', last=['DONE'])
  listed = _objects(gcs, 'pub/')
  assert sorted(listed) == ['pub/DONE', 'pub/a.bin', 'pub/sub/b.bin']
  assert _download(gcs, 'pub/sub/b.bin') == b'sub/b.bin'
  assert int(listed['pub/DONE']['generation']) > max(int(o['generation']) for n, o in listed.items()
                                                     if n != 'pub/DONE')
  assert not local.exists()


def test_local_atomic_writes_are_world_readable(tmp_path):
  from optisar_jax import predictions
  from optisar_jax.runtime import paths
  old = os.umask(0o022)
  try:
    written = paths.write_json_atomic(tmp_path / 'new' / 'm.json', {'x': 1})
    predictions.write_predictions(str(tmp_path / 'p.json'), [7], np.array([[0, 0, 2, 3]], float))
  finally:
    os.umask(old)
  assert os.stat(written).st_mode & 0o777 == 0o644
  assert os.stat(tmp_path / 'p.json').st_mode & 0o777 == 0o644
  assert sorted(os.listdir(tmp_path / 'new')) == ['m.json']    # the temporary file was renamed away


# ------------------------------------------------------------------------------------ run logging


def test_metrics_writer_on_gs_uploads_whole_files_and_appends_on_resume(gcs):
  from optisar_jax.train import run_logging
  workdir = f'{GS}/logs'
  writer = run_logging.MetricsWriter(workdir, enabled=True, sync_seconds=3600)
  writer.write(1, {'loss': 2.0})                    # the first write uploads at once
  assert _jsonl_steps(gcs, 'logs/metrics.jsonl') == [1]
  writer.write(2, {'loss': 1.5})                    # within sync_seconds: staged locally only
  assert _jsonl_steps(gcs, 'logs/metrics.jsonl') == [1]
  writer.close()                                    # close uploads everything
  assert _jsonl_steps(gcs, 'logs/metrics.jsonl') == [1, 2]
  events = [n for n in _objects(gcs, 'logs/tensorboard/') if '/events.out.tfevents.' in n]
  assert len(events) == 1 and b'loss' in _download(gcs, events[0])
  with run_logging.MetricsWriter(workdir, enabled=True, sync_seconds=0) as resumed:
    resumed.write(3, {'loss': 1.0})
    assert _jsonl_steps(gcs, 'logs/metrics.jsonl') == [1, 2, 3]   # sync_seconds=0: every write uploads
  assert [r['loss'] for r in run_logging.read_metrics(workdir)] == [2.0, 1.5, 1.0]
  assert len([n for n in _objects(gcs, 'logs/tensorboard/') if '/events.out.tfevents.' in n]) == 2


# -------------------------------------------------------------------------------------- text files


def test_text_files_and_embedding_cache_on_gs(gcs):
  from optisar_jax.data.vocabulary import TextVocabulary
  from optisar_jax.text import cache, tokenization
  vocabulary = TextVocabulary(['background', 'a ship', 'the bridge'], global_pool=['a ship'])
  vocabulary.save(f'{GS}/texts/vocabulary.json')
  assert json.loads(_download(gcs, 'texts/vocabulary.json'))['strings'] == ['background', 'a ship', 'the bridge']
  assert TextVocabulary.load(f'{GS}/texts/vocabulary.json') == vocabulary
  tokenizer = tokenization.build_caption_tokenizer(list(vocabulary), 32)
  tokenization.save_caption_tokenizer(tokenizer, f'{GS}/texts/tokenizer.json')
  loaded = tokenization.load_caption_tokenizer(f'{GS}/texts/tokenizer.json')
  np.testing.assert_array_equal(tokenization.tokenize(loaded, ['the ship'], 8),
                                tokenization.tokenize(tokenizer, ['the ship'], 8))
  with pytest.raises(FileNotFoundError, match=rf'{GS}/texts/none.json: caption tokenizer not found'):
    tokenization.load_caption_tokenizer(f'{GS}/texts/none.json')

  matrix = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
  cache.write_embedding_cache(f'{GS}/cache', list(vocabulary), matrix, 'enc:1')
  listed = _objects(gcs, 'cache/')
  assert sorted(listed) == ['cache/embeddings.npy', 'cache/strings.json']
  assert int(listed['cache/strings.json']['generation']) > int(listed['cache/embeddings.npy']['generation'])
  loaded_cache = cache.EmbeddingCache.load(f'{GS}/cache', expected_identity='enc:1')
  np.testing.assert_array_equal(loaded_cache.lookup(['the bridge']), matrix[2:3])
  cache.write_embedding_cache(f'{GS}/cache', ['x'], matrix[:1], 'enc:2')     # replaces the whole cache
  assert cache.EmbeddingCache.load(f'{GS}/cache').strings == ['x']
  with pytest.raises(FileNotFoundError, match=rf'{GS}/nocache: embedding cache directory not found'):
    cache.EmbeddingCache.load(f'{GS}/nocache')


def test_text_encoder_loads_from_gs_like_from_its_local_directory(gcs):
  from optisar_jax.runtime import paths
  from optisar_jax.text import load_text_encoder
  fixture = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'text', 'bert')
  paths.copy_tree(fixture, f'{GS}/encoders/bert')
  local = load_text_encoder(fixture, batch_size=4, buckets=())
  remote = load_text_encoder(f'{GS}/encoders/bert', batch_size=4, buckets=())
  assert remote.identity == local.identity                 # same name and content hash: same cache key
  strings = ['a ship', 'the bridge on the left']
  np.testing.assert_array_equal(remote.encode(strings), local.encode(strings))
  with pytest.raises(FileNotFoundError, match=rf'^{GS}/encoders/none: text encoder directory not found'):
    load_text_encoder(f'{GS}/encoders/none')
  paths.write_text_atomic(f'{GS}/encoders/broken/config.json', '{"model_type": "bert"')
  with pytest.raises(ValueError, match=rf'^{GS}/encoders/broken/config.json: malformed JSON'):
    load_text_encoder(f'{GS}/encoders/broken')             # errors name the remote file, not the copy


# ------------------------------------------------------------------------------ TFDS on the bucket


@pytest.fixture(scope='module')
def gs_tfds(gcs, synthetic_tfds):
  """The synthetic release built into gs://BUCKET/tfds (the same release as `synthetic_tfds`)."""
  from optisar_jax.data import build_tfds
  raw, _ = synthetic_tfds
  built = build_tfds('optsar_rsvg', raw, f'{GS}/tfds')
  assert built == f'{GS}/tfds/optsar_rsvg/1.0.0'
  return f'{GS}/tfds'


def test_tfds_built_into_gs_reads_the_same_records(gcs, gs_tfds, synthetic_tfds):
  from optisar_jax.data import build_tfds, sources
  listed = _objects(gcs, 'tfds/')
  version = 'tfds/optsar_rsvg/1.0.0/'
  assert version + 'dataset_info.json' in listed
  assert any(n.startswith(version + 'optsar_rsvg-train.array_record') for n in listed)
  others = [int(o['generation']) for n, o in listed.items() if not n.endswith('dataset_info.json')]
  assert int(listed[version + 'dataset_info.json']['generation']) > max(others)   # the marker is last
  assert build_tfds('optsar_rsvg', synthetic_tfds[0], gs_tfds) == f'{gs_tfds}/optsar_rsvg/1.0.0'  # kept
  remote = sources.open_source(tiny_config(gs_tfds), 'val')
  local = sources.open_source(tiny_config(synthetic_tfds[1]), 'val')
  assert len(remote) == len(local) > 0
  for i in range(len(local)):
    a, b = remote[i], local[i]
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['objects']['bbox'], b['objects']['bbox'])
    assert list(a['objects']['caption']) == list(b['objects']['caption'])


# ---------------------------------------------------------------------------- a training run on gs


@pytest.fixture(scope='module')
def gs_run(gcs, gs_tfds):
  """A tiny run with its work dir AND its data dir in the bucket, stopped after 2 of its 4 steps (as if
  preempted) and started again: (workdir, config, bucket listing after the first start, console output of
  the second start)."""
  from optisar_jax.train import loop
  config = tiny_config(gs_tfds, 'train.num_steps=4', 'train.checkpoint_every=4')
  workdir = f'{GS}/run'
  loop.train(config, workdir, stop_after_steps=2)
  first = _objects(gcs, 'run/')
  first_rows = _jsonl_steps(gcs, 'run/metrics.jsonl')
  output = io.StringIO()
  with contextlib.redirect_stdout(output):
    loop.train(config, workdir)                                   # resumes from gs://.../checkpoints/2
  return workdir, config, (first, first_rows), output.getvalue()


@pytest.mark.slow
def test_training_run_on_gs_resumes_and_restores_like_a_local_run(gcs, gs_run, gs_tfds, trained_tiny):
  """The stopped and resumed run in the bucket ends with the weights and metrics of the uninterrupted
  local run (`trained_tiny`); everything it wrote is in the bucket under the usual names."""
  from optisar_jax import evaluation
  straight, local_config = trained_tiny
  workdir, _, (first, first_rows), output = gs_run
  for key in ('run/config.json', 'run/metrics.jsonl', 'run/text/vocabulary.json', 'run/text/tokenizer.json'):
    assert key in first, sorted(first)
  assert any(n.startswith('run/checkpoints/2/state/') for n in first), sorted(first)
  assert not any(n.startswith('run/checkpoints/4/') for n in first)
  assert 'run/checkpoints/2/commit_success.txt' in first           # Orbax's completion mark on GCS
  assert not any('.orbax-checkpoint-tmp' in n for n in first)
  assert first_rows == [1, 2]
  assert not os.path.exists('gs:')                                # no local folder named after the URL

  assert f'resumed from {workdir}/checkpoints at step 2' in output
  listed = _objects(gcs, 'run/')
  assert any(n.startswith('run/checkpoints/4/state/') for n in listed)
  assert len([n for n in listed if n.startswith('run/tensorboard/events.out.tfevents.')]) == 2
  assert listed['run/text/vocabulary.json']['generation'] == first['run/text/vocabulary.json']['generation']
  remote_rows = [json.loads(line) for line in _download(gcs, 'run/metrics.jsonl').decode().splitlines()]
  with open(os.path.join(straight, 'metrics.jsonl')) as f:
    local_rows = [json.loads(line) for line in f]
  assert [r['step'] for r in remote_rows] == [1, 2, 3, 4]
  for a, b in zip(local_rows, remote_rows):
    assert a['loss'] == b['loss'] and a['box'] == b['box'] and a['cls'] == b['cls']

  loaded = evaluation.load_config_from_workdir(workdir)
  assert loaded.data.data_dir == gs_tfds
  loaded.data.data_dir = local_config.data.data_dir
  assert loaded.to_dict() == evaluation.load_config_from_workdir(straight).to_dict()
  pa, ra, step_a, _ = evaluation.restore_weights(local_config, straight)
  pb, rb, step_b, _ = evaluation.restore_weights(loaded, workdir)
  assert step_a == step_b == 4
  for x, y in zip(jax.tree.leaves(pa) + jax.tree.leaves(ra), jax.tree.leaves(pb) + jax.tree.leaves(rb)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  # Evaluation outputs go to the bucket too.
  result = evaluation.QueryResult(query_id=7, caption='a ship', box=np.array([1.0, 2.0, 4.0, 6.0]),
                                  score=0.9, gt_box=np.array([1.0, 2.0, 4.0, 6.0]), category='ship',
                                  image_index=0)
  evaluation.write_outputs({'all': {'Pr@0.5': 100.0}}, [result], output=f'{workdir}/eval/m.json',
                           predictions_out=f'{workdir}/eval/p.json')
  assert json.loads(_download(gcs, 'run/eval/m.json')) == {'all': {'Pr@0.5': 100.0}}
  assert json.loads(_download(gcs, 'run/eval/p.json')) == [{'id': 7, 'bbox': [1.0, 2.0, 3.0, 4.0],
                                                            'score': 0.9}]


@pytest.mark.slow
def test_export_of_a_gs_run_into_gs_loads_like_a_local_copy(gcs, gs_run, tmp_path):
  from optisar_jax import export
  from optisar_jax.runtime import paths
  workdir, config, _, _ = gs_run
  out = f'{GS}/export'
  assert export.write_export(workdir, out, platforms=['cpu']) == out
  listed = _objects(gcs, 'export/')
  for key in ('export.json', 'config.json', 'predict.jaxexport', 'embed.jaxexport', 'text/vocabulary.json',
              'text/tokenizer.json'):
    assert 'export/' + key in listed, sorted(listed)
  assert any(n.startswith('export/inference_state/') for n in listed)
  others = [int(o['generation']) for n, o in listed.items() if n != 'export/export.json']
  assert int(listed['export/export.json']['generation']) > max(others)      # complete once export.json is
  with pytest.raises(FileExistsError, match=f'{out}: already exists'):
    export.write_export(workdir, out, platforms=['cpu'])
  remote = export.load_export(out)
  paths.copy_tree(out, tmp_path / 'copy')
  local = export.load_export(str(tmp_path / 'copy'))
  images = np.random.default_rng(0).integers(0, 255, (2, config.data.imgsz, config.data.imgsz, 3), np.uint8)
  queries = np.broadcast_to(remote.embed(['a ship', 'the bridge'])[None], (2, 2, int(config.text.dim))).copy()
  np.testing.assert_array_equal(remote.embed(['a ship']), local.embed(['a ship']))
  for a, b in zip(remote.predict(images, queries), local.predict(images, queries)):
    np.testing.assert_array_equal(a, b)

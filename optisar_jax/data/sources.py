"""The TFDS datasets of the project: building them from a release and opening them for reading.

    build_tfds('optsar_rsvg', manual_dir, data_dir)   -> the built version folder (ArrayRecord)
    open_source(config, split)                        -> tfds.data_source of config.data.name
    training_captions(source)                         -> (captions in record order, category names)

The TFDS builders (`tfds_builders/`) import the release readers (`data/release.py`); this module imports
the builders (to register them), never the reverse.
"""

from __future__ import annotations

import logging
import os
import shutil

import ml_collections

from optisar_jax.data.release import DATASETS, TFDS_VERSION, DatasetError
from optisar_jax.runtime import paths

INFO_FILE = 'dataset_info.json'


def build_tfds(dataset: str, manual_dir: str, data_dir: str, *, overwrite: bool = False) -> str:
  """Builds TFDS dataset `dataset` (ArrayRecord) from the release in `manual_dir` into `data_dir`.

  The build runs in a temporary folder inside `data_dir` and is renamed to `data_dir/<dataset>/1.0.0` only
  when complete, so a failed build leaves nothing that looks built. An existing complete build is kept
  (and returned) unless `overwrite`. Returns the dataset version folder. Bad input raises DatasetError.

  A remote `data_dir` (`gs://bucket/tfds`) is built in a local temporary folder and then uploaded, with
  dataset_info.json (what makes TFDS take a version folder for built) last: the ArrayRecord writer of the
  array_record wheel writes local files only (riegeli FdWriter; its reader also reads gs://), and an object
  store has no atomic rename of a folder. Readers (`open_source`) use the remote folder directly.
  """
  if dataset not in DATASETS:
    raise DatasetError(f'--dataset {dataset!r}: unknown dataset (expected one of {", ".join(DATASETS)})')
  manual_dir = os.path.abspath(os.fspath(manual_dir))
  if not os.path.isdir(manual_dir):
    raise DatasetError(f'{manual_dir}: manual_dir not found')
  final = paths.path(data_dir) / dataset / TFDS_VERSION
  if (final / INFO_FILE).is_file() and not overwrite:
    return str(final)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  import tfds_builders  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import  (registers builders)
  tmp = paths.staging_dir(paths.path(data_dir) / dataset, prefix=f'.{dataset}.building-')
  try:
    builder = tfds.builder(dataset, data_dir=tmp)
    builder.download_and_prepare(
        file_format='array_record',
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    built = os.path.join(tmp, dataset, TFDS_VERSION)
    if not os.path.isfile(os.path.join(built, INFO_FILE)):
      raise DatasetError(f'{built}: the TFDS build finished without {INFO_FILE}')
    paths.publish_dir(built, final, last=[INFO_FILE])
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return str(final)


class _QuietPILDecodeWarning(logging.Filter):
  """Drops TFDS's "OpenCV is not installed ... Defaulting to PIL" warning: PIL is this project's decoder on
  purpose (OpenCV is not a dependency), so the warning says nothing a user can act on."""

  def filter(self, record: logging.LogRecord) -> bool:
    return 'OpenCV is not installed' not in str(record.msg)


# Installed on import: grain's worker processes decode records too, and they import this package.
if not any(isinstance(f, _QuietPILDecodeWarning) for f in logging.getLogger('absl').filters):
  logging.getLogger('absl').addFilter(_QuietPILDecodeWarning())


def open_source(config: ml_collections.ConfigDict, split: str, *, skip_images: bool = False,
                data_dir: str | None = None):
  """`tfds.data_source` of the config's dataset in `data_dir` (default `config.data.data_dir`); errors name
  the data dir and split. `skip_images` leaves the images encoded (for reading captions only)."""
  data_dir = config.data.data_dir if data_dir is None else data_dir
  from etils import epath
  info = epath.Path(data_dir) / config.data.name / TFDS_VERSION / 'dataset_info.json'
  if not info.exists():      # checked first: tfds.data_source would otherwise try to build it in data_dir
    raise FileNotFoundError(
        f"{data_dir}: no built TFDS dataset '{config.data.name}' ({info} is missing); build it with "
        f'scripts/build_dataset.py --dataset {config.data.name} --manual_dir RELEASE_DIR --data_dir {data_dir}')
  import tensorflow_datasets as tfds
  import tfds_builders  # noqa: F401  (registers optsar_rsvg, dior_rsvg)
  decoders = {'image': tfds.decode.SkipDecoding()} if skip_images else None
  try:
    return tfds.data_source(config.data.name, split=split, data_dir=data_dir, decoders=decoders)
  except Exception as err:  # tfds raises several types for a missing/unbuilt dataset
    raise FileNotFoundError(
        f"{data_dir}: cannot open TFDS dataset '{config.data.name}' split '{split}' "
        f'({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ""}); '
        'build it with scripts/build_dataset.py') from None


def _decode(value) -> str:
  return (value.decode('utf-8') if isinstance(value, bytes) else str(value)).strip()


def training_captions(source) -> tuple[list[str], list[str]]:
  """(captions in record order, category names) of a TFDS training source (images need not be decoded)."""
  captions = []
  for i in range(len(source)):
    captions.extend(_decode(c) for c in source[i]['objects']['caption'])
  names = list(source.dataset_info.features['objects']['category'].names)
  return captions, names

"""OptSAR-RSVG as a TFDS dataset: one example per image, one object per referring expression.

Built from the extracted release in `manual_dir` (images/, labels/, train.json, val.json, test.json),
validated by `optisar_jax.data.release.read_optsar`. Features: docs/interfaces.md section 4.
"""

import tensorflow_datasets as tfds

from optisar_jax.data import release


class OptsarRsvg(tfds.core.GeneratorBasedBuilder):
  """OptSAR-RSVG: optical and SAR remote-sensing visual grounding (16 categories)."""

  VERSION = tfds.core.Version(release.TFDS_VERSION)
  RELEASE_NOTES = {release.TFDS_VERSION: 'First version: one example per image, ArrayRecord.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download OptSAR-RSVG (see the OptiSAR-Net++ README) and extract it so that manual_dir holds
  images/{train,val,test}/, labels/{train,val,test}/, train.json, val.json and test.json (or an
  OptSAR-RSVG/ folder holding them). `python scripts/make_synthetic_dataset.py --format optsar` writes
  a synthetic copy in the same layout.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=('OptSAR-RSVG: referring expressions grounded to boxes in optical and SAR '
                     'remote-sensing images; one example per image with all its expressions.'),
        features=release.tfds_features('optsar_rsvg'),
        homepage='https://github.com/JunDong-dev/OptiSAR-Net-PlusPlus',
    )

  def _split_generators(self, dl_manager):
    records = release.read_release('optsar_rsvg', str(dl_manager.manual_dir))
    return {split: self._generate_examples(recs) for split, recs in records.items()}

  def _generate_examples(self, records):
    for record in records:
      yield record.filename, release.tfds_example(record)

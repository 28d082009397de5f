"""DIOR-RSVG as a TFDS dataset: one example per (image, split), one object per referring expression.

Built from the extracted release in `manual_dir` (Annotations/, JPEGImages/, train.txt, val.txt,
test.txt), validated by `optisar_jax.data.release.read_dior`. The split files list global object indices,
so an image can appear in several splits, each time with only that split's objects. Features:
docs/interfaces.md section 4 (all images optical).
"""

import tensorflow_datasets as tfds

from optisar_jax.data import release


class DiorRsvg(tfds.core.GeneratorBasedBuilder):
  """DIOR-RSVG: optical remote-sensing visual grounding (20 DIOR classes)."""

  VERSION = tfds.core.Version(release.TFDS_VERSION)
  RELEASE_NOTES = {release.TFDS_VERSION: 'First version: one example per image and split, ArrayRecord.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download DIOR-RSVG (ZhanYang-nwpu/RSVG-pytorch) and extract it so that manual_dir holds
  Annotations/*.xml, JPEGImages/*.jpg, train.txt, val.txt and test.txt (or a DIOR_RSVG/ folder holding
  them). `python scripts/make_synthetic_dataset.py --format dior` writes a synthetic copy in this layout.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=('DIOR-RSVG: referring expressions grounded to boxes in optical remote-sensing '
                     'images; one example per image and split with that split\'s expressions.'),
        features=release.tfds_features('dior_rsvg'),
        homepage='https://github.com/ZhanYang-nwpu/RSVG-pytorch',
    )

  def _split_generators(self, dl_manager):
    records = release.read_release('dior_rsvg', str(dl_manager.manual_dir))
    return {split: self._generate_examples(recs) for split, recs in records.items()}

  def _generate_examples(self, records):
    for record in records:
      yield record.filename, release.tfds_example(record)

"""Data: sources (Kaggle layout, built-in synthetic, official PCam files), the packed cache,
splits and the tf.data pipeline.

Importing the package registers every source in `sources.SOURCES`; a new source is one module
with a registered DataSource class, imported here, plus its YAML in conf/data/.
"""

from histo_transfer.data import folders, kaggle, pcam_h5, synthetic  # noqa: F401 (they register their sources)

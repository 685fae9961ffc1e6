"""DeepFashion2 retrieval as the TFDS builder `deepfashion2` (importing this package registers it).

  python -m data_prep.deepfashion2 --manual_dir DIR [--data_dir D] [--password P]

See docs/deepfashion.md for what to download and where to put it.
"""

from data_prep.deepfashion2.builder import Deepfashion2
from data_prep.deepfashion2.release import CATEGORY_NAMES
from data_prep.deepfashion2.release import DeepFashion2Error
from data_prep.deepfashion2.release import validate_release

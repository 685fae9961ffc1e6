"""DeepFashion In-shop as the TFDS builder `deepfashion_inshop` (importing this package registers it).

  python -m data_prep.deepfashion_inshop --manual_dir DIR [--data_dir DIR] [--config all|women|men]

See docs/deepfashion.md for what to download and where to put it.
"""

from data_prep.deepfashion_inshop.builder import DeepfashionInshop
from data_prep.deepfashion_inshop.builder import InshopConfig
from data_prep.deepfashion_inshop.release import BuildPlan
from data_prep.deepfashion_inshop.release import ImageRecord
from data_prep.deepfashion_inshop.release import InshopDownloadError
from data_prep.deepfashion_inshop.release import plan_build
from data_prep.deepfashion_inshop.release import validate_release

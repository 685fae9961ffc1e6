"""The synthetic In-shop dataset; importing this package registers the TFDS builder `synthetic_inshop`."""

from data_prep.synthetic_inshop.synthetic_inshop import BUILDER_CONFIGS
from data_prep.synthetic_inshop.synthetic_inshop import SyntheticInshop
from data_prep.synthetic_inshop.synthetic_inshop import SyntheticInshopConfig

__all__ = ["BUILDER_CONFIGS", "SyntheticInshop", "SyntheticInshopConfig"]

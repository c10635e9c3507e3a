"""Models: the synthetic spectral-normalised layer and MDEQ-Tiny. They know nothing of training loops."""
from .mdeq import MDEQ, MDEQConfig  # noqa: F401

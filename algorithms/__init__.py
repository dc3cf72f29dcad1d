"""Importance criteria for maskprune, installed as ``maskprune.algorithms``.

They use only maskprune's public API, as a user's own criterion would.

Example:
    >>> from maskprune.algorithms import L1Norm, Random
    >>> L1Norm(), Random(seed=0)
    (L1Norm(reduction='sum'), Random(seed=0))
"""

from .baselines import Random
from .norms import L1Norm

__all__ = ["L1Norm", "Random"]

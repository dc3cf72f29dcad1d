"""Importance criteria for maskprune, installed as ``maskprune.algorithms``.

They use only maskprune's public API, as a user's own criterion would.

Examples:
    >>> from maskprune.algorithms import FPGM, BNScale, L1Norm, L2Norm, Random, Uniform
    >>> L1Norm(), L2Norm(), FPGM(distance="cosine")
    (L1Norm(reduction='sum'), L2Norm(reduction='sum'), FPGM(rate_norm=1.0, distance='cosine', reduction='sum'))
    >>> Random(seed=0), Uniform(seed=0), BNScale(strength=1e-4)
    (Random(seed=0), Uniform(seed=0), BNScale(strength=0.0001))
    >>> from maskprune.algorithms import LAMP, GroupMagnitude    # whole groups; layer-adaptive
    >>> GroupMagnitude(p=1), LAMP()
    (GroupMagnitude(p=1, include_norms=True, reduction='mean'), LAMP(reduction='mean'))
    >>> from maskprune.algorithms import APoZ, Taylor, ThiNet    # activations: need data or training
    >>> Taylor(), ThiNet([], samples=10)
    (Taylor(), ThiNet(samples=10, rescale=False, max_batches=None))
    >>> from maskprune.algorithms import FLAP, Activation, WandaSP   # calibrated criteria for language models
    >>> Activation([]), WandaSP([])
    (Activation(batch_agg='l2', seq_agg='mean', max_batches=None), WandaSP(max_batches=None))
    >>> FLAP([])
    FLAP(compensate=True, max_batches=None)
    >>> from maskprune.algorithms import RouterUsage   # the experts of mixture-of-experts layers
    >>> RouterUsage([])
    RouterUsage(max_batches=None)
    >>> from maskprune.algorithms import ByKind   # width, depth and experts in one Mask
    >>> ByKind(channels=L2Norm(), block=BlockImportance([]))
    ByKind(channels=L2Norm(reduction='sum'), block=BlockImportance(max_batches=None))
"""

from .activation import Activation
from .apoz import APoZ
from .baselines import Random, Uniform
from .blocks import BlockImportance
from .bnscale import BNScale
from .by_kind import ByKind
from .experts import RouterUsage
from .flap import FLAP
from .fpgm import FPGM
from .group_magnitude import GroupMagnitude
from .lamp import LAMP
from .norms import L1Norm, L2Norm
from .taylor import Taylor
from .thinet import ThiNet
from .wanda import WandaSP

__all__ = [
    "FLAP",
    "FPGM",
    "LAMP",
    "APoZ",
    "Activation",
    "BNScale",
    "BlockImportance",
    "ByKind",
    "GroupMagnitude",
    "L1Norm",
    "L2Norm",
    "Random",
    "RouterUsage",
    "Taylor",
    "ThiNet",
    "Uniform",
    "WandaSP",
]

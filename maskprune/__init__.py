"""maskprune: structural pruning by soft masks and exact hard export.

Examples:
    >>> import torch, torchvision
    >>> from maskprune import Mask
    >>> from maskprune.algorithms import L1Norm
    >>> model = torchvision.models.resnet18()
    >>> mask = Mask(model, input_shape=(1, 3, 64, 64), algorithm=L1Norm(), ratio=0.5).make()
    >>> _ = mask.do_mask()
    >>> pruned = mask.generate_pruned_model()   # verified: same outputs as the masked model
"""

from ._activations import ActivationSite, watch
from ._algorithm import Algorithm
from ._groups import BlockGroup, ExpertGroup, Group, Member
from ._layers import LayerRule, masked_norm, register, unregister
from ._progress import progress, shows_progress
from ._recalibrate import recalibrate_bn
from ._records import batch_input, call_model, evaluating, iter_tensors, model_device, to_device
from ._report import GroupSparsity, Sparsity
from ._spec import PruneSpec, TensorCut
from ._verify import VerifyResult, verify
from ._version import __version__
from .errors import (
    DataDependentError,
    DataDependentWarning,
    ExportError,
    MaskpruneError,
    NothingToPruneError,
    NotMadeError,
    SpecError,
    TraceError,
)
from .mask import Mask
from .measure import count_flops, count_parameters
from .serialization import load_pruned, save_pruned

__all__ = [
    "ActivationSite",
    "Algorithm",
    "BlockGroup",
    "DataDependentError",
    "DataDependentWarning",
    "ExpertGroup",
    "ExportError",
    "Group",
    "GroupSparsity",
    "LayerRule",
    "Mask",
    "MaskpruneError",
    "Member",
    "NotMadeError",
    "NothingToPruneError",
    "PruneSpec",
    "Sparsity",
    "SpecError",
    "TensorCut",
    "TraceError",
    "VerifyResult",
    "__version__",
    "batch_input",
    "call_model",
    "count_flops",
    "count_parameters",
    "evaluating",
    "iter_tensors",
    "load_pruned",
    "masked_norm",
    "model_device",
    "progress",
    "recalibrate_bn",
    "register",
    "save_pruned",
    "shows_progress",
    "to_device",
    "unregister",
    "verify",
    "watch",
]

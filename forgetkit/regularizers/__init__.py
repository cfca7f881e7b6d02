"""Regularizers against forgetting: a small Protocol, pure functional cores, thin wrappers.

* :mod:`~forgetkit.regularizers.functional` -- penalties and in-place gradient helpers;
* :mod:`~forgetkit.regularizers.fisher` -- diagonal Fisher estimation, post-processing, files;
* :class:`L2SP` (``type: l2``), :class:`EWC` (``type: ewc``), :class:`KLToInit` (``type: kl``);
* :mod:`~forgetkit.regularizers.wise` -- WiSE-FT weight interpolation (post hoc);
* replay is data, not a regularizer: :func:`build_regularizers` routes it to the data layer.
"""

from forgetkit.regularizers.base import RegContext, Regularizer
from forgetkit.regularizers.build import build_regularizers
from forgetkit.regularizers.ewc import EWC
from forgetkit.regularizers.fisher import estimate_fisher, load_fisher, save_fisher
from forgetkit.regularizers.kl import KLToInit
from forgetkit.regularizers.l2 import L2SP
from forgetkit.regularizers.wise import interpolate_state_dicts, write_wise_checkpoints

__all__ = [
    "EWC",
    "KLToInit",
    "L2SP",
    "RegContext",
    "Regularizer",
    "build_regularizers",
    "estimate_fisher",
    "interpolate_state_dicts",
    "load_fisher",
    "save_fisher",
    "write_wise_checkpoints",
]

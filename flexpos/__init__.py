"""flexpos: positional encodings and attention biases for PyTorch FlexAttention.

Stages: input transforms (:class:`Sinusoidal`, :class:`LearnedVocab`,
:class:`LearnedContinuous`) act on x; query/key transforms (:class:`Rotary`, :class:`XL`) and
score_mods (:class:`ALiBi`, :class:`DPB`) run inside :func:`attention`. Masks are BlockMasks
from :mod:`flexpos.masks`.
"""

__version__ = "0.1.0"

from ._compile import set_compile
from ._host import no_host_reads, reuse_position_reads
from .alibi import ALiBi
from .attention import attention
from .base import Positional
from .dpb import DPB
from .layer import AttentionLayer
from .learned import LearnedContinuous, LearnedVocab
from .masks import (
    and_masks,
    causal_mask,
    dense_mask,
    distance_window_mask,
    full_mask,
    padding_mask,
    segment_mask,
    sliding_window_mask,
)
from .positions import Positions
from .rotary import Rotary
from .sinusoidal import Sinusoidal
from .xl import XL

__all__ = [
    "ALiBi",
    "AttentionLayer",
    "DPB",
    "LearnedContinuous",
    "LearnedVocab",
    "Positional",
    "Positions",
    "Rotary",
    "Sinusoidal",
    "XL",
    "and_masks",
    "attention",
    "causal_mask",
    "dense_mask",
    "distance_window_mask",
    "full_mask",
    "no_host_reads",
    "padding_mask",
    "reuse_position_reads",
    "segment_mask",
    "set_compile",
    "sliding_window_mask",
]

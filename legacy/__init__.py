"""bio-attention 0.1.15 compatibility layer on top of flexpos.

- :mod:`legacy.positional`: the seven positional plugins and ``Base`` with bio-attention's
  constructors, methods, shapes, state_dict keys and numbers. Switching is one import:
  ``from legacy import positional`` instead of ``from bio_attention import positional``.
- :mod:`legacy.layers`: ``AttnLayer`` and ``TransformerLayer`` with bio-attention's call
  signature and state_dict keys, running the plugins through FlexAttention (score_mods,
  BlockMasks) instead of materialising (L, L) masks.

New code should use flexpos directly (``flexpos.attention``, ``flexpos.AttentionLayer``); the
plugins' checkpoints load into the native modules unchanged. See docs/legacy.md.
"""

from . import layers, positional
from .layers import AttnLayer, TransformerLayer

__all__ = ["AttnLayer", "TransformerLayer", "layers", "positional"]

"""Mixture-of-experts checkpoints: expert layout, expert merging (MC-SMoE, Sub-MoE), MoE building.

``layout`` is pure name parsing; ``compress`` and ``build`` run models with transformers and are
imported on demand (they need torch and transformers).
"""

from mergeops.moe.layout import MoeLayer, MoeLayout, detect_moe

__all__ = ["MoeLayer", "MoeLayout", "detect_moe"]

"""Search policies over merges (pure: no registry, no orchestration): a small CMA-ES over a
box of method parameters (``cma_es``) and M2N2's evolving archive of merged models
(``m2n2``). The flow that scores candidates and keeps the state lives in ``flows``.
"""

from mergeops.search.cma_es import Box, CmaEs
from mergeops.search.m2n2 import Archive, Proposal, attraction, child_state_dict, shared_fitness

__all__ = [
    "Archive",
    "Box",
    "CmaEs",
    "Proposal",
    "attraction",
    "child_state_dict",
    "shared_fitness",
]

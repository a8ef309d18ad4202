"""Task-vector merges: task arithmetic and its sparsified, sign-elected and rebalanced variants.

Importing this package imports every module in it, so each module's ``@register`` runs.
"""

from mergeops.methods._discover import import_submodules

import_submodules(__name__, __path__)

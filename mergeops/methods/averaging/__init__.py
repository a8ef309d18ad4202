"""Weight averaging and interpolation: linear, mwa, and mergekit's spherical and stock averages.

Importing this package imports every module in it, so each module's ``@register`` runs.
"""

from mergeops.methods._discover import import_submodules

import_submodules(__name__, __path__)

"""dynres: treat image resolution as a per-image decision.

The public API: open a store, read prefixes, decode them; everything else is reached through its layer's package
(``dynres.io``, ``dynres.policy``, ``dynres.model``, ``dynres.runtime``, ``dynres.study``, ``dynres.bench``,
``dynres.report``, ``dynres.cli``).
"""

from dynres.io.decode import decode
from dynres.io.store import Store, StoreLike, open_store
from dynres.paper import crop_area, crop_side
from dynres.version import __version__

__all__ = ["Store", "StoreLike", "crop_area", "crop_side", "decode", "open_store", "__version__"]

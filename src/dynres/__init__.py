"""dynres: treat image resolution as a per-image decision.

Public API (grows as modules land): ``open_store``, ``Store``, ``decode``.
"""

__version__ = "0.1.0"

from dynres.io.store import Store, open_store  # noqa: E402

__all__ = ["Store", "open_store", "__version__"]

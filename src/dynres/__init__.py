"""dynres: treat image resolution as a per-image decision.

Public API (grows as modules land): ``open_store``, ``Store``, ``decode``.
"""

__version__ = "0.1.0"

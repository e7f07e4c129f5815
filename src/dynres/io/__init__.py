"""Bytes on storage: progressive-JPEG structure (``jpeg``), the store's on-disk format (``format``), reading it by scan
prefix (``store``), writing it (``ingest``), prefix bytes to tensors (``decode``) and the built-in data (``synth``)."""

"""Benchmarks: one module per thing measured (``io``, ``pipeline``, ``serve``, ``kernels``), each behind a ``dynres
bench`` command. A benchmark measures into a record (a dict), renders Markdown from that record only
(``render_markdown``), and ``run_bench_<name>`` writes both as ``NAME.json`` + ``NAME.md``
(:func:`dynres.records.write_records`). Timings live in these records, never in test assertions."""

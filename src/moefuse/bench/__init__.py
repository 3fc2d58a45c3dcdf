"""``moefuse bench``: moefuse side by side with Transformers' ``eager`` and ``grouped_mm`` experts at three levels
(one grouped GEMM, the MoE block, a model's training step), outputs checked to agree before anything is timed.

Run ``moefuse bench --help``; :mod:`moefuse.bench.cli` holds the command, each level its own module
(:mod:`~moefuse.bench.op`, :mod:`~moefuse.bench.block`, :mod:`~moefuse.bench.model`).
"""

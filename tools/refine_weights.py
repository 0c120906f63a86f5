"""Refine the GPU weight table from broker throughput logs: `python tools/refine_weights.py LOG.jsonl... --out FILE`.

The same command as `virnucpro weights refine`; see virnucpro/weights/refine.py for the fit.
"""

from __future__ import annotations

from virnucpro.weights.cli import refine

if __name__ == "__main__":
    refine.main(prog_name="refine_weights.py")

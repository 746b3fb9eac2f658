"""Auditing how stealable a victim is: what a defender watching its API would have seen.

`prada`: PRADA's query-stream detector (Juuti et al. 2019) and a reader of the query streams
a finished attack left in its ledger. Pure numpy / scipy: no Ray, no victim.
"""

from aspkd_ray.audit.prada import (
    PradaResult,
    QueryStream,
    prada_detect,
    queries_from_ledger,
)

__all__ = ["PradaResult", "QueryStream", "prada_detect", "queries_from_ledger"]

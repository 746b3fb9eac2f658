"""The teacher service: the budgeted, durable, only door to the black-box victim.

Attack code gets a `TeacherClient` from `connect_teacher_service` and nothing else: it buys
labels for proxy samples by id, within the budget, through one named Ray actor that keeps a
write-ahead ledger. See README "Teacher service and budget" for the budget semantics.
"""

from aspkd_ray.teacher.errors import BudgetExhausted, InvalidAnswer, LedgerMismatch, VictimError
from aspkd_ray.teacher.ledger import Ledger
from aspkd_ray.teacher.service import TeacherClient, connect_teacher_service

_SERVING = ("save_victim_model", "start_victim_server", "stop_victim_server")


def __getattr__(name: str):
    # Serving imports MLflow (seconds); only load it when asked for.
    if name in _SERVING:
        from aspkd_ray.teacher import serving

        return getattr(serving, name)
    raise AttributeError(f"module 'aspkd_ray.teacher' has no attribute {name!r}")


__all__ = [
    "BudgetExhausted", "InvalidAnswer", "Ledger", "LedgerMismatch", "TeacherClient",
    "VictimError", "connect_teacher_service", "save_victim_model", "start_victim_server",
    "stop_victim_server",
]

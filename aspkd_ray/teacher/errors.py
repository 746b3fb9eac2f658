"""Errors of the teacher service. Each carries what the caller needs to carry on."""

from __future__ import annotations

import numpy as np

from aspkd_ray.errors import UserError


class BudgetExhausted(RuntimeError):
    """The request passed the global budget n (or the trial's cap).

    The request was answered in order up to the cap: `answered_ids` and `labels` (aligned) are
    the answers given (charged, or free from the ledger); `refused_ids` were not sent to the
    victim and cost nothing.
    """

    def __init__(self, message: str, answered_ids: list[str], labels: np.ndarray,
                 refused_ids: list[str]) -> None:
        super().__init__(message)
        self.answered_ids = answered_ids
        self.labels = labels
        self.refused_ids = refused_ids

    def __reduce__(self):  # keep the attributes when the error crosses a process boundary
        return (type(self), (str(self), self.answered_ids, self.labels, self.refused_ids))


class VictimError(RuntimeError):
    """The victim failed (after the HTTP retries) or gave an answer that failed validation.

    `unanswered_ids` were reserved (charged) but not answered: the ledger reports them as
    `reserved_unanswered`, and asking for them again retries the victim without a new charge.
    `answered_ids` / `labels` are the answers that did arrive in the same request.
    """

    def __init__(self, message: str, answered_ids: list[str], labels: np.ndarray,
                 unanswered_ids: list[str]) -> None:
        super().__init__(message)
        self.answered_ids = answered_ids
        self.labels = labels
        self.unanswered_ids = unanswered_ids

    def __reduce__(self):
        return (type(self), (str(self), self.answered_ids, self.labels, self.unanswered_ids))


class InvalidAnswer(ValueError):
    """The victim's answer is malformed: wrong length or width, NaN, negative or
    non-normalised probabilities, unknown class ids."""


class LedgerMismatch(UserError, ValueError):
    """An existing ledger or teacher service was set up with other settings than asked."""


class LedgerCorrupt(UserError):
    """The ledger's files fail their integrity checks (a truncated, garbage or missing
    segment, answers without reservations): it is never used, since it could undercount
    what was spent. The message names the files and what to do."""


class LedgerBusy(UserError):
    """Another teacher service holds the ledger's lease (one writer per ledger). The message
    names the holder (host, pid, Ray cluster) and when its lease goes stale."""


class LeaseLost(UserError):
    """This service no longer holds the ledger's lease (another service took it over, or the
    storage could not be reached to renew it): it refuses to answer, so the budget stays
    exact."""


class LedgerUnavailable(UserError):
    """The teacher service cannot reach the ledger it was created with (a local folder on a
    node that is gone, storage down): it refuses to answer rather than start from 0 spent."""


class TrialClosed(UserError):
    """The sweep ended this trial (its scheduler stopped it, or it finished): the shared
    teacher service sells it nothing more, so a stopped trial spends no more budget."""

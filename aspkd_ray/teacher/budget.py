"""Who gets what: the budget rules, as a pure function of the ledger state.

- The global budget n counts distinct samples charged. A sample is charged once, when it is
  first reserved; asking again (any client, any trial) is free: answered samples come from the
  ledger, reserved-but-unanswered ones are sent to the victim again without a new charge.
- A trial's cap counts the distinct samples delivered to that trial, whether it paid for them
  or another trial did: every trial stays a valid attack with its own budget, while samples
  bought by one trial cost the shared budget nothing when another trial asks for them.
- A request is served in order; once a needed allowance is used up, the remaining samples
  that would need it are refused (and cost nothing). Free samples are never refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aspkd_ray.teacher.ledger import LedgerState


@dataclass
class Plan:
    granted: list[str] = field(default_factory=list)       # answered to the caller, in order
    refused: list[str] = field(default_factory=list)
    new_charges: set[str] = field(default_factory=set)     # first reservation: charged now
    new_grants: set[str] = field(default_factory=set)      # new to the trial, already charged
    to_query: list[str] = field(default_factory=list)      # granted but not answered yet
    refused_by: str | None = None                          # "budget" or "trial cap"


def plan_request(unique_ids: list[str], state: LedgerState, budget: int, trial: str,
                 trial_cap: int | None) -> Plan:
    """Decide, for distinct ids in request order, which are granted, charged or refused."""
    plan = Plan()
    left = budget - len(state.charged)
    grants = state.trial_grants.get(trial, set()) if trial else set()
    trial_left = (trial_cap - len(grants)) if (trial and trial_cap is not None) else None
    for i in unique_ids:
        charged = i in state.charged
        new_to_trial = bool(trial) and i not in grants
        if not charged and left <= 0:
            plan.refused.append(i)
            plan.refused_by = plan.refused_by or "budget"
            continue
        if new_to_trial and trial_left is not None and trial_left <= 0:
            plan.refused.append(i)
            plan.refused_by = plan.refused_by or "trial cap"
            continue
        plan.granted.append(i)
        if not charged:
            plan.new_charges.add(i)
            left -= 1
        elif new_to_trial:
            plan.new_grants.add(i)
        if new_to_trial and trial_left is not None:
            trial_left -= 1
        if i not in state.answers:
            plan.to_query.append(i)
    return plan

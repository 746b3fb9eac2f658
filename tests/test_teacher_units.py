"""Teacher service building blocks without Ray: answer checks, budget rules, the ledger."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from aspkd_ray.teacher import BudgetExhausted, InvalidAnswer, Ledger, LedgerMismatch
from aspkd_ray.teacher.budget import plan_request
from aspkd_ray.teacher.checks import check_answer, check_request
from aspkd_ray.teacher.http_victim import TokenBucket, safe_url
from aspkd_ray.teacher.ledger import LedgerState

# ---- answer checks ----------------------------------------------------------------------

GOOD = np.full((3, 4), 0.25)


@pytest.mark.parametrize("answer, match", [
    (GOOD[:2], "shape"),                                        # wrong length
    (np.full((3, 5), 0.2), "shape"),                            # wrong number of classes
    (np.where(np.eye(3, 4) > 0, np.nan, 0.25), "NaN"),
    (np.array([[1.2, -0.2, 0, 0]] * 3), "negative"),
    (np.full((3, 4), 0.3), "not normalised"),
    (np.array([["a", "b", "c", "d"]] * 3), "non-numeric"),
    (np.array([[0.25, 0.25, 0.25, None]] * 3, dtype=object), "non-numeric"),
    (np.full(3, 0.25), "shape"),                                # 1-D in soft mode
])
def test_soft_answer_rejects_malformed(answer, match):
    with pytest.raises(InvalidAnswer, match=match):
        check_answer(answer, 3, 4, "soft")


def test_soft_answer_accepted_as_float32():
    out = check_answer(GOOD.tolist(), 3, 4, "soft")
    assert out.dtype == np.float32 and out.shape == (3, 4)


@pytest.mark.parametrize("answer, match", [
    ([0, 1], "shape"),
    ([0, 1, 4], "unknown class"),
    ([0, -1, 2], "unknown class"),
    ([0.5, 1.0, 2.0], "non-integer"),
    (GOOD, "shape"),                                            # probabilities in hard mode
    ([True, False, True], "booleans"),
    ([0, 1, float("nan")], "non-integer"),
])
def test_hard_answer_rejects_malformed_and_probabilities(answer, match):
    with pytest.raises(InvalidAnswer, match=match):
        check_answer(np.asarray(answer), 3, 4, "hard")


def test_hard_answer_is_int64_class_ids():
    out = check_answer([[3.0], [0.0], [1.0]], 3, 4, "hard")
    assert out.dtype == np.int64 and out.tolist() == [3, 0, 1]


def test_check_request_errors_are_clear():
    imgs = np.zeros((2, 8, 8, 1), np.uint8)
    with pytest.raises(TypeError, match="strings"):
        check_request([1, 2], [0, 1], imgs, 10)
    with pytest.raises(ValueError, match="one generation class per id"):
        check_request(["a", "b"], [0], imgs, 10)
    with pytest.raises(ValueError, match="0..9"):
        check_request(["a", "b"], [0, 10], imgs, 10)
    with pytest.raises(TypeError, match="uint8"):
        check_request(["a", "b"], [0, 1], imgs.astype(np.float32), 10)
    with pytest.raises(ValueError, match="N = 3"):
        check_request(["a", "b", "c"], [0, 1, 2], imgs, 10)
    ids, cls, img = check_request(["a", "b"], np.array([0, 1]), imgs[..., 0], 10)
    assert ids == ["a", "b"] and cls.dtype == np.int64 and img.shape == (2, 8, 8, 1)


# ---- budget rules -----------------------------------------------------------------------

def _state(charged=(), answered=(), grants=None):
    s = LedgerState("hard")
    s.apply_reserve(list(charged), [0] * len(charged), [""] * len(charged),
                    [True] * len(charged))
    for t, ids in (grants or {}).items():
        s.apply_reserve(list(ids), [0] * len(ids), [t] * len(ids), [False] * len(ids))
    s.apply_answers(list(answered), np.zeros(len(answered), np.int64))
    return s


def test_plan_answers_in_order_up_to_the_cap_and_free_ids_are_never_refused():
    s = _state(charged=["a", "b"], answered=["a"])
    plan = plan_request(["x", "a", "y", "b", "z"], s, budget=3, trial="", trial_cap=None)
    assert plan.granted == ["x", "a", "b"] and plan.refused == ["y", "z"]
    assert plan.new_charges == {"x"} and plan.refused_by == "budget"
    assert plan.to_query == ["x", "b"]  # b was charged but never answered: retried, free


def test_plan_trial_cap_counts_samples_delivered_to_the_trial():
    s = _state(charged=["a", "b", "c"], answered=["a", "b", "c"], grants={"t1": ["a"]})
    plan = plan_request(["a", "b", "c", "d"], s, budget=10, trial="t1", trial_cap=2)
    # a is already the trial's; b is free globally but uses the trial's second slot.
    assert plan.granted == ["a", "b"] and plan.refused == ["c", "d"]
    assert plan.new_grants == {"b"} and not plan.new_charges
    assert plan.refused_by == "trial cap"


def test_budget_exhausted_keeps_its_payload_when_pickled():
    import pickle

    err = BudgetExhausted("budget exhausted", ["a"], np.array([3]), ["b"])
    again = pickle.loads(pickle.dumps(err))
    assert again.answered_ids == ["a"] and again.refused_ids == ["b"]
    assert again.labels.tolist() == [3] and isinstance(again, RuntimeError)


# ---- ledger -----------------------------------------------------------------------------

def _fill(ledger: Ledger) -> None:
    ledger.reserve(["a", "b", "c"], [1, 1, 2], ["", "", "t"], [True, True, True])
    ledger.record_answers(["a", "b"], np.array([[0.5, 0.5, 0], [0, 1, 0]], np.float32))
    ledger.reserve(["a"], [1], ["t"], [False])          # a free grant to trial t
    ledger.reserve(["d"], [0], [""], [True])
    ledger.record_failure(["d"], "HttpVictimError: down")


def test_ledger_rebuilds_exactly_and_reports_unanswered(tmp_path):
    live = Ledger(str(tmp_path / "l"), budget=5, output="soft", num_classes=3, writer="w")
    _fill(live)
    again = Ledger(str(tmp_path / "l"))
    assert again.status() == live.status()
    s = again.status()
    assert (s["spent"], s["left"], s["per_class"]) == (4, 1, {0: 1, 1: 2, 2: 1})
    assert s["reserved_unanswered"] == ["c", "d"] and s["trial_spent"] == {"t": 2}
    assert s["failed_attempts"] == 1 and "down" in s["last_error"]
    np.testing.assert_array_equal(again.state.answers["b"], [0, 1, 0])
    rows = again.charge_rows().to_pydict()
    assert sorted(i for i, c in zip(rows["id"], rows["charge"], strict=True) if c) == ["a", "b", "c", "d"]


def test_ledger_via_pyarrow_uri_and_ignores_half_written_segments(tmp_path):
    uri = f"file://{tmp_path}/l2"
    live = Ledger(uri, budget=5, output="hard", num_classes=3, writer="w")
    live.reserve(["a"], [0], [""], [True])
    live.record_answers(["a"], np.array([2]))
    (tmp_path / "l2" / "reserved" / "000000000099-dead.parquet.x.tmp").write_bytes(b"PAR")
    again = Ledger(uri)
    assert again.status()["spent"] == 1 and again.state.answers == {"a": 2}
    table = pq.read_table(tmp_path / "l2" / "answered")
    assert str(table.schema.field("label").type) == "int64"  # hard ledgers hold no floats


def test_ledger_refuses_other_settings_and_missing_ledger(tmp_path):
    Ledger(str(tmp_path / "l"), budget=5, output="soft", num_classes=3)
    with pytest.raises(LedgerMismatch, match="budget=5 .asked 6."):
        Ledger(str(tmp_path / "l"), budget=6, output="soft", num_classes=3)
    with pytest.raises(LedgerMismatch, match="output='soft'"):
        Ledger(str(tmp_path / "l"), budget=5, output="hard", num_classes=3)
    with pytest.raises(FileNotFoundError, match="no ledger"):
        Ledger(str(tmp_path / "nothing"), create=False)


# ---- HTTP helpers -----------------------------------------------------------------------

def test_token_bucket_limits_rate_without_real_sleeping():
    now = [0.0]
    slept = []

    def sleep(s):
        slept.append(s)
        now[0] += s

    bucket = TokenBucket(rate=2.0, capacity=2.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(6):
        bucket.acquire()
    # 2 in the initial burst, then one every 0.5 s: 4 more take 2 s.
    assert now[0] == pytest.approx(2.0) and len(slept) == 4


def test_safe_url_drops_credentials():
    assert safe_url("https://user:secret@host:8080/invocations?x=1") == \
        "https://host:8080/invocations"

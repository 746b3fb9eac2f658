"""Output defences (victim.defence): each defence's defining property, the config checks, and
the teacher service that applies them, run here without Ray (the actor class called
directly, as tests/test_gpu_path.py does), on an untrained digits victim.

What must hold whatever the defence: the budget (charges, grants, exactly-once answers) is
the undefended service's, a retry returns the answer the first call would have given, and
the evaluation oracle keeps seeing the undefended victim.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aspkd_ray.config import ConfigError, load
from aspkd_ray.teacher import Ledger
from aspkd_ray.teacher.checks import check_answer
from aspkd_ray.teacher.defences import (
    DefendedVictim,
    list_defences,
    parse_defence,
    row_keys,
    served_output,
    utility_cost,
)
from aspkd_ray.teacher.victims import LocalVictim, make_victim, victim_input

C = 10
DEFENCES = ("top1", "topk", "rounding", "gaussian_noise", "reverse_sigmoid")


def make_cfg(tmp_path, *overrides):
    return load(None, [f"output_dir={tmp_path}", *overrides], None)


def images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)


def probs(n, seed=0, concentration=0.3):
    return np.random.default_rng(seed).dirichlet(np.full(C, concentration), n)


def service(tmp_path, ckpt, name, *overrides, budget=20):
    """A teacher service on its own new ledger (the driver creates the ledger, as
    connect_teacher_service does)."""
    from aspkd_ray.teacher.service import TeacherService

    cfg = make_cfg(tmp_path, f"victim.checkpoint={ckpt}", *overrides)
    uri = str(tmp_path / f"ledger-{name}")
    Ledger(uri, budget=budget, output=served_output(cfg), num_classes=C)
    return TeacherService(cfg, C, budget, uri)


def ids_of(n, start=0):
    return [f"s{i:03d}" for i in range(start, start + n)]


# ---- each defence's defining property ----------------------------------------------------

def test_every_shipped_defence_is_registered():
    assert set(DEFENCES) <= set(list_defences())


def test_top1_answers_integer_class_ids_only():
    p = probs(64)
    out = parse_defence({"name": "top1"})(p)
    assert out.dtype == np.int64 and out.shape == (64,)
    np.testing.assert_array_equal(out, p.argmax(1))  # each row its own argmax (batch > 1)
    check_answer(out, 64, C, "hard")  # what the service accepts as hard labels


def test_topk_keeps_k_largest_and_renormalises():
    p = probs(200)
    for k in (1, 3, C):
        out = parse_defence({"name": "topk", "k": k})(p)
        assert ((out > 0).sum(1) <= k).all() and ((out > 0).sum(1) == min(k, C)).all()
        np.testing.assert_allclose(out.sum(1), 1.0, atol=1e-12)
        np.testing.assert_array_equal(out.argmax(1), p.argmax(1))
        kept = np.sort(p, 1)[:, -k:]  # the k largest, in proportion
        np.testing.assert_allclose(np.sort(out, 1)[:, -k:], kept / kept.sum(1, keepdims=True))
    assert parse_defence({"name": "topk"}).params == {"k": 3}


@pytest.mark.parametrize("decimals", [1, 2, 3])
def test_rounding_puts_every_value_on_the_grid_and_still_sums_to_one(decimals):
    p = probs(500, seed=decimals)
    out = parse_defence({"name": "rounding", "decimals": decimals})(p)
    steps = out * 10 ** decimals
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-9)
    np.testing.assert_allclose(out.sum(1), 1.0, atol=1e-12)
    assert (out >= 0).all() and np.abs(out - p).max() < 10.0 ** -decimals  # within a step
    check_answer(out.astype(np.float32), len(p), C, "soft")  # the service takes it


def test_gaussian_noise_is_deterministic_per_input_and_differs_across_inputs():
    d = parse_defence({"name": "gaussian_noise", "scale": 0.2})
    p = probs(50)
    x = torch.as_tensor(images(50)).float()
    keys = row_keys(x)
    a, b = d(p, keys), d(p, keys)
    np.testing.assert_array_equal(a, b)  # a rerun or retry gets the very same answer
    # The same row in another batch, at another position: the same answer.
    np.testing.assert_array_equal(d(p[[7, 3]], keys[[7, 3]]), a[[7, 3]])
    # Other inputs with identical probabilities get other noise; so does another seed.
    same = np.repeat(p[:1], 50, 0)
    assert len({tuple(r) for r in d(same, keys)}) == 50
    assert not np.array_equal(parse_defence({"name": "gaussian_noise", "scale": 0.2,
                                             "seed": 1})(p, keys), a)
    assert (a >= 0).all() and np.allclose(a.sum(1), 1.0)
    assert (a.argmax(1) != p.argmax(1)).any()  # it may change the class (that is the point)
    # Noise that leaves a row nothing (all clipped) still gives a probability vector.
    huge = parse_defence({"name": "gaussian_noise", "scale": 50.0})(p)
    check_answer(huge.astype(np.float32), len(p), C, "soft")


def test_reverse_sigmoid_keeps_probabilities_valid():
    d = parse_defence({"name": "reverse_sigmoid", "beta": 0.5, "gamma": 0.2})
    edge = np.vstack([np.eye(C), np.full((1, C), 1 / C), probs(200, concentration=0.05)])
    for beta in (0.1, 1.0, 5.0):
        out = parse_defence({"name": "reverse_sigmoid", "beta": beta})(edge)
        assert np.isfinite(out).all() and (out >= 0).all() and (out <= 1).all()
        np.testing.assert_allclose(out.sum(1), 1.0, atol=1e-9)
        check_answer(out.astype(np.float32), len(edge), C, "soft")
    assert not np.allclose(d(edge), edge)  # it does perturb


def test_utility_cost_is_the_victims_accuracy_without_and_with_the_defence():
    p = probs(400)
    labels = p.argmax(1).copy()
    labels[:40] = (labels[:40] + 1) % C  # the victim is right on 90%
    for name in ("top1", "topk"):  # never change the top class
        cost = utility_cost({"name": name}, p, labels)
        assert cost == {"accuracy": 0.9, "defended_accuracy": 0.9, "cost": 0.0}
    noisy = utility_cost({"name": "gaussian_noise", "scale": 0.5}, p, labels)
    assert noisy["accuracy"] == 0.9 and noisy["defended_accuracy"] < 0.9
    assert noisy["cost"] == pytest.approx(0.9 - noisy["defended_accuracy"])


# ---- config --------------------------------------------------------------------------------

def test_config_accepts_a_defence_and_fills_defaults(tmp_path):
    cfg = make_cfg(tmp_path, "victim.defence={name: rounding}")
    assert cfg.victim.defence == {"name": "rounding"}
    assert parse_defence(cfg.victim.defence).params == {"decimals": 2}
    dotted = make_cfg(tmp_path, "victim.defence.name=topk", "victim.defence.k=2")
    assert parse_defence(dotted.victim.defence).params == {"k": 2}
    assert make_cfg(tmp_path).victim.defence is None
    small = make_cfg(tmp_path, "victim.defence={name: gaussian_noise, scale: 1e-3}")
    assert parse_defence(small.victim.defence).params == {"scale": 1e-3, "seed": 0}  # YAML str
    # top1 sells hard labels whatever victim.output says; the others keep it.
    assert served_output(make_cfg(tmp_path, "victim.defence={name: top1}")) == "hard"
    assert served_output(make_cfg(tmp_path, "victim.defence={name: topk}")) == "soft"


@pytest.mark.parametrize("value, message", [
    ("{name: blur}", r"victim\.defence\.name: got 'blur'; expected one of: .*gaussian_noise"
                     r".*top1"),
    ("{decimals: 2}", r"victim\.defence\.name: got None; expected one of"),
    ("{name: rounding, decimals: 0}", r"victim\.defence\.decimals: got 0; expected an "
                                      r"integer >= 1"),
    ("{name: rounding, decimals: two}", r"victim\.defence\.decimals: got 'two'"),
    ("{name: gaussian_noise, scale: -1}", r"victim\.defence\.scale: got -1; expected a "
                                          r"number > 0"),
    ("{name: topk, kk: 3}", r"victim\.defence\.kk for defence topk; accepted parameters: k"),
    ("rounding", r"victim\.defence: got 'rounding'.*expected dict or null"),
])
def test_config_errors_name_the_key_the_value_and_what_is_accepted(tmp_path, value, message):
    with pytest.raises(ConfigError, match=message):
        make_cfg(tmp_path, f"victim.defence={value}")


def test_a_probability_defence_on_a_hard_label_victim_fails_at_load(tmp_path):
    with pytest.raises(ConfigError, match=r"victim\.defence.*victim\.output=hard"):
        make_cfg(tmp_path, "victim.output=hard", "victim.defence={name: rounding}")
    make_cfg(tmp_path, "victim.output=hard", "victim.defence={name: top1}")  # ids stay ids


# ---- in the teacher service ------------------------------------------------------------

def test_top1_makes_the_service_a_hard_label_teacher(tmp_path, victim_ckpt):
    svc = service(tmp_path, victim_ckpt, "top1", "victim.defence={name: top1}")
    try:
        assert svc.ledger.output == "hard" and svc.describe()["output"] == "hard"
        assert svc.describe()["defence"] == {"name": "top1"}
        res = svc.buy(ids_of(6), np.zeros(6, np.int64), images(6), None, None)
        assert res["labels"].dtype == np.int64 and res["labels"].shape == (6,)
        truth = LocalVictim(victim_ckpt, "soft", C).predict(victim_input(images(6), svc.cfg))
        np.testing.assert_array_equal(res["labels"], truth.argmax(1))
    finally:
        svc.close()


def _charges(svc) -> list[tuple]:
    rows = svc.ledger.charge_rows()
    return list(zip(*(rows.column(c).to_pylist() for c in ("id", "cls", "trial", "charge")),
                    strict=True))


def test_defences_never_change_the_budget_accounting(tmp_path, victim_ckpt):
    """The same requests against undefended, rounding and noisy services: the same charges,
    grants, refusals and spent counts; only the labels differ."""
    budget = 12
    runs = {}
    for name, extra in [("none", []), ("rounding", ["victim.defence={name: rounding}"]),
                        ("noise", ["victim.defence={name: gaussian_noise, scale: 0.3}"])]:
        svc = service(tmp_path, victim_ckpt, name, *extra, "victim.batch_size=4",
                      budget=budget)
        try:
            x = images(16)
            first = svc.buy(ids_of(8), np.arange(8) % C, x[:8], "t1", None)
            again = svc.buy(ids_of(8), np.arange(8) % C, x[:8], "t1", None)  # bought: free
            grant = svc.buy(ids_of(4), np.arange(4) % C, x[:4], "t2", None)  # another trial
            over = svc.buy(ids_of(8, 8), np.arange(8, 16) % C, x[8:], "t1", None)
            status = svc.ledger.status()
            np.testing.assert_array_equal(first["labels"], again["labels"])  # exactly once
            runs[name] = (status["spent"], status["left"], status["per_class"],
                          status["trial_spent"], status["reserved_unanswered"],
                          over["refused_ids"], over["answered_ids"], grant["answered_ids"],
                          _charges(svc), svc.counters["victim_samples_sent"])
        finally:
            svc.close()
    assert runs["none"][0] == budget and len(runs["none"][5]) == 4
    for name in ("rounding", "noise"):
        assert runs[name] == runs["none"], name


def test_a_retried_noisy_answer_is_the_answer_the_first_call_would_have_given(
        tmp_path, victim_ckpt):
    """The victim fails once: its samples stay charged, unanswered; the retry is free and
    its noisy labels equal those of a service that never failed."""
    noise = "victim.defence={name: gaussian_noise, scale: 0.3, seed: 7}"
    x, ids, cls = images(6, seed=3), ids_of(6), np.arange(6) % C
    flaky = service(tmp_path, victim_ckpt, "flaky", noise)
    steady = service(tmp_path, victim_ckpt, "steady", noise)
    try:
        inner = flaky.victim.victim
        real = inner.predict
        inner.predict = lambda t: (_ for _ in ()).throw(ConnectionError("victim down"))
        failed = flaky.buy(ids, cls, x, None, None)
        assert failed["error"] and failed["answered_ids"] == []
        assert flaky.ledger.status()["spent"] == 6
        assert sorted(flaky.ledger.status()["reserved_unanswered"]) == ids
        inner.predict = real
        retried = flaky.buy(ids, cls, x, None, None)
        assert flaky.ledger.status()["spent"] == 6  # the retry charged nothing
        np.testing.assert_array_equal(retried["labels"],
                                      steady.buy(ids, cls, x, None, None)["labels"])
        # In another order the noise is the same per sample; only the victim's own float32
        # forward pass may differ in the last bit with the batch's layout.
        other = steady.buy(ids[::-1], cls[::-1], x[::-1], None, None)["labels"]
        np.testing.assert_array_equal(other, retried["labels"][::-1])  # answered: recorded
        fresh = service(tmp_path, victim_ckpt, "fresh", noise)
        try:
            shuffled = fresh.buy(ids[::-1], cls[::-1], x[::-1], None, None)["labels"]
        finally:
            fresh.close()
        np.testing.assert_allclose(shuffled, retried["labels"][::-1], atol=1e-6)
    finally:
        flaky.close()
        steady.close()


def test_the_defence_is_in_the_service_and_not_in_the_evaluation_oracle(tmp_path,
                                                                         victim_ckpt):
    """Fails if the defence moves into make_victim: the oracle (and make_victim) must give
    the undefended probabilities while the service sells defended ones."""
    from aspkd_ray.evaluation.oracle import EvaluationOracle

    overrides = (f"victim.checkpoint={victim_ckpt}",
                 "victim.defence={name: gaussian_noise, scale: 0.3}")
    cfg = make_cfg(tmp_path, *overrides)
    x = images(8, seed=5)
    truth = LocalVictim(victim_ckpt, "soft", C).predict(victim_input(x, cfg))
    oracle = EvaluationOracle(cfg, C)
    assert not isinstance(oracle.victim, DefendedVictim)
    np.testing.assert_allclose(oracle.predict_proba(x), truth, atol=1e-6)
    np.testing.assert_allclose(make_victim(cfg, C).predict(victim_input(x, cfg)), truth,
                               atol=1e-6)
    svc = service(tmp_path, victim_ckpt, "oracle", *overrides[1:])
    try:
        assert isinstance(svc.victim, DefendedVictim)
        sold = svc.buy(ids_of(8), np.zeros(8, np.int64), x, None, None)["labels"]
        assert np.abs(sold - truth).max() > 0.05  # the noise reached the buyer
        assert svc.describe()["defence"] == {"name": "gaussian_noise", "scale": 0.3,
                                             "seed": 0}
    finally:
        svc.close()

"""The teacher service on Ray: exact budget under concurrency, crashes and flaky victims.

The HTTP victims here are tiny loopback servers (http.server in a thread) whose answers are a
known function of the inputs, so every label can be checked, and whose failures are scripted.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from aspkd_ray.config import load
from aspkd_ray.teacher import (
    BudgetExhausted,
    InvalidAnswer,
    Ledger,
    LedgerMismatch,
    VictimError,
    connect_teacher_service,
)
from aspkd_ray.teacher.errors import TrialClosed
from aspkd_ray.teacher.http_victim import HttpVictim, HttpVictimError
from aspkd_ray.teacher.victims import victim_input

C = 10


# ---- a scripted loopback victim ---------------------------------------------------------

def fake_probs(x: np.ndarray) -> np.ndarray:
    """The fake victim: a fixed, input-dependent distribution over C classes."""
    m = x.reshape(len(x), -1).mean(1, dtype=np.float64)
    logits = -((m[:, None] * 20 - np.arange(C)[None, :]) ** 2)
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


class FakeVictim:
    """A victim server; `script(i)` picks what request i gets (ok, 500, timeout, bad, ...)."""

    def __init__(self, protocol="mlflow", output="soft", script=None, sleep_s=1.0):
        self.protocol, self.output, self.sleep_s = protocol, output, sleep_s
        self.script = script or (lambda i: "ok")
        self.calls, self.auth, self.lock = [], [], threading.Lock()
        self.got_request, self.release = threading.Event(), threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    i = len(fake.calls)
                    action = fake.script(i)
                    fake.calls.append(action)
                    fake.auth.append(self.headers.get("Authorization"))
                fake.got_request.set()
                try:
                    self._answer(action, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout) or died (killed actor)

            def _answer(self, action, body):
                if action in ("500", "503"):
                    return self._send(int(action), {"error": "overloaded"})
                if action == "401":
                    return self._send(401, {"error": "bad token"})
                if action == "timeout":
                    time.sleep(fake.sleep_s)
                if action == "block":
                    fake.release.wait(60)
                x = (np.asarray(body["inputs"], np.float32) if fake.protocol == "mlflow" else
                     np.asarray(body["inputs"][0]["data"], np.float32).reshape(
                         body["inputs"][0]["shape"]))
                p = fake_probs(x)
                if action == "short":
                    p = p[:-1]
                elif action == "nan":
                    p[0, 0] = np.nan
                elif action == "negative":
                    p[0, :2] = [-0.5, 1.5 - p[0, 1:2].sum() + p[0, 1]]
                if fake.output == "hard":
                    p = p.argmax(1)
                if fake.protocol == "mlflow":
                    return self._send(200, {"predictions": p.tolist()})
                dt = "INT64" if p.ndim == 1 else "FP32"
                return self._send(200, {"model_name": "m", "outputs": [
                    {"name": "out", "shape": list(p.shape), "datatype": dt,
                     "data": p.ravel().tolist()}]})

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_victim():
    servers = []

    def make(**kw):
        servers.append(FakeVictim(**kw))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


# ---- configs, victims, clients ----------------------------------------------------------

def make_cfg(tmp_path, *overrides):
    name = f"teacher-{uuid.uuid4().hex[:8]}"  # one service per test
    return load(None, [f"output_dir={tmp_path}", f"ray.teacher_service={name}",
                       "ray.namespace=aspkd-teacher-tests", *overrides], None)


@pytest.fixture
def clients():
    """Collects clients and stops their services, so actors do not pile up on 2 CPUs."""
    made = []
    yield made
    for c in made:
        try:
            c.shutdown()
        except Exception:  # noqa: BLE001 - already gone
            pass


def connect(clients, cfg, budget, **kw):
    c = connect_teacher_service(cfg, C, budget=budget, **kw)
    clients.append(c)
    return c


def images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)


def ids_of(n, prefix="s"):
    return [f"{prefix}{i:04d}" for i in range(n)]


def charge_counts(uri):
    rows = Ledger(uri).charge_rows().to_pydict()
    counts = {}
    for i, charge in zip(rows["id"], rows["charge"], strict=True):
        counts[i] = counts.get(i, 0) + int(charge)
    return counts


def strip(status):
    """The ledger's part of a status (without this process's counters)."""
    return {k: v for k, v in status.items() if k not in ("victim_samples_sent", "service")}


def expected_local(ckpt, imgs, cfg, hard=False):
    from aspkd_ray.models import load_checkpoint

    model = load_checkpoint(ckpt).eval()
    with torch.no_grad():
        logits = model(victim_input(imgs, cfg))
    return logits.argmax(1).numpy() if hard else logits.softmax(1).numpy()


# ---- HttpVictim, no Ray -----------------------------------------------------------------

@pytest.mark.parametrize("protocol", ["mlflow", "v2"])
def test_http_victim_protocols_and_bearer_token(fake_victim, monkeypatch, protocol):
    server = fake_victim(protocol=protocol)
    monkeypatch.setenv("VICTIM_TOKEN", "s3cr3t-token")
    v = HttpVictim(server.url, protocol=protocol, num_classes=C, model_name="m",
                   auth_env="VICTIM_TOKEN")
    x = torch.rand(4, 1, 28, 28)
    np.testing.assert_allclose(v.predict(x), fake_probs(x.numpy()), rtol=1e-6, atol=1e-9)
    assert server.auth == ["Bearer s3cr3t-token"]
    assert "s3cr3t" not in repr(v) and "s3cr3t" not in str(vars(v).get("name"))


def test_http_victim_retries_then_fails_without_leaking_the_token(fake_victim, monkeypatch,
                                                                  caplog):
    server = fake_victim(script=lambda i: {0: "500", 1: "timeout"}.get(i, "503"), sleep_s=0.6)
    monkeypatch.setenv("VICTIM_TOKEN", "s3cr3t-token")
    v = HttpVictim(server.url, num_classes=C, timeout_s=0.3, max_retries=2, backoff_s=0.01,
                   auth_env="VICTIM_TOKEN")
    with pytest.raises(HttpVictimError, match="failed 3 times") as err:
        v.predict(torch.rand(2, 1, 28, 28))
    assert server.calls == ["500", "timeout", "503"]  # bounded: 1 try + 2 retries
    assert "s3cr3t" not in str(err.value) and "s3cr3t" not in caplog.text
    server.script = lambda i: "401"
    with pytest.raises(HttpVictimError, match="credentials") as err:
        v.predict(torch.rand(2, 1, 28, 28))
    assert "s3cr3t" not in str(err.value)


def test_http_victim_needs_its_token_variable(fake_victim, monkeypatch):
    monkeypatch.delenv("NO_SUCH_TOKEN", raising=False)
    with pytest.raises(ValueError, match=r"\$NO_SUCH_TOKEN"):
        HttpVictim(fake_victim().url, num_classes=C, auth_env="NO_SUCH_TOKEN")


def test_http_victim_hard_mode_never_returns_probabilities(fake_victim):
    # A hard-label attack against an endpoint that sends probabilities keeps only the class.
    v = HttpVictim(fake_victim(output="soft").url, num_classes=C, output="hard")
    x = torch.rand(5, 1, 28, 28)
    out = v.predict(x)
    assert out.ndim == 1 and out.tolist() == fake_probs(x.numpy()).argmax(1).tolist()
    v2 = HttpVictim(fake_victim(output="hard", protocol="v2").url, protocol="v2",
                    model_name="m", num_classes=C, output="hard")
    assert v2.predict(x).tolist() == out.tolist()
    bad = HttpVictim(fake_victim(script=lambda i: "nan").url, num_classes=C, output="hard")
    with pytest.raises(InvalidAnswer, match="NaN"):
        bad.predict(x)


# ---- the service ------------------------------------------------------------------------

@pytest.mark.timeout(240)
def test_buy_soft_free_rebuys_partial_answers_and_restart_from_ledger(
        ray_session, tmp_path, victim_ckpt, clients):
    cfg = make_cfg(tmp_path, f"victim.checkpoint={victim_ckpt}")
    client = connect(clients, cfg, budget=12)
    assert client.output == "soft"
    imgs, ids = images(20), ids_of(20)
    cls = np.arange(20) % C
    got = client.buy(ids[:8], cls[:8], imgs[:8])
    assert got.dtype == np.float32 and got.shape == (8, C)
    np.testing.assert_allclose(got, expected_local(victim_ckpt, imgs[:8], cfg), atol=1e-6)
    again = client.buy(ids[:8], cls[:8], imgs[:8])  # free: from the ledger
    np.testing.assert_array_equal(again, got)
    assert client.status()["spent"] == 8 and client.status()["victim_samples_sent"] == 8
    # 3 old (free) + 6 new with 4 left: the first 4 new ones are answered, 2 refused.
    req = ids[5:14]
    with pytest.raises(BudgetExhausted, match="budget exhausted") as err:
        client.buy(req, cls[5:14], imgs[5:14])
    assert err.value.answered_ids == ids[5:12] and err.value.refused_ids == ids[12:14]
    np.testing.assert_array_equal(err.value.labels[:3], got[5:8])
    s = client.status()
    assert (s["spent"], s["left"], s["reserved_unanswered"]) == (12, 0, [])
    assert s["per_class"] == dict(sorted(Counter(cls[:12].tolist()).items()))
    # Duplicated ids in one request are charged once and answered at every position.
    dup = client.buy([ids[0], ids[0], ids[1]], cls[[0, 0, 1]], imgs[[0, 0, 1]])
    np.testing.assert_array_equal(dup, got[[0, 0, 1]])
    with pytest.raises(ValueError, match="generation class"):
        client.buy([ids[0]], np.array([cls[0] + 1]), imgs[:1])
    # A new run (another service name) on the same ledger, once this one ended, rebuilds
    # the same state.
    client.shutdown()
    clients.remove(client)
    cfg2 = make_cfg(tmp_path, f"victim.checkpoint={victim_ckpt}")
    other = connect(clients, cfg2, budget=12, ledger_uri=str(tmp_path / "ledger"))
    assert strip(other.status()) == strip(s)
    assert all(v == 1 for v in charge_counts(str(tmp_path / "ledger")).values())
    with pytest.raises(LedgerMismatch, match="budget"):  # the running service: other budget
        connect_teacher_service(cfg2, C, budget=13, ledger_uri=str(tmp_path / "other"))
    assert not (tmp_path / "other").exists()  # refused before any ledger was made
    with pytest.raises(LedgerMismatch, match="output='soft'"):  # the ledger: other mode
        connect_teacher_service(make_cfg(tmp_path, f"victim.checkpoint={victim_ckpt}",
                                         "victim.output=hard"), C, budget=12)


@pytest.mark.timeout(240)
def test_hard_local_victim_and_per_trial_caps(ray_session, tmp_path, victim_ckpt, clients):
    cfg = make_cfg(tmp_path, f"victim.checkpoint={victim_ckpt}", "victim.output=hard",
                   "budget.per_trial=5")
    a = connect(clients, cfg, budget=8, trial="a")
    b = connect_teacher_service(cfg, C, budget=8, trial="b")
    imgs, ids, cls = images(12), ids_of(12), np.arange(12) % C
    assert a.output == "hard"
    with pytest.raises(BudgetExhausted, match="trial cap") as err:
        a.buy(ids[:7], cls[:7], imgs[:7])
    hard = err.value.labels
    assert hard.dtype == np.int64 and hard.ndim == 1 and err.value.refused_ids == ids[5:7]
    assert hard.tolist() == expected_local(victim_ckpt, imgs[:5], cfg, hard=True).tolist()
    # b gets a's samples free for the global budget, but they fill b's own cap.
    with pytest.raises(BudgetExhausted, match="trial cap") as err:
        b.buy(ids[:7], cls[:7], imgs[:7])
    assert err.value.answered_ids == ids[:5] and a.status()["spent"] == 5
    c = connect_teacher_service(cfg, C, budget=8, trial="c")
    with pytest.raises(BudgetExhausted, match="budget exhausted") as err:
        c.buy(ids[7:11], cls[7:11], imgs[7:11])
    assert err.value.answered_ids == ids[7:10]  # the global budget of 8 is reached
    s = a.status()
    assert (s["spent"], s["left"], s["trial_spent"]) == (8, 0, {"a": 5, "b": 5, "c": 3})
    assert all(v == 1 for v in charge_counts(str(tmp_path / "ledger")).values())
    # a trial the sweep ended buys nothing more, not even free labels; others still can
    a.close_trial("b")
    with pytest.raises(TrialClosed, match="trial b was ended"):
        b.buy(ids[:1], cls[:1], imgs[:1])
    assert a.buy(ids[:1], cls[:1], imgs[:1]).tolist() == hard[:1].tolist()


@pytest.mark.timeout(300)
def test_concurrent_clients_asking_for_three_times_the_budget(
        ray_session, tmp_path, victim_ckpt, clients):
    import ray

    n, workers = 40, 8
    cfg = make_cfg(tmp_path, f"victim.checkpoint={victim_ckpt}", "victim.batch_size=2")
    clients.append(connect_teacher_service(cfg, C, budget=n))
    pool = ids_of(70)
    imgs = images(70)

    barrier = tmp_path / "barrier"
    barrier.mkdir()

    @ray.remote(num_cpus=0.1)
    def attacker(k):
        from aspkd_ray.teacher import BudgetExhausted, connect_teacher_service

        client = connect_teacher_service(cfg, C, budget=n)  # by name, from a task
        rng = np.random.default_rng(k)
        pick = rng.choice(len(pool), 15, replace=False)  # 8 x 15 = 3 x the budget
        (barrier / str(k)).touch()  # all clients start asking together
        while len(list(barrier.iterdir())) < workers:
            time.sleep(0.01)
        got = {}
        for chunk in np.array_split(pick, 5):
            try:
                labels = client.buy([pool[i] for i in chunk], chunk % C, imgs[chunk])
                got.update({pool[i]: lab for i, lab in zip(chunk, labels, strict=True)})
            except BudgetExhausted as exc:
                got.update(dict(zip(exc.answered_ids, exc.labels, strict=True)))
        return got

    results = ray.get([attacker.remote(k) for k in range(workers)], timeout=240)
    asked = len({i for k in range(workers)
                 for i in np.random.default_rng(k).choice(len(pool), 15, replace=False)})
    s = clients[0].status()
    assert asked > n and s["spent"] == n and s["left"] == 0
    counts = charge_counts(str(tmp_path / "ledger"))
    assert len(counts) == n and set(counts.values()) == {1}  # n charged, none twice
    seen = {}
    for got in results:  # every answer came from the ledger's one purchase of that id
        for i, lab in got.items():
            assert i in counts
            np.testing.assert_array_equal(seen.setdefault(i, lab), lab)
    assert len(seen) == n and s["reserved_unanswered"] == []


@pytest.mark.timeout(300)
def test_killed_mid_call_restarts_with_the_same_ledger_and_budget(
        ray_session, tmp_path, fake_victim, clients):
    import ray

    server = fake_victim()
    cfg = make_cfg(tmp_path, f"victim.endpoint={server.url}", "victim.timeout_s=45")
    client = connect(clients, cfg, budget=30)
    imgs, ids, cls = images(25), ids_of(25), np.arange(25) % C
    first = client.buy(ids[:10], cls[:10], imgs[:10])
    pid = client.describe()["pid"]
    server.got_request.clear()
    server.script = lambda i: "block"  # the victim hangs: the actor is mid-call
    result = {}
    buyer = threading.Thread(target=lambda: result.update(
        labels=client.buy(ids[10:25], cls[10:25], imgs[10:25])))
    buyer.start()
    assert server.got_request.wait(60)
    before = client.status()  # write-ahead: the 15 are reserved (spent) before the answer
    assert before["spent"] == 25 and before["reserved_unanswered"] == ids[10:25]
    ray.kill(client._handle, no_restart=False)
    deadline = time.monotonic() + 120
    while True:  # the restarted actor answers status while the retried buy hangs again
        try:
            if client.describe()["pid"] != pid:
                break
        except ray.exceptions.RayActorError:
            pass
        assert time.monotonic() < deadline, "the teacher service did not restart"
        time.sleep(0.5)
    after = client.status()
    assert strip(after) == strip(before) == strip(Ledger(str(tmp_path / "ledger")).status())
    assert after["budget"] == 30
    server.script = lambda i: "ok"
    server.release.set()
    buyer.join(120)
    assert not buyer.is_alive()
    # Ray retried the interrupted buy on the restarted service: answered, charged once.
    expected = fake_probs(victim_input(imgs[10:25], cfg).numpy())
    np.testing.assert_allclose(result["labels"], expected, rtol=1e-5, atol=1e-7)
    final = client.status()
    assert (final["spent"], final["reserved_unanswered"]) == (25, [])
    assert set(charge_counts(str(tmp_path / "ledger")).values()) == {1}
    np.testing.assert_array_equal(client.buy(ids[:10], cls[:10], imgs[:10]), first)


@pytest.mark.timeout(300)
def test_flaky_victim_loses_nothing_and_charges_nothing_twice(
        ray_session, tmp_path, fake_victim, clients):
    pattern = ["ok", "500", "500", "timeout", "ok", "nan", "503", "ok", "short", "ok", "ok"]
    server = fake_victim(script=lambda i: pattern[i % len(pattern)], sleep_s=0.8)
    cfg = make_cfg(tmp_path, f"victim.endpoint={server.url}", "victim.timeout_s=0.4",
                   "victim.max_retries=1", "victim.batch_size=8")
    client = connect(clients, cfg, budget=40)
    imgs, ids, cls = images(40), ids_of(40), np.arange(40) % C
    failures, labels = 0, None
    for _ in range(40):
        try:
            labels = client.buy(ids, cls, imgs)
            break
        except VictimError as exc:
            failures += 1
            assert set(exc.unanswered_ids) <= set(ids)
            s = client.status()
            assert s["spent"] <= 40 and set(s["reserved_unanswered"]) <= set(ids)
    assert labels is not None and failures > 0
    assert {"500", "timeout", "nan", "short"} <= set(server.calls)
    expected = fake_probs(victim_input(imgs, cfg).numpy())
    np.testing.assert_allclose(labels, expected, rtol=1e-5, atol=1e-7)
    s = client.status()
    assert (s["spent"], s["left"], s["reserved_unanswered"]) == (40, 0, [])
    assert s["failed_attempts"] == failures
    counts = charge_counts(str(tmp_path / "ledger"))
    assert len(counts) == 40 and set(counts.values()) == {1}


@pytest.mark.timeout(240)
def test_malformed_answer_is_an_error_and_stays_charged_until_answered(
        ray_session, tmp_path, fake_victim, clients):
    script = {0: "negative", 1: "short"}
    server = fake_victim(protocol="v2", script=lambda i: script.get(i, "ok"))
    cfg = make_cfg(tmp_path, f"victim.endpoint={server.url}", "victim.protocol=v2",
                   "victim.model_name=m", "victim.max_retries=0")
    client = connect(clients, cfg, budget=10)
    imgs, ids, cls = images(6), ids_of(6), np.arange(6) % C
    with pytest.raises(VictimError, match="negative probabilities") as err:
        client.buy(ids, cls, imgs)
    assert err.value.unanswered_ids == ids
    s = client.status()
    assert (s["spent"], s["reserved_unanswered"]) == (6, ids)  # charged, reported, not lost
    with pytest.raises(VictimError, match="shape"):
        client.buy(ids, cls, imgs)
    labels = client.buy(ids, cls, imgs)  # the retry is free
    np.testing.assert_allclose(labels, fake_probs(victim_input(imgs, cfg).numpy()),
                               rtol=1e-5, atol=1e-7)
    s = client.status()
    assert (s["spent"], s["reserved_unanswered"], s["failed_attempts"]) == (6, [], 2)
    assert server.calls == ["negative", "short", "ok"]


def test_evaluation_oracle_has_no_ledger_and_hard_has_no_probabilities(tmp_path, victim_ckpt):
    from aspkd_ray.evaluation.oracle import EvaluationOracle

    imgs = images(7)
    soft_cfg = make_cfg(tmp_path, f"victim.checkpoint={victim_ckpt}", "victim.batch_size=3")
    soft = EvaluationOracle(soft_cfg)
    probs = soft.predict_proba(imgs)
    np.testing.assert_allclose(probs, expected_local(victim_ckpt, imgs, soft_cfg), atol=1e-6)
    hard = EvaluationOracle(make_cfg(tmp_path, f"victim.checkpoint={victim_ckpt}",
                                     "victim.output=hard"))
    assert hard.predict_classes(imgs).tolist() == probs.argmax(1).tolist()
    with pytest.raises(ValueError, match="hard"):
        hard.predict_proba(imgs)
    assert not (tmp_path / "ledger").exists()  # evaluation never touches the attack ledger


@pytest.mark.parametrize("remote", [False, True])
def test_no_answer_without_a_durable_reservation(tmp_path, victim_ckpt, fake_victim, remote):
    """If the reservation cannot be written, nothing is charged, recorded or returned, and a
    remote victim is not even asked (the service class, run here without Ray)."""
    from aspkd_ray.teacher.service import TeacherService, _resolved

    server = fake_victim()
    victim = f"victim.endpoint={server.url}" if remote else f"victim.checkpoint={victim_ckpt}"
    cfg = _resolved(make_cfg(tmp_path, victim))
    Ledger(str(tmp_path / "ledger"), budget=10, output="soft", num_classes=C)  # as connect does
    svc = TeacherService(cfg, C, 10, str(tmp_path / "ledger"))
    assert svc.refusal is None

    def broken(*args):
        raise OSError("ledger storage is down")

    svc.ledger.reserve = broken
    with pytest.raises(OSError, match="storage is down"):
        svc.buy(ids_of(4), np.arange(4), images(4), None, None)
    s = Ledger(str(tmp_path / "ledger")).status()
    assert (s["spent"], s["answered"]) == (0, 0)
    assert server.calls == []


# ---- one writer per ledger --------------------------------------------------------------

@pytest.mark.timeout(240)
def test_a_second_service_on_the_same_ledger_is_refused(ray_session, tmp_path, victim_ckpt,
                                                         clients):
    from aspkd_ray.teacher.errors import LedgerBusy

    cfg = make_cfg(tmp_path, f"victim.checkpoint={victim_ckpt}")
    first = connect(clients, cfg, budget=20)
    first.buy(ids_of(5), np.arange(5), images(5))
    before = sorted(p.name for p in (tmp_path / "ledger").rglob("*.parquet"))
    other = make_cfg(tmp_path, f"victim.checkpoint={victim_ckpt}")  # another service name
    with pytest.raises(LedgerBusy, match=r"held by another teacher service \(host"):
        connect(clients, other, budget=20)
    assert sorted(p.name for p in (tmp_path / "ledger").rglob("*.parquet")) == before
    assert first.status()["spent"] == 5  # the holder carries on
    first.shutdown()
    clients.remove(first)
    again = connect(clients, other, budget=20)  # released: the next service may write it
    assert again.status()["spent"] == 5


_OTHER_RAY = """
import sys
import numpy as np
from aspkd_ray.config import load
from aspkd_ray.errors import UserError
from aspkd_ray.teacher import connect_teacher_service
cfg = load(None, [f"output_dir={sys.argv[1]}", f"victim.checkpoint={sys.argv[2]}",
                  "ray.address=local", "ray.teacher_service=other-run"], None)
try:
    connect_teacher_service(cfg, 10, budget=20)
except UserError as exc:
    print(type(exc).__name__, exc)
    sys.exit(3)
"""


@pytest.mark.timeout(300)
def test_a_run_in_another_ray_cluster_is_refused(ray_session, tmp_path, victim_ckpt, clients):
    """Two `aspkd steal` runs on one output folder, each with its own Ray: the second is
    refused before it buys anything (measured before the lease: 153 spent of 80)."""
    import subprocess
    import sys

    cfg = make_cfg(tmp_path, f"victim.checkpoint={victim_ckpt}")
    first = connect(clients, cfg, budget=20)
    first.buy(ids_of(5), np.arange(5), images(5))
    env = {k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", _OTHER_RAY, str(tmp_path), victim_ckpt],
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "LedgerBusy" in proc.stdout and "another Ray cluster" in proc.stdout
    assert first.status()["spent"] == 5


@pytest.mark.timeout(240)
def test_a_restarted_service_that_cannot_reach_its_ledger_refuses(ray_session, tmp_path,
                                                                   victim_ckpt, clients):
    """As on a node without the ledger's folder: the service never starts again from 0."""
    import os
    import shutil

    import ray

    from aspkd_ray.teacher.errors import LedgerUnavailable

    cfg = make_cfg(tmp_path, f"victim.checkpoint={victim_ckpt}")
    client = connect(clients, cfg, budget=20)
    client.buy(ids_of(5), np.arange(5), images(5))
    pid = client.describe()["pid"]
    shutil.move(str(tmp_path / "ledger"), str(tmp_path / "elsewhere"))
    ray.kill(client._handle, no_restart=False)  # Ray restarts it: its ledger is gone
    deadline = time.monotonic() + 120
    while True:
        try:
            info = ray.get(client._handle.describe.remote())
            if info["pid"] != pid:
                break
        except ray.exceptions.RayActorError:
            pass
        assert time.monotonic() < deadline, "the teacher service did not restart"
        time.sleep(0.5)
    assert info["refusal"][0] == "LedgerUnavailable"
    with pytest.raises(LedgerUnavailable, match="cannot reach its ledger"):
        client.buy(ids_of(10), np.arange(10) % C, images(10))
    with pytest.raises(LedgerUnavailable):
        client.status()
    assert not os.path.exists(tmp_path / "ledger")  # nothing was created in its place


def test_a_local_ledger_is_refused_on_a_multi_node_cluster(tmp_path):
    from aspkd_ray.errors import UserError
    from aspkd_ray.teacher.service import check_ledger_reachable

    check_ledger_reachable(str(tmp_path / "ledger"), 1)
    check_ledger_reachable("s3://bucket/run/ledger", 3)
    with pytest.raises(UserError, match="local disk, but the Ray cluster has 3 nodes"):
        check_ledger_reachable(str(tmp_path / "ledger"), 3)


def test_a_teacher_service_that_cannot_be_placed_fails_fast(ray_session, tmp_path, victim_ckpt,
                                                           monkeypatch):
    from aspkd_ray.errors import UserError
    from aspkd_ray.teacher import service

    monkeypatch.setattr(service, "PLACEMENT_TIMEOUT_S", 3.0)
    cfg = make_cfg(tmp_path, f"victim.checkpoint={victim_ckpt}",
                   "ray.teacher_node=teacher_gpu_node")  # a resource no node has
    t = time.monotonic()
    with pytest.raises(UserError, match="could not be placed.*teacher_gpu_node"):
        connect_teacher_service(cfg, C, budget=5)
    assert time.monotonic() - t < 30
    assert service.placement("head")["num_cpus"] == 0  # a head with num-cpus 0 takes it

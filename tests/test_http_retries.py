"""HttpVictim's retries (urllib3's Retry on the session): what is retried, how often, how long
it waits, and that every attempt is rate-limited and counted.

The victim is a loopback http.server whose answer to request i is scripted: "503", "500",
"429", "drop" (read the request, close the connection without answering), "400", "401",
"413", or "ok" (a valid MLflow answer); a script entry may carry a Retry-After value.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from urllib3.util.retry import RequestHistory

from aspkd_ray.teacher.http_victim import (
    HttpVictim,
    HttpVictimError,
    TokenBucket,
    VictimRetry,
)

C = 10
TOKEN = "tok-retry-s3cr3t-value"


class ScriptedVictim:
    """Request i gets `script[i]` (the last entry repeats); a tuple is (action, Retry-After)."""

    def __init__(self, script: list) -> None:
        self.script, self.calls, self.times = script, [], []
        self.lock = threading.Lock()
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):  # noqa: N802 - the http.server interface
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with srv.lock:
                    i = len(srv.calls)
                    step = srv.script[min(i, len(srv.script) - 1)]
                    action, retry_after = step if isinstance(step, tuple) else (step, None)
                    srv.calls.append(action)
                    srv.times.append(time.monotonic())
                if action == "drop":  # no status line at all: the client sees it cut off
                    self.close_connection = True
                    return
                if action == "ok":
                    n = len(body["inputs"])
                    return self._send(200, {"predictions": np.full((n, C), 1 / C).tolist()},
                                      retry_after)
                self._send(int(action), {"error": action,
                                         "echo": self.headers.get("Authorization")},
                           retry_after)

            def _send(self, code, obj, retry_after):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if retry_after is not None:
                    self.send_header("Retry-After", str(retry_after))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def victim_server():
    made = []

    def make(script):
        made.append(ScriptedVictim(script))
        return made[-1]

    yield make
    for s in made:
        s.close()


def x(n=2):
    return np.zeros((n, 1, 4, 4), np.float32)


def victim(url, **kw):
    kw.setdefault("backoff_s", 0.0)
    return HttpVictim(url, num_classes=C, **kw)


class CountingBucket:
    def __init__(self):
        self.taken = 0

    def acquire(self) -> float:
        self.taken += 1
        return 0.0


@pytest.mark.parametrize("failure", ["503", "500", "429", "drop"])
def test_fails_twice_then_answers(victim_server, failure):
    server = victim_server([failure, failure, "ok"])
    v = victim(server.url, max_retries=3)
    v.bucket = CountingBucket()
    out = v.predict(x(3))
    assert out.shape == (3, C)
    assert server.calls == [failure, failure, "ok"]
    assert v.requests_sent == 3 and v.bucket.taken == 3  # every attempt counted and limited


@pytest.mark.parametrize("failure", ["503", "drop"])
def test_retries_are_bounded_and_the_error_names_the_last_failure(victim_server, monkeypatch,
                                                                  caplog, failure):
    monkeypatch.setenv("RETRY_TEST_TOKEN", TOKEN)
    server = victim_server([failure])
    v = victim(server.url, max_retries=2, auth_env="RETRY_TEST_TOKEN")
    with caplog.at_level(logging.WARNING), pytest.raises(HttpVictimError,
                                                         match="failed 3 times") as err:
        v.predict(x())
    assert server.calls == [failure] * 3  # 1 try + 2 retries, no more
    assert ("HTTP 503" if failure == "503" else "ProtocolError") in str(err.value)
    assert "attempt 2/3" in caplog.text  # each retry is logged
    assert TOKEN not in str(err.value) and TOKEN not in caplog.text


def test_no_retries_means_one_attempt(victim_server):
    server = victim_server(["503"])
    with pytest.raises(HttpVictimError, match="failed 1 times"):
        victim(server.url, max_retries=0).predict(x())
    assert server.calls == ["503"]


@pytest.mark.parametrize("status, match", [("400", "HTTP 400"), ("401", "credentials"),
                                           ("413", "HTTP 413")])
def test_a_client_error_is_not_retried(victim_server, status, match):
    # 413 with Retry-After: urllib3 alone would retry it; the victim does not.
    server = victim_server([(status, 1), "ok"])
    with pytest.raises(HttpVictimError, match=match):
        victim(server.url, max_retries=3).predict(x())
    assert server.calls == [status]


def test_retry_after_is_honoured(victim_server):
    server = victim_server([("503", 1), "ok"])
    victim(server.url, max_retries=1).predict(x())  # no backoff: only Retry-After waits
    assert server.calls == ["503", "ok"]
    assert server.times[1] - server.times[0] >= 0.9


def test_retry_after_is_capped(victim_server, caplog):
    server = victim_server([("429", 3600), "ok"])
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING):
        victim(server.url, max_retries=1, retry_after_max_s=0.3).predict(x())
    assert server.calls == ["429", "ok"]
    assert 0.25 <= server.times[1] - server.times[0] and time.monotonic() - t0 < 10
    assert "the cap" in caplog.text


def test_an_unparsable_retry_after_falls_back_to_the_backoff(victim_server):
    server = victim_server([("503", "soon, maybe"), "ok"])
    out = victim(server.url, max_retries=1, backoff_s=0.2).predict(x())
    assert out.shape == (2, C) and server.calls == ["503", "ok"]
    assert server.times[1] - server.times[0] >= 0.09  # backoff 0.2 s x jitter >= 0.5


def test_the_rate_limit_spaces_retries_too(victim_server):
    server = victim_server(["503", "503", "ok"])
    v = victim(server.url, max_retries=2, rate_limit_per_s=5.0)
    assert isinstance(v.bucket, TokenBucket)
    v.bucket = TokenBucket(5.0, capacity=1.0)  # no burst: attempts 0.2 s apart
    v.predict(x())
    gaps = np.diff(server.times)
    assert server.calls == ["503", "503", "ok"] and gaps.min() >= 0.15, gaps


def test_backoff_doubles_with_jitter_and_is_carried_to_each_new_retry():
    seen = []
    r = VictimRetry(total=5, backoff_factor=0.1, before_retry=seen.append,
                    retry_after_max_s=7.0)
    assert r.get_backoff_time() == 0.0  # before any failure
    for n in range(1, 5):
        r = r.new(history=r.history + (RequestHistory("POST", "/", None, 503, None),))
        assert r.before_retry == seen.append and r.retry_after_max_s == 7.0
        waits = [r.get_backoff_time() for _ in range(50)]
        base = 0.1 * 2 ** (n - 1)
        assert 0.5 * base <= min(waits) and max(waits) < 1.5 * base
    assert VictimRetry(total=1, backoff_factor=0).new(
        history=(RequestHistory("POST", "/", None, 503, None),)).get_backoff_time() == 0.0

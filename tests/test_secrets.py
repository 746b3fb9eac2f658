"""Secrets stay secret: a victim endpoint that echoes the request (bearer token included) never
gets the token into an error, a log, the status or any file of the run."""

from __future__ import annotations

import base64
import json
import os
import pathlib
import secrets
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote

import numpy as np
import pyarrow.parquet as pq
import pytest

from aspkd_ray.config import load
from aspkd_ray.teacher import InvalidAnswer, VictimError, connect_teacher_service
from aspkd_ray.teacher.http_victim import HttpVictim, HttpVictimError
from aspkd_ray.teacher.redact import REDACTED, redact

C = 10
ENV = "ASPKD_TEST_VICTIM_TOKEN"
# Set at import, before the session's ray.init: the teacher service actor runs in a Ray
# worker, which inherits the environment Ray was started with, not later changes.
TOKEN = os.environ.setdefault(ENV, "tok-" + secrets.token_urlsafe(24))


# ---- redact -----------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "Authorization: Bearer {t}\r\nHost: x",
    "authorization: bearer {t}",
    '{{"Authorization": "Bearer {t}", "Host": "x"}}',
    "{{'Authorization': 'Bearer {t}'}}",
    '{{"h": "{{\\"Authorization\\": \\"Bearer {t}\\"}}"}}',  # JSON inside a JSON string
    "Proxy-Authorization: Basic {t}",
    "the server said: sent Bearer {t} and failed",
    "plain echo: {t}!",
    "url-encoded: {q}",
    "base64: {b}",
])
def test_redact_removes_the_token_in_every_form(text):
    t = "s3cr3t/t+k=n"
    b = base64.b64encode(t.encode()).decode()
    out = redact(text.format(t=t, q=quote(t, safe=""), b=b), [t])
    assert REDACTED in out
    for form in (t, quote(t, safe=""), b, "s3cr3t"):
        assert form not in out, out


def test_redact_keeps_ordinary_text():
    text = "victim mlflow:http://127.0.0.1:9/invocations answered HTTP 400: bad shape (3, 4)"
    assert redact(text, ["elsewhere-token"]) == text
    assert redact(text) == text
    assert redact("check the token in victim.auth_env", ()) == \
        "check the token in victim.auth_env"


def test_redact_without_secrets_still_removes_header_values():
    out = redact('Authorization: Basic dXNlcjpwYXNz\n{"authorization": "Bearer abc.def"}')
    assert "dXNlcjpwYXNz" not in out and "abc.def" not in out
    assert out.count(REDACTED) == 2


# ---- an endpoint that echoes the request ------------------------------------------------

class EchoServer:
    """Answers every POST with the request's headers in it, the way `mode` says."""

    def __init__(self, mode: str) -> None:
        self.mode, self.auth, self.bodies = mode, [], []
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                srv.auth.append(self.headers.get("Authorization"))
                # The credentials first: a cut message must not hide a leak by chance.
                headers = dict(sorted(self.headers.items(),
                                      key=lambda kv: kv[0].lower() != "authorization"))
                echo = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                n = 4  # the tests buy 4 samples
                code, ctype, body = {
                    "400": (400, "text/plain", f"bad request, you sent:\n{echo}"
                                               f"{json.dumps(headers)}"),
                    "nonjson": (200, "text/html", f"<html><pre>{echo}</pre></html>"),
                    "badjson": (200, "application/json", json.dumps({"echo": headers})[:-1]),
                    "strings": (200, "application/json", json.dumps(
                        {"predictions": [[headers["Authorization"]] * C] * n})),
                }[srv.mode]
                data = body.encode()
                srv.bodies.append(data)
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
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
def echo_server():
    made = []

    def make(mode):
        made.append(EchoServer(mode))
        return made[-1]

    yield make
    for s in made:
        s.close()


ERRORS = {"400": (HttpVictimError, "HTTP 400"), "nonjson": (InvalidAnswer, "non-JSON"),
          "badjson": (InvalidAnswer, "non-JSON"), "strings": (InvalidAnswer, "numeric")}


def _leaks(text: str) -> bool:
    return TOKEN in text or TOKEN[4:16] in text


@pytest.mark.parametrize("mode", sorted(ERRORS))
def test_http_victim_errors_and_logs_are_redacted(echo_server, caplog, mode):
    server = echo_server(mode)
    v = HttpVictim(server.url, num_classes=C, auth_env=ENV, max_retries=0)
    assert v.secrets == (TOKEN,) and not _leaks(repr(v))
    kind, match = ERRORS[mode]
    with pytest.raises(kind, match=match) as err:
        v.predict(np.zeros((4, 1, 28, 28), np.float32))
    assert TOKEN.encode() in server.bodies[0]  # the endpoint did echo it: the test can fail
    if mode in ("400", "nonjson"):
        assert REDACTED in str(err.value)
    chain = [err.value, err.value.__cause__, err.value.__context__]
    assert not any(_leaks(str(e)) for e in chain if e is not None)
    assert err.value.__cause__ is None  # nothing unredacted is chained for a traceback
    assert not _leaks(caplog.text)


def test_http_victim_has_no_secrets_without_a_token(echo_server):
    assert HttpVictim(echo_server("400").url, num_classes=C).secrets == ()


def _cfg(tmp_path, *overrides):
    name = f"teacher-secrets-{uuid.uuid4().hex[:8]}"  # one service per test
    return load(None, [f"output_dir={tmp_path}", f"ray.teacher_service={name}",
                       "ray.namespace=aspkd-teacher-tests", *overrides], None)


def _run_files_text(folder) -> list[tuple[str, bytes]]:
    """Every file under `folder` as bytes, Parquet files also decoded (they may compress)."""
    out = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.suffix == ".parquet":
            data += json.dumps(pq.read_table(path).to_pylist(), default=str).encode()
        out.append((str(path), data))
    return out


def _ray_log_files() -> list:
    """This Ray session's log files (workers' stdout / stderr among them)."""
    import ray

    session = ray._private.worker._global_node.get_session_dir_path()  # no public API
    return [p for p in sorted((pathlib.Path(session) / "logs").rglob("*")) if p.is_file()]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", sorted(ERRORS))
def test_failing_buy_through_the_service_never_leaks_the_token(
        ray_session, tmp_path, echo_server, caplog, capfd, mode):
    server = echo_server(mode)
    cfg = _cfg(tmp_path, f"victim.endpoint={server.url}", f"victim.auth_env={ENV}",
               "victim.max_retries=0")
    client = connect_teacher_service(cfg, C, budget=10)
    imgs = np.random.default_rng(0).integers(0, 256, (4, 28, 28, 1), dtype=np.uint8)
    try:
        with pytest.raises(VictimError, match=ERRORS[mode][1]) as err:
            client.buy([f"s{i}" for i in range(4)], np.arange(4) % C, imgs)
        status = client.status()
    finally:
        client.shutdown()
    # The service's victim sent the token and the endpoint echoed it back.
    assert server.auth == [f"Bearer {TOKEN}"] and TOKEN.encode() in server.bodies[0]
    assert status["last_error"] and ERRORS[mode][1] in status["last_error"]
    if mode in ("400", "nonjson"):
        assert REDACTED in status["last_error"]
    time.sleep(1.0)  # worker output reaches the driver asynchronously
    out, errs = capfd.readouterr()
    texts = {"exception": str(err.value), "repr": repr(err.value),
             "last_error": status["last_error"], "status": json.dumps(status, default=str),
             "caplog": caplog.text, "stdout": out, "stderr": errs}
    leaked = [k for k, t in texts.items() if _leaks(t)]
    assert not leaked, leaked
    files = _run_files_text(tmp_path)
    assert any("/failed/" in p for p, _ in files), "the failure was not recorded"
    leaked = [p for p, data in files if TOKEN.encode() in data]
    assert not leaked, leaked
    leaked = [str(p) for p in _ray_log_files() if TOKEN.encode() in p.read_bytes()]
    assert not leaked, leaked

"""A victim behind an HTTP inference API, spoken by a registered protocol (`victim.protocol`).

- mlflow (`mlflow models serve`, Databricks, SageMaker MLflow containers): POST /invocations
  with {"inputs": N x C x H x W floats}; the answer is {"predictions": ...}.
- v2 (KServe, Triton, MLServer): POST /v2/models/<name>/infer with one FP32 input tensor;
  the answer's first output tensor is used.

A protocol is a `Protocol` subclass registered with `@register_protocol("name")`: the URL path
appended to an endpoint given without one, the headers, how a float batch becomes a JSON
request body and how the JSON answer becomes an array, and its config checks. A new protocol
is one such class in this module (config validation lists the registry, so it must be
registered once this module is imported). Transport, retries, rate limit and credentials are
`HttpVictim`'s, the same for every protocol.

Timeouts; bounded retries by urllib3's `Retry` mounted on the requests session (timeouts,
connection errors, 429, 500, 502, 503, 504; exponential backoff with jitter, a server's
Retry-After honoured up to a cap); a token-bucket rate limit that every attempt, retries
included, passes through; and a bearer token read from an environment variable. The token is
kept out of reprs, logs and error messages: every text that comes from the endpoint (an error
page may echo the request, headers included) goes through `redact` first (teacher/redact.py),
and `secrets` lets the teacher service redact what it records too.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from urllib3.exceptions import InvalidHeader, MaxRetryError
from urllib3.util.retry import RequestHistory, Retry

if TYPE_CHECKING:
    from urllib3.response import BaseHTTPResponse

    from aspkd_ray.config import Config

from aspkd_ray.registry import Registry
from aspkd_ray.teacher.checks import check_answer
from aspkd_ray.teacher.errors import InvalidAnswer
from aspkd_ray.teacher.redact import redact

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
MAX_BACKOFF_S = 120.0        # one backoff wait never exceeds this (urllib3's default cap)
MAX_RETRY_AFTER_S = 60.0     # a longer Retry-After is cut to this: a stuck server costs <= 1 min


class HttpVictimError(RuntimeError):
    """The endpoint did not answer (after retries) or refused the request."""


def safe_url(url: str) -> str:
    """The URL without user:password@ (never print credentials)."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class VictimRetry(Retry):
    """urllib3's Retry with this victim's schedule and a hook before every retry.

    Only POST exists here, and it is retried even after it was sent (urllib3's default
    allowed_methods leave POST out): the teacher service reserves a batch in its ledger
    (durably) before the request leaves and charges it once however many times it reaches
    the endpoint, and an inference call changes no state on the server; so a retry after a
    timeout or a dropped connection cannot charge the budget twice (a metered endpoint does
    bill each attempt). Only RETRY_STATUS is retried, never another 4xx: 401/403 or a bad
    request would fail the same way again. urllib3 keeps its own rules for which errors are
    retried (connection and read errors, `status_forcelist`) and how often (`total`); this
    class changes only

    - the backoff: `backoff_factor * 2**(n-1)`, times a jitter in [0.5, 1.5), before retry n,
      the first included (urllib3 retries the first failure at once);
    - Retry-After: capped at `retry_after_max_s`; an unparsable value falls back to the
      backoff instead of raising urllib3's InvalidHeader out of the request;
    - `before_retry(retry)`, called after the wait and before the next attempt (the victim
      logs it and takes a rate-limit token there).

    `new()` is how urllib3 makes the next Retry (one per attempt), so it carries the extras.
    """

    # urllib3 would also retry a 413 that carries Retry-After; only RETRY_STATUS is retried.
    RETRY_AFTER_STATUS_CODES = frozenset()

    def __init__(self, *args, before_retry: Callable[[Retry], None] | None = None,
                 retry_after_max_s: float = MAX_RETRY_AFTER_S, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.before_retry = before_retry
        self.retry_after_max_s = float(retry_after_max_s)

    def new(self, **kw: object) -> VictimRetry:
        out = super().new(**kw)
        out.before_retry, out.retry_after_max_s = self.before_retry, self.retry_after_max_s
        return out

    def get_backoff_time(self) -> float:
        n = len(self.history)
        if n == 0 or self.backoff_factor <= 0:
            return 0.0
        # Jitter spreads retrying clients so they do not hit a recovering server together.
        wait = self.backoff_factor * 2 ** (n - 1) * (0.5 + random.random())
        return min(MAX_BACKOFF_S, wait)

    def parse_retry_after(self, retry_after: str) -> float:
        try:
            seconds = super().parse_retry_after(retry_after)
        except InvalidHeader:
            # The value is not quoted: like any text from the endpoint it could echo a secret.
            log.warning("victim sent an unparsable Retry-After header; using the backoff")
            return 0.0  # 0: urllib3 then sleeps the backoff instead
        if seconds > self.retry_after_max_s:
            log.warning("victim asked to retry after %.0f s; waiting %.0f s (the cap)",
                        seconds, self.retry_after_max_s)
        return min(float(seconds), self.retry_after_max_s)

    def sleep(self, response: BaseHTTPResponse | None = None) -> None:
        super().sleep(response)
        if self.before_retry is not None:
            self.before_retry(self)


def _failure(entry: RequestHistory) -> str:
    """What went wrong in one attempt, without its message (which holds the URL)."""
    if entry.status:
        return f"HTTP {entry.status}"
    return type(entry.error).__name__ if entry.error is not None else "unknown error"


class TokenBucket:
    """At most `rate` requests per second on average, bursts up to `capacity`."""

    def __init__(self, rate: float, capacity: float | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be > 0 requests per second, got {rate}.")
        self.rate = float(rate)
        self.capacity = float(capacity if capacity is not None else max(1.0, rate))
        self._clock, self._sleep = clock, sleep
        self._tokens, self._last = self.capacity, clock()
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Take one token, sleeping until one is there; returns the seconds waited."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
            self._last = now
            wait = 0.0
            if self._tokens < 1.0:
                wait = (1.0 - self._tokens) / self.rate
                self._sleep(wait)
                self._tokens, self._last = 1.0, self._clock()
            self._tokens -= 1.0
            return wait


# ---- protocols: victim.protocol names one ---------------------------------------------

# Makes text from the endpoint safe to quote in an error: (text, max length) -> str. The
# victim passes its redacting one; a protocol never quotes an answer without it.
Clean = Callable[[object, int | None], str]


def _cut(text: object, limit: int | None = None) -> str:
    out = str(text)
    return out if limit is None or len(out) <= limit else out[:limit] + "..."


class Protocol:
    """How one HTTP inference API is spoken. Bodies are JSON both ways (sent with
    `requests`' json=, answers parsed with .json() before `decode`)."""

    def validate(self, cfg: Config) -> None:
        """Config-load checks of what this protocol needs; raise ConfigError naming the key."""

    def path(self, model_name: str | None) -> str:
        """The path appended to an endpoint given as scheme://host[:port] only."""
        raise NotImplementedError

    def headers(self) -> dict[str, str]:
        """Headers of every request (the victim adds Authorization itself)."""
        return {"Content-Type": "application/json"}

    def encode(self, batch: np.ndarray, *, input_name: str = "input") -> object:
        """float32 N x C x H x W -> the JSON request body."""
        raise NotImplementedError

    def decode(self, body: object, *, output: str, clean: Clean = _cut) -> np.ndarray:
        """The JSON answer -> an array (soft: N x C scores; hard: N class ids, or N x C
        scores that the victim reduces); raise InvalidAnswer when it is malformed."""
        raise NotImplementedError


PROTOCOLS: Registry[Protocol] = Registry("victim.protocol", instantiate=True)
register_protocol = PROTOCOLS.register   # @register_protocol("name") on a Protocol class
list_protocols = PROTOCOLS.names
get_protocol = PROTOCOLS.get


def _json_object(body: object) -> dict:
    if not isinstance(body, dict):
        raise InvalidAnswer(f"victim answered a {type(body).__name__}, not a JSON object.")
    return body


@register_protocol("mlflow")
class MlflowProtocol(Protocol):
    """MLflow scoring: POST /invocations {"inputs": [...]} -> {"predictions": ...}."""

    def path(self, model_name: str | None) -> str:
        return "/invocations"

    def encode(self, batch: np.ndarray, *, input_name: str = "input") -> object:
        return {"inputs": batch.tolist()}

    def decode(self, body: object, *, output: str, clean: Clean = _cut) -> np.ndarray:
        # Errors below are raised outside their `except`: the original exception may quote
        # the (unredacted) answer, so it must not ride along as __context__.
        body = _json_object(body)
        if "predictions" not in body:
            keys = clean(sorted(map(str, body))[:5], 200)
            raise InvalidAnswer(f"MLflow answer has no 'predictions' (keys: {keys}).")
        pred = body["predictions"]
        if isinstance(pred, dict) and len(pred) == 1:  # one named output tensor
            pred = next(iter(pred.values()))
        problem = None
        try:
            arr = np.asarray(pred, dtype=np.float64 if output == "soft" else None)
        except (ValueError, TypeError) as exc:
            problem = clean(exc, 200)
        if problem is not None:
            raise InvalidAnswer(f"MLflow predictions are not a numeric array: {problem}")
        if arr.dtype.kind not in "biuf":  # e.g. strings: never passed on, never quoted
            raise InvalidAnswer(f"MLflow predictions have non-numeric values (dtype "
                                f"{arr.dtype}).")
        return arr


@register_protocol("v2")
class V2Protocol(Protocol):
    """Open Inference Protocol v2: one FP32 input tensor; the first output tensor is used."""

    def validate(self, cfg: Config) -> None:
        from aspkd_ray.config import ConfigError

        if cfg.victim.endpoint and not cfg.victim.model_name:
            raise ConfigError("victim.model_name: required for the v2 protocol; expected the "
                              "model name the inference server exposes.")

    def path(self, model_name: str | None) -> str:
        if not model_name:
            raise ValueError("victim.protocol=v2 needs victim.model_name (the path is "
                             "/v2/models/<model_name>/infer), or a full endpoint URL.")
        return f"/v2/models/{model_name}/infer"

    def encode(self, batch: np.ndarray, *, input_name: str = "input") -> object:
        return {"inputs": [{"name": input_name, "shape": list(batch.shape),
                            "datatype": "FP32", "data": batch.ravel().tolist()}]}

    def decode(self, body: object, *, output: str, clean: Clean = _cut) -> np.ndarray:
        outputs = _json_object(body).get("outputs")
        if not isinstance(outputs, list) or not outputs or not isinstance(outputs[0], dict):
            raise InvalidAnswer("v2 answer has no 'outputs' tensor list.")
        out, problem = outputs[0], None
        try:
            data = np.asarray(out["data"])
            shape = [int(s) for s in out["shape"]]
        except (KeyError, ValueError, TypeError) as exc:
            problem = clean(repr(exc), 200)
        if problem is not None:
            raise InvalidAnswer(f"v2 output tensor is malformed: {problem}")
        if data.size != int(np.prod(shape)):
            raise InvalidAnswer(f"v2 output has {data.size} values for shape {shape}.")
        return data.reshape(shape)


class HttpVictim:
    """Labels from a served model; see the module docstring for the protocols."""

    remote = True

    def __init__(self, endpoint: str, *, protocol: str = "mlflow", output: str = "soft",
                 num_classes: int, model_name: str | None = None, timeout_s: float = 30.0,
                 max_retries: int = 3, rate_limit_per_s: float | None = None,
                 auth_env: str | None = None, backoff_s: float = 0.25,
                 input_name: str = "input", session=None,
                 retry_after_max_s: float = MAX_RETRY_AFTER_S) -> None:
        import requests
        from requests.adapters import HTTPAdapter

        if protocol not in PROTOCOLS.entries:
            raise ValueError(f"protocol must be one of {', '.join(list_protocols())}, got "
                             f"{protocol!r}.")
        if output not in ("soft", "hard"):
            raise ValueError(f"output must be 'soft' or 'hard', got {output!r}.")
        if not endpoint.startswith(("http://", "https://")):
            raise ValueError(f"victim.endpoint must be an http(s):// URL, got "
                             f"{safe_url(endpoint)!r}.")
        if timeout_s <= 0 or max_retries < 0 or backoff_s < 0 or retry_after_max_s < 0:
            raise ValueError("timeout_s must be > 0; max_retries, backoff_s and "
                             "retry_after_max_s >= 0.")
        self.protocol, self.output, self.num_classes = protocol, output, num_classes
        self.codec = get_protocol(protocol)
        self.timeout_s, self.max_retries, self.backoff_s = timeout_s, max_retries, backoff_s
        self.input_name = input_name
        self.url = self._invoke_url(endpoint, self.codec, model_name)
        self.name = f"{protocol}:{safe_url(self.url)}"
        self.bucket = TokenBucket(rate_limit_per_s) if rate_limit_per_s else None
        self.session = session or requests.Session()
        # urllib3 retries inside session.post. raise_on_status=False: when the retries are
        # spent on a retryable status, the last response comes back and _post names it.
        # A session passed in gets these adapters too: max_retries is part of this contract.
        retry = VictimRetry(total=max_retries, allowed_methods=frozenset({"POST"}),
                            status_forcelist=RETRY_STATUS, backoff_factor=backoff_s,
                            raise_on_status=False, respect_retry_after_header=True,
                            before_retry=self._before_retry,
                            retry_after_max_s=retry_after_max_s)
        adapter = HTTPAdapter(max_retries=retry)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self._headers = dict(self.codec.headers())
        # Credentials in the URL (user:password@) are secrets too, though never printed.
        self._secrets: tuple[str, ...] = tuple(
            s for s in (urlsplit(endpoint).password,) if s)
        if auth_env:
            token = os.environ.get(auth_env)
            if not token:
                raise ValueError(f"victim.auth_env names ${auth_env}, but it is not set in the "
                                 f"environment of the process calling the victim (on a "
                                 f"cluster: the teacher service's node).")
            self._headers["Authorization"] = f"Bearer {token}"
            self._secrets = (token, *self._secrets)
        self.requests_sent = 0

    def __repr__(self) -> str:  # no headers: they may hold the token
        return f"HttpVictim({self.name!r}, output={self.output!r})"

    @property
    def secrets(self) -> tuple[str, ...]:
        """The credentials this victim sends (empty if none), for `redact(text, secrets)`."""
        return self._secrets

    def _clean(self, text: object, limit: int | None = None) -> str:
        """`text` from the endpoint, safe for an error or a log: redacted, then cut."""
        out = redact(str(text), self._secrets)
        return out if limit is None or len(out) <= limit else out[:limit] + "..."

    @staticmethod
    def _invoke_url(endpoint: str, protocol: Protocol, model_name: str | None) -> str:
        parts = urlsplit(endpoint)
        if parts.path not in ("", "/"):
            return endpoint  # a full scoring URL was given
        return endpoint.rstrip("/") + protocol.path(model_name)

    # ---- one call ---------------------------------------------------------------------
    def predict(self, x) -> np.ndarray:
        """Raw answer for float inputs N x C x H x W (checked, then hard-reduced in hard mode)."""
        arr = np.ascontiguousarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x,
                                   dtype=np.float32)
        body = self._post(self._payload(arr))
        answer = self._parse(body)
        if self.output == "hard" and answer.ndim == 2 and answer.shape[1] > 1:
            # The endpoint gave probabilities; a hard-label attack keeps only the class id,
            # here, so nothing downstream ever sees them.
            return check_answer(answer, len(arr), self.num_classes, "soft").argmax(1)
        return answer

    def _payload(self, arr: np.ndarray) -> object:
        return self.codec.encode(arr, input_name=self.input_name)

    def _parse(self, body: object) -> np.ndarray:
        return self.codec.decode(body, output=self.output, clean=self._clean)

    def _before_retry(self, retry: Retry) -> None:
        """Called by VictimRetry after its wait, before each retry: log it, rate-limit it."""
        log.warning("victim %s: %s (attempt %d/%d); retrying", self.name,
                    self._clean(_failure(retry.history[-1])), len(retry.history),
                    self.max_retries + 1)
        if self.bucket is not None:
            self.bucket.acquire()
        self.requests_sent += 1

    def _post(self, payload: object) -> object:
        import requests

        if self.bucket is not None:
            self.bucket.acquire()
        self.requests_sent += 1
        tries = self.max_retries + 1
        failure = None
        try:
            resp = self.session.post(self.url, json=payload, headers=self._headers,
                                     timeout=self.timeout_s)
        except (requests.ConnectionError, requests.Timeout,
                requests.exceptions.ChunkedEncodingError) as exc:
            # Names only: the messages hold the URL. Raised below, outside the except, so
            # the exception does not ride along as __context__.
            inner = exc.args[0] if exc.args else None
            if isinstance(inner, MaxRetryError):  # urllib3 spent the retries
                failure = f"failed {tries} times (last: {type(inner.reason).__name__})"
            else:
                # urllib3 retries up to the response headers; a body cut off after them
                # surfaces here, unretried (its ids stay charged in the teacher service's
                # ledger, and buying them again resends them at no charge).
                failure = f"failed: {type(inner or exc).__name__} ({type(exc).__name__})"
        if failure is not None:
            raise HttpVictimError(f"victim {self.name} {self._clean(failure)}.")
        if resp.status_code in RETRY_STATUS:  # the retries are spent (raise_on_status=False)
            raise HttpVictimError(f"victim {self.name} failed {tries} times (last: HTTP "
                                  f"{resp.status_code}).")
        if resp.status_code in (401, 403):
            raise HttpVictimError(f"victim {self.name} refused the credentials (HTTP "
                                  f"{resp.status_code}); check the token in victim.auth_env.")
        if resp.status_code >= 400:
            # Redacted before it is cut: an error page may echo the request's headers.
            raise HttpVictimError(f"victim {self.name} answered HTTP {resp.status_code}: "
                                  f"{self._clean(resp.text, 300)}")
        try:
            return resp.json()
        except ValueError:  # its .doc is the whole answer: not kept as __context__
            pass
        raise InvalidAnswer(f"victim {self.name} answered non-JSON: "
                            f"{repr(self._clean(resp.text))[:100]}")

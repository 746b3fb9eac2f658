"""Keep credentials out of error messages, logs and the ledger.

A victim endpoint may echo the request (headers included) in an error page, so any text that
came from it is passed through `redact` before it is raised, logged or recorded.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from urllib.parse import quote, quote_plus

REDACTED = "[REDACTED]"

# An Authorization (or Proxy-Authorization) header's value: as an HTTP header line, in JSON
# ("Authorization": "Bearer x", also JSON-escaped inside a string) or in a Python repr.
_HEADER = re.compile(
    r"""((?:proxy-)?authorization(?:\\?["'])?\s*[:=]\s*(?:\\?["'])?)"""  # name, kept
    r"""([^"'\\\r\n]*)""",                                                 # the value
    re.IGNORECASE)
# A scheme and its credentials anywhere else ("... sent Bearer abc.def ...").
_SCHEME = re.compile(r"\b(bearer|basic)(\s+)([A-Za-z0-9\-._~+/=%]{4,})", re.IGNORECASE)
_MIN_SECRET = 4  # shorter "secrets" would blank out ordinary text


def _forms(secret: str) -> set[str]:
    """The secret as sent or echoed: plain, URL-encoded, base64 (alone or as user:secret)."""
    forms = {secret, quote(secret, safe=""), quote_plus(secret)}
    raw = secret.encode()
    forms.add(base64.b64encode(raw).decode())
    forms.add(base64.urlsafe_b64encode(raw).decode())
    forms |= {f.rstrip("=") for f in list(forms) if f.endswith("=")}
    return {f for f in forms if len(f) >= _MIN_SECRET}


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with every given secret (and its encoded forms), every Authorization header
    value and every `Bearer <token>` / `Basic <token>` replaced by [REDACTED]."""
    text = str(text)
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        for form in sorted(_forms(secret), key=len, reverse=True):
            text = text.replace(form, REDACTED)
    text = _HEADER.sub(lambda m: m.group(1) + REDACTED if m.group(2).strip() else m.group(0),
                       text)
    return _SCHEME.sub(lambda m: m.group(1) + m.group(2) + REDACTED, text)

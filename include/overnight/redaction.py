"""The one secret masker: every message, log line and repr that may carry a secret goes through `redact`.

It hides the secrets it is given (as written and URL-encoded), credential-looking query values
(`?apikey=`, `&token=`, ...) and the user-info of URLs (`scheme://user:password@`), each as `***`.
No imports of this package: adapters, the night's checks and the dashboard all use it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import quote

REDACTED = "***"

_SENSITIVE_QUERY = re.compile(
    r"(?i)([?&;](?:api[_-]?key|apikey|access[_-]?key|key|token|access[_-]?token|secret|password|sig|signature)=)"
    r"[^&;#\s'\"]*"
)
_USERINFO = re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://)[^/@\s]+@")


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """Returns `text` with the given secrets, credential-like query values and URL user-info replaced by ***."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED).replace(quote(secret, safe=""), REDACTED)
    text = _SENSITIVE_QUERY.sub(lambda m: m.group(1) + REDACTED, text)
    return _USERINFO.sub(lambda m: m.group(1) + REDACTED + "@", text)

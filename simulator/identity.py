"""The App Service managed-identity token endpoint, and the check ARM makes of its tokens.

azure-identity's ``ManagedIdentityCredential`` reads ``IDENTITY_ENDPOINT``/``IDENTITY_HEADER`` and
sends ``GET <endpoint>?api-version=2019-08-01&resource=…`` with the ``X-IDENTITY-HEADER`` secret, as on
App Service and Functions. Only tokens issued here open the simulated ARM, so a client that forgot
its credential (or sends another one) fails as it would in Azure.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

TOKEN_LIFETIME_S = 3600


@dataclass(frozen=True, slots=True)
class TokenAnswer:
    """What the token endpoint replies: an HTTP status and a JSON body."""

    status: int
    body: Mapping[str, Any]


class TokenIssuer:
    """Issues opaque bearer tokens and recognises them; safe to call from any thread."""

    def __init__(self, header_secret: str | None = None) -> None:
        self.header_secret = header_secret or secrets.token_urlsafe(24)
        self._tokens: dict[str, float] = {}
        self._lock = threading.Lock()

    def issue(self, resource: str = "https://management.azure.com") -> dict[str, str]:
        """A fresh token (also the test hook for clients that bring their own credential)."""
        token = "sim." + secrets.token_urlsafe(32)
        expires = time.time() + TOKEN_LIFETIME_S
        with self._lock:
            self._tokens[token] = expires
        return {
            "access_token": token,
            "expires_on": str(int(expires)),
            "resource": resource,
            "token_type": "Bearer",
        }

    def is_valid(self, token: str) -> bool:
        with self._lock:
            expires = self._tokens.get(token)
        return expires is not None and expires > time.time()

    def answer(self, query: Mapping[str, str], header: str | None) -> TokenAnswer:
        """Serve one ``GET /msi/token`` request as App Service does."""
        if header is None or not secrets.compare_digest(header, self.header_secret):
            return TokenAnswer(
                401, {"error": "unauthorized", "error_description": "X-IDENTITY-HEADER mismatch"}
            )
        if not query.get("api-version"):
            return TokenAnswer(
                400, {"error": "invalid_request", "error_description": "api-version is required"}
            )
        resource = query.get("resource") or ""
        if not resource:
            return TokenAnswer(400, {"error": "invalid_request", "error_description": "resource is required"})
        return TokenAnswer(200, self.issue(resource))

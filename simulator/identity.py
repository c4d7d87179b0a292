"""The App Service managed-identity token endpoint, and the check ARM makes of its tokens.

azure-identity's ``ManagedIdentityCredential`` reads ``IDENTITY_ENDPOINT``/``IDENTITY_HEADER`` and
sends ``GET <endpoint>?api-version=2019-08-01&resource=…`` with the ``X-IDENTITY-HEADER`` secret, as on
App Service and Functions. Only tokens issued here open the simulated ARM, so a client that forgot
its credential (or sends another one) fails as it would in Azure.

The endpoint serves one identity, as the app's would: system-assigned (``client_id=None``), or the
user-assigned identity with that client id. As documented for the 2019-08-01 endpoint, a request
names a user-assigned identity with one of ``client_id``, ``principal_id``/``object_id`` or
``mi_res_id`` and names none for the system-assigned one; a request for an identity the app does
not have is 400 ``Unable to load the proper Managed Identity.`` (the body seen from Functions), so
a wrong ``AZURE_CLIENT_ID`` fails here as it does in Azure. A 200 carries ``access_token``,
``expires_on``, ``resource``, ``token_type`` and ``client_id`` (the identity used), as the
documented sample response does.
"""

from __future__ import annotations

import secrets
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

TOKEN_LIFETIME_S = 3600
# The query parameters that select a user-assigned identity (overview-managed-identity.md).
IDENTITY_SELECTORS = ("client_id", "principal_id", "object_id", "mi_res_id")
UNKNOWN_IDENTITY_MESSAGE = "Unable to load the proper Managed Identity."


@dataclass(frozen=True, slots=True)
class TokenAnswer:
    """What the token endpoint replies: an HTTP status and a JSON body."""

    status: int
    body: Mapping[str, Any]


class TokenIssuer:
    """Issues opaque bearer tokens and recognises them; safe to call from any thread."""

    def __init__(
        self,
        header_secret: str | None = None,
        *,
        client_id: str | None = None,
        lifetime_s: float = TOKEN_LIFETIME_S,
    ) -> None:
        if lifetime_s <= 0:
            raise ValueError("a token lifetime must be positive")
        self.header_secret = header_secret or secrets.token_urlsafe(24)
        self.client_id = client_id
        # How long a token lives (expires_on, and ARM's check). Shorter than an hour only to make
        # clients refresh within a test run (the chaos run's token faults act on refreshes).
        self.lifetime_s = lifetime_s
        # The 200 answer names the client id of the identity used (overview-managed-identity.md);
        # a system-assigned identity has one too, which the app is never told: a fresh GUID.
        self.identity_client_id = client_id or str(uuid.uuid4())
        self._tokens: dict[str, float] = {}
        self._lock = threading.Lock()

    def issue(self, resource: str = "https://management.azure.com") -> dict[str, str]:
        """A fresh token (also the test hook for clients that bring their own credential)."""
        token = "sim." + secrets.token_urlsafe(32)
        expires = time.time() + self.lifetime_s
        with self._lock:
            self._tokens[token] = expires
        return {
            "access_token": token,
            "expires_on": str(int(expires)),
            "resource": resource,
            "token_type": "Bearer",
            "client_id": self.identity_client_id,
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
        if not self._is_our_identity(query):
            return TokenAnswer(
                400,
                {"statusCode": 400, "message": UNKNOWN_IDENTITY_MESSAGE, "correlationId": str(uuid.uuid4())},
            )
        return TokenAnswer(200, self.issue(resource))

    def _is_our_identity(self, query: Mapping[str, str]) -> bool:
        """Whether the request names this endpoint's one identity (none named: the system-assigned one).

        The simulator knows a user-assigned identity by its client id only, so a principal/object id
        or a resource id never matches (documented in docs/simulator.md).
        """
        named = {key: query[key] for key in IDENTITY_SELECTORS if query.get(key)}
        if self.client_id is None:
            return not named
        return list(named) == ["client_id"] and named["client_id"].lower() == self.client_id.lower()

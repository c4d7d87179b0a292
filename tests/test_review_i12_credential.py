"""Review of issue 12: SingleFlightCredential when the token request fails, is cancelled, or the
token expires mid-run.

azure-identity's async ``get_token``/``get_token_info`` hold no lock: each caller that finds no
valid token in the cache requests one (Azure/azure-sdk-for-python
sdk/identity/azure-identity/azure/identity/aio/_internal/get_token_mixin.py, ``_get_token_base``:
``get_refresh_status`` is REQUIRED for a missing or expired token, and then every caller awaits
``_request_token``). The wrapper must let one request stand for every caller that arrives while it
is in flight, whatever it ends with:

- a request that fails fails every caller that waited on it, at once: no caller asks again behind
  it (on main each waiter took the lock in turn and asked again, so 20 invocations on a cold
  process with a failing identity endpoint made 20 requests, one after another, and the last one
  waited for all of them);
- a caller cancelled while it waits (an invocation timed out) leaves the request to the others;
- a token that expired mid-run is fetched once for the callers that find it expired together, not
  once per SDK client or caller (on main the wrapper went straight through once warm).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
from azure.core.credentials import AccessToken, AccessTokenInfo, TokenRequestOptions
from azure.core.exceptions import ClientAuthenticationError
from azure.identity.aio import ManagedIdentityCredential

from shared.azure.credentials import SingleFlightCredential
from simulator import Estate, Simulator

SCOPE = "https://management.azure.com/.default"


class SlowInner:
    """A credential like azure-identity's: a valid cached token answers at once; else a request that
    takes ``delay_s`` and then fails or gives a token (cached), with no lock around it."""

    def __init__(self, *, delay_s: float = 0.05, fail: bool = False, lifetime_s: float = 3600.0) -> None:
        self.delay_s = delay_s
        self.fail = fail
        self.lifetime_s = lifetime_s
        self.requests = 0
        self.closed = False
        self.cached: AccessTokenInfo | None = None

    async def _request(self) -> AccessTokenInfo:
        if self.cached is not None and self.cached.expires_on > time.time():
            return self.cached
        self.requests += 1
        await asyncio.sleep(self.delay_s)
        if self.fail:
            raise ClientAuthenticationError("identity endpoint: 500")
        self.cached = AccessTokenInfo(f"token-{self.requests}", int(time.time() + self.lifetime_s))
        return self.cached

    async def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        info = await self._request()
        return AccessToken(info.token, info.expires_on)

    async def get_token_info(
        self, *scopes: str, options: TokenRequestOptions | None = None
    ) -> AccessTokenInfo:
        return await self._request()

    async def close(self) -> None:
        self.closed = True

    async def __aenter__(self) -> SlowInner:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


@pytest.mark.parametrize("method", ["get_token", "get_token_info"])
async def test_callers_waiting_on_a_failed_request_share_its_failure_and_do_not_ask_again(
    method: str,
) -> None:
    inner = SlowInner(delay_s=0.05, fail=True)
    credential = SingleFlightCredential(inner)
    began = time.monotonic()
    results = await asyncio.gather(
        *(getattr(credential, method)(SCOPE) for _ in range(20)), return_exceptions=True
    )
    elapsed = time.monotonic() - began
    assert all(isinstance(result, ClientAuthenticationError) for result in results), results
    assert inner.requests == 1  # one request to the failing endpoint, not one per waiter in turn
    assert elapsed < 0.5  # every waiter answered when the one request failed (20 in turn: 1 s)
    # the failure is not remembered: once the endpoint is back, the next callers get one token
    inner.fail = False
    tokens = await asyncio.gather(*(getattr(credential, method)(SCOPE) for _ in range(5)))
    assert {token.token for token in tokens} == {"token-2"}
    assert inner.requests == 2


async def test_cancelling_the_first_caller_leaves_its_request_to_the_callers_waiting_on_it() -> None:
    inner = SlowInner(delay_s=0.2)
    credential = SingleFlightCredential(inner)
    first = asyncio.create_task(credential.get_token_info(SCOPE))
    await asyncio.sleep(0.01)  # the first caller's request is in flight
    others = [asyncio.create_task(credential.get_token_info(SCOPE)) for _ in range(5)]
    await asyncio.sleep(0.01)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    # a waiter cancelled by its own timeout is released at once, not when the request ends
    began = time.monotonic()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(credential.get_token_info(SCOPE), timeout=0.02)
    assert time.monotonic() - began < 0.15
    tokens = await asyncio.wait_for(asyncio.gather(*others), timeout=2)
    assert {token.token for token in tokens} == {"token-1"}
    assert inner.requests == 1  # the request went on for the others; nobody started another


async def test_close_cancels_a_request_nobody_waits_for_any_more() -> None:
    inner = SlowInner(delay_s=0.2, fail=True)
    credential = SingleFlightCredential(inner)
    first = asyncio.create_task(credential.get_token_info(SCOPE))
    await asyncio.sleep(0.01)
    first.cancel()  # the only caller gave up; its request goes on (another may join it) ...
    second = asyncio.create_task(credential.get_token_info(SCOPE))
    await asyncio.sleep(0.01)
    assert not second.done() and inner.requests == 1  # ... and a later caller joined it
    await credential.close()  # ... until the credential is closed: nothing outlives it
    with pytest.raises(asyncio.CancelledError):
        await second
    assert inner.closed and inner.requests == 1


@pytest.fixture
def short_lived() -> Iterator[Simulator]:
    with Simulator(Estate.from_dict({"vms": []}), latency_s=0.0, token_lifetime_s=1.2) as running:
        yield running


async def test_a_token_that_expired_mid_run_is_requested_once_for_callers_that_find_it_expired_together(
    short_lived: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real azure-identity against the simulator's identity endpoint (App Service shape)."""
    for key, value in short_lived.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AZURE_CLIENT_ID", raising=False)
    credential = SingleFlightCredential(ManagedIdentityCredential())
    try:
        await credential.get_token_info(SCOPE)
        assert short_lived.counters()["requests"]["token"] == 1
        await asyncio.sleep(1.3)  # the token has expired: every caller now finds it expired
        tokens = await asyncio.gather(*(credential.get_token_info(SCOPE) for _ in range(10)))
        assert len({token.token for token in tokens}) == 1
        # one request for all ten (azure-identity alone makes one per caller: no lock)
        assert short_lived.counters()["requests"]["token"] == 2
    finally:
        await credential.close()

"""Who may call: API-key and admin-token checks and the per-client rate limits, as FastAPI dependencies
(tests override them, not monkey-patch)."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.dependencies import get_limiter, get_settings
from service.errors import APIError
from service.ratelimit import RateLimiter
from thumbtune.core.settings import Settings


def key_id(key: str) -> str:
    """The id events carry for an API key: a sha256 prefix, never the key itself."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


# The schemes declare the bearer header in the OpenAPI schema (clients generated from it send it); they never
# refuse a request themselves (auto_error=False): the checks below do, with OpenAI's error shape.
API_KEY = HTTPBearer(
    auto_error=False, scheme_name="apiKey", description="One of THUMBTUNE_API_KEYS (if the server has keys)."
)
ADMIN_TOKEN = HTTPBearer(auto_error=False, scheme_name="adminToken", description="THUMBTUNE_ADMIN_TOKEN.")


def _token(credentials: HTTPAuthorizationCredentials | None) -> str | None:
    if credentials is None:
        return None
    return credentials.credentials.strip() or None


def api_key_id(
    credentials: HTTPAuthorizationCredentials | None = Security(API_KEY),
    settings: Settings = Depends(get_settings),
) -> str | None:
    """Dependency: None when the server has no API keys, else the caller's key id (401 otherwise)."""
    if not settings.api_key_values:
        return None
    token = _token(credentials)
    if token is None:
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
    if not any(hmac.compare_digest(token.encode(), k.encode()) for k in settings.api_key_values):
        raise APIError(401, "incorrect API key provided", code="invalid_api_key")
    return key_id(token)


def rate_limited(route: str) -> Callable[..., None]:
    """Dependency for ``route`` ("chat" or "feedback"): a 429 once the caller is over its limit. The caller
    is its API key's id, else its address (behind a proxy, the address uvicorn takes from X-Forwarded-For
    when the proxy is in FORWARDED_ALLOW_IPS)."""

    def dependency(
        request: Request,
        key_id: str | None = Depends(api_key_id),
        limiter: RateLimiter = Depends(get_limiter),
    ) -> None:
        host = request.client.host if request.client else "unknown"
        limiter.check(route, key_id or f"addr:{host}")

    return dependency


def require_admin(
    credentials: HTTPAuthorizationCredentials | None = Security(ADMIN_TOKEN),
    settings: Settings = Depends(get_settings),
) -> None:
    if settings.admin_token is None or not settings.admin_token.get_secret_value():
        raise APIError(
            403, "admin routes are disabled: set THUMBTUNE_ADMIN_TOKEN to enable them", code="admin_disabled"
        )
    token = _token(credentials) or ""
    if not hmac.compare_digest(token.encode(), settings.admin_token.get_secret_value().encode()):
        raise APIError(
            401,
            "admin routes need 'Authorization: Bearer <THUMBTUNE_ADMIN_TOKEN>'",
            code="invalid_admin_token",
        )

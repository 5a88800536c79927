"""The OpenAPI schema says what the server accepts: schemathesis generates requests from it, in process, a
bounded number per operation (valid ones and, as schemathesis does by default, invalid ones), and for each:

- no 5xx;
- the response is documented for the operation (status, content type) and matches its schema;
- a request the schema allows is answered 2xx, or refused by a documented limit only: a setting of this
  server (max_tokens over THUMBTUNE_MAX_TOKENS_CAP, the context window, the number of messages), a state the
  schema cannot list (an unknown model, answer or version; a rating already given; a refused version; no
  canary to promote), or a rule between fields the field descriptions state (chosen is not rejected).
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from service.app import create_app
from thumbtune.core.settings import Settings

pytestmark = pytest.mark.broker

ADMIN = "schema-admin"
SERVED_MODELS = ("thumbtune", "base", "thumbtune@v0")
"""What `model` can name on this server (versions come and go, so the schema cannot list them)."""
DOCUMENTED_REFUSALS = {
    "max_tokens_too_large",
    "context_length_exceeded",
    "too_many_messages",
    "model_not_found",
    "response_not_found",
    "already_rated",
    "version_not_found",
    "version_refused",
}
"""The error codes of the documented limits (each named in its field's or operation's description)."""
RULES_BETWEEN_FIELDS = ("chosen and rejected must be different answers",)


def refused_only_by_documented_limits(ctx, response, case) -> None:  # noqa: ANN001 - a schemathesis check
    """On a request the schema allows: a documented status, and a refusal only for a documented limit. (On the
    invalid ones schemathesis also sends, a 4xx: the others check no 5xx and documented bodies.)"""
    status, label = response.status_code, case.operation.label
    if not (case.meta and case.meta.generation.mode.is_positive):
        return
    documented = {int(s) for s in case.operation.responses.status_codes if s.isdigit()}
    assert status in documented, f"{label} answered {status}, not documented ({sorted(documented)})"
    if status < 400:
        return
    error = response.json()["error"]
    message, code = error["message"], error["code"]
    assert code in DOCUMENTED_REFUSALS or any(rule in message for rule in RULES_BETWEEN_FIELDS), (
        f"{label} refused a request its schema allows: {status} {code}: {message}\nbody: {case.body!r}"
    )


schema = schemathesis.openapi.from_dict(create_app(Settings()).openapi())  # the schema needs no running app


@pytest.fixture
def app(client_factory):  # noqa: ANN001, ANN201
    return client_factory(
        admin_token=ADMIN,
        adapter_follow=False,  # the admin routes act on this replica: no control log to wait for
        max_tokens_cap=16,
        default_max_tokens=4,
        max_messages=8,
    ).app


@schema.parametrize()
# derandomized: the same examples on every run, so the suite stays deterministic (300 random ones passed too)
@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_the_server_accepts_what_its_schema_allows(case, app) -> None:  # noqa: ANN001
    if case.path == "/v1/chat/completions" and isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = SERVED_MODELS[len(str(case.body["model"])) % len(SERVED_MODELS)]
    case.call_and_validate(
        app=app,
        headers={"Authorization": f"Bearer {ADMIN}"},
        checks=[
            not_a_server_error,
            content_type_conformance,
            response_schema_conformance,
            refused_only_by_documented_limits,
        ],
    )

"""Every IdentityService RPC and the error paths a caller must handle, against `idmap dev`.

IDMAP_DEMO_FILE names the JSON examples/run-tests writes from `idmap dev`'s banner: the gRPC
address, the emulator's URL, the demo identities with their session tokens and, when the server
was started with a callers file, the caller keys.
"""

from __future__ import annotations

import json
import os
import urllib.request
import uuid

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from idmap_client import Action, Explanation, IdmapClient, explain_error, main, with_retry


@pytest.fixture(scope="module")
def demo() -> dict:
    path = os.environ.get("IDMAP_DEMO_FILE")
    if not path:
        pytest.fail("IDMAP_DEMO_FILE is not set: examples/run-tests starts idmap dev and writes it")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def session(demo: dict, email: str, aal: str = "aal1") -> dict:
    for entry in demo["entries"]:
        if entry["email"] == email and entry["aal"] == aal:
            return entry
    raise LookupError(f"idmap dev printed no {aal} session for {email}")


@pytest.fixture(scope="module")
def client(demo: dict):
    with IdmapClient(demo["grpc_target"], api_key=demo.get("api_key")) as c:
        grpc.channel_ready_future(c.channel).result(timeout=30)
        yield c


def new_identity(demo: dict) -> str:
    """A fresh identity through the admin API a real Kratos has (`POST /admin/identities`), so
    each run links an identity nobody linked before."""
    body = json.dumps(
        {
            "schema_id": "customer",
            "traits": {
                "email": f"python-{uuid.uuid4().hex[:12]}@example.com",
                "name": {"first": "Py", "last": "Thon"},
            },
        }
    ).encode()
    request = urllib.request.Request(
        f"{demo['kratos_url']}/admin/identities",
        data=body,
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 201
        return json.load(answer)["id"]


def failure(call) -> Explanation:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return explain_error(caught.value)


# --- success paths -------------------------------------------------------------------------------


def test_health_reports_serving(client: IdmapClient):
    assert client.health() == "SERVING"
    assert client.health("idmap.v1.IdentityService") == "SERVING"


def test_resolve_session_by_token_returns_session_identity_and_user(client, demo):
    alice = session(demo, "alice@example.com")
    answer = client.resolve_session(session_token=alice["session_token"])
    assert answer.session.active
    assert answer.session.authenticator_assurance_level == "aal1"
    assert answer.identity.id == alice["identity_id"]
    assert answer.identity.schema_id == "customer"
    assert answer.identity.traits.fields["email"].string_value == "alice@example.com"
    # idmap dev links a user on first sight (IDMAP_AUTO_LINK defaults to true).
    assert answer.HasField("user")
    assert answer.user.ory_identity_id == alice["identity_id"]


def test_resolve_session_by_cookie_is_the_same_session(client, demo):
    alice = session(demo, "alice@example.com")
    by_token = client.resolve_session(session_token=alice["session_token"])
    # A browser's whole Cookie header: idmap forwards only Ory's session cookie.
    by_cookie = client.resolve_session(cookie=f"theme=dark; {alice['cookie']}")
    assert by_cookie.session.id == by_token.session.id
    assert by_cookie.user.id == by_token.user.id


def test_resolve_aal2_session(client, demo):
    answer = client.resolve_session(
        session_token=session(demo, "dave@corp.example.com", "aal2")["session_token"]
    )
    assert answer.session.authenticator_assurance_level == "aal2"
    assert [m.method for m in answer.session.authentication_methods] == ["password", "totp"]


def test_get_user_by_ory_id_returns_the_resolved_user(client, demo):
    alice = session(demo, "alice@example.com")
    resolved = client.resolve_session(session_token=alice["session_token"]).user
    user = client.get_user_by_ory_id(alice["identity_id"])
    assert user.id == resolved.id
    assert user.state == "active"


def test_link_identity_is_idempotent_and_findable_by_external_id(client, demo):
    identity = new_identity(demo)
    external_id = f"crm-py-{uuid.uuid4().hex[:8]}"
    first = client.link_identity(identity, external_id=external_id)
    assert first.created
    assert first.user.ory_identity_id == identity
    assert first.user.external_id == external_id
    again = client.link_identity(identity, external_id=external_id)
    assert not again.created
    assert again.user.id == first.user.id
    assert client.get_by_external_id(external_id).id == first.user.id
    assert client.get_user_by_ory_id(identity).id == first.user.id


def test_batch_get_users_answers_in_request_order(client, demo):
    alice = session(demo, "alice@example.com")
    dave = session(demo, "dave@corp.example.com", "aal2")
    for who in (alice, dave):
        client.resolve_session(session_token=who["session_token"])
    unknown = str(uuid.uuid4())
    users = client.batch_get_users(
        [dave["identity_id"], unknown, alice["identity_id"], dave["identity_id"]]
    )
    # Unlinked identities are left out and duplicates answered once.
    assert [u.ory_identity_id for u in users] == [dave["identity_id"], alice["identity_id"]]


def test_invalidate_session_by_each_target(client, demo):
    alice = session(demo, "alice@example.com")
    resolved = client.resolve_session(session_token=alice["session_token"])
    client.invalidate_session(session_token=alice["session_token"])
    client.invalidate_session(session_id=resolved.session.id)
    client.invalidate_session(ory_identity_id=alice["identity_id"])
    # Only idmap's caches were emptied; Ory still holds the session, so it resolves again.
    assert (
        client.resolve_session(session_token=alice["session_token"]).session.id
        == resolved.session.id
    )


# --- error paths: what the caller does -----------------------------------------------------------


def test_unknown_session_means_log_in_again(client):
    why = failure(lambda: client.resolve_session(session_token="ory_st_" + "x" * 32))
    assert why.code == grpc.StatusCode.UNAUTHENTICATED
    assert why.reason == "SESSION_INVALID"
    assert why.action is Action.LOG_IN_AGAIN


def test_session_of_inactive_identity_means_log_in_again(client, demo):
    why = failure(
        lambda: client.resolve_session(
            session_token=session(demo, "erin@example.com")["session_token"]
        )
    )
    assert (why.code, why.reason, why.action) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "SESSION_INVALID",
        Action.LOG_IN_AGAIN,
    )


def test_aal1_session_of_identity_with_second_factor_means_step_up(client, demo):
    dave = session(demo, "dave@corp.example.com", "aal1")
    why = failure(lambda: client.resolve_session(session_token=dave["session_token"]))
    assert why.code == grpc.StatusCode.PERMISSION_DENIED
    # Ory's error id, verbatim and lower case.
    assert why.reason == "session_aal2_required"
    assert why.metadata["ory_error_id"] == "session_aal2_required"
    assert "aal=aal2" in why.redirect_browser_to
    assert why.action is Action.STEP_UP


def test_bad_uuid_is_invalid_argument_naming_the_field(client):
    why = failure(lambda: client.get_user_by_ory_id("not-a-uuid"))
    assert why.code == grpc.StatusCode.INVALID_ARGUMENT
    assert why.reason == "INVALID_ARGUMENT"
    assert [field for field, _ in why.field_violations] == ["ory_identity_id"]
    assert why.action is Action.FIX_REQUEST


def test_bad_uuid_in_a_batch_names_its_index(client, demo):
    why = failure(
        lambda: client.batch_get_users([session(demo, "alice@example.com")["identity_id"], "nope"])
    )
    assert why.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [field for field, _ in why.field_violations] == ["ory_identity_ids[1]"]


def test_unlinked_identity_and_unknown_external_id_are_not_found(client):
    why = failure(lambda: client.get_user_by_ory_id(str(uuid.uuid4())))
    assert (why.code, why.reason, why.action) == (
        grpc.StatusCode.NOT_FOUND,
        "USER_NOT_FOUND",
        Action.NOT_FOUND,
    )
    why = failure(lambda: client.get_by_external_id(f"nobody-{uuid.uuid4().hex}"))
    assert (why.code, why.reason) == (grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND")


def test_linking_an_identity_ory_does_not_have_is_not_found(client):
    why = failure(lambda: client.link_identity(str(uuid.uuid4())))
    assert (why.code, why.reason) == (grpc.StatusCode.NOT_FOUND, "IDENTITY_NOT_FOUND")


def test_external_id_held_by_another_user_is_a_conflict(client, demo):
    external_id = f"crm-py-{uuid.uuid4().hex[:8]}"
    holder = client.link_identity(new_identity(demo), external_id=external_id).user
    why = failure(lambda: client.link_identity(new_identity(demo), external_id=external_id))
    assert why.code == grpc.StatusCode.ALREADY_EXISTS
    assert why.reason == "EXTERNAL_ID_TAKEN"
    assert why.metadata == {"external_id": external_id, "user_id": holder.id}
    assert why.action is Action.CONFLICT


def test_caller_errors_are_not_the_persons(demo):
    if not demo.get("limited_api_key"):
        pytest.skip(
            "this idmap dev accepts any caller; examples/run-tests starts one with a callers file"
        )
    alice = session(demo, "alice@example.com")
    with IdmapClient(demo["grpc_target"]) as anonymous:
        why = failure(lambda: anonymous.resolve_session(session_token=alice["session_token"]))
    # Same code as an expired session, but the person must not be sent to log in.
    assert (why.code, why.reason, why.action) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "CALLER_UNAUTHENTICATED",
        Action.FIX_CALLER,
    )
    with IdmapClient(demo["grpc_target"], api_key=demo["limited_api_key"]) as limited:
        assert (
            limited.resolve_session(session_token=alice["session_token"]).identity.id
            == alice["identity_id"]
        )
        why = failure(lambda: limited.link_identity(alice["identity_id"]))
    assert (why.code, why.reason, why.action) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "CALLER_NOT_ALLOWED",
        Action.FIX_CALLER,
    )
    assert why.metadata["rpc"] == "LinkIdentity"


def test_command_line_exit_codes(demo, monkeypatch, capsys):
    monkeypatch.setenv("IDMAP_API_KEY", demo.get("api_key") or "")
    target = demo["grpc_target"]
    assert (
        main(["idmap_client.py", target, session(demo, "alice@example.com")["session_token"]]) == 0
    )
    assert (
        main(["idmap_client.py", target, session(demo, "erin@example.com")["session_token"]]) == 2
    )
    assert (
        main(
            [
                "idmap_client.py",
                target,
                session(demo, "dave@corp.example.com", "aal1")["session_token"],
            ]
        )
        == 3
    )
    out = capsys.readouterr().out
    assert "log in again" in out and "step up (session_aal2_required)" in out


# --- retrying: UNAVAILABLE cannot be provoked in idmap dev, so these statuses are built by hand ---


class SyntheticRpcError(grpc.RpcError):
    """An error as grpcio raises it, with `grpc-status-details-bin` in its trailers."""

    def __init__(self, code: grpc.StatusCode, reason: str, *extra):
        status = status_pb2.Status(code=code.value[0], message=f"synthetic {reason}")
        status.details.add().Pack(error_details_pb2.ErrorInfo(reason=reason, domain="idmap"))
        for detail in extra:
            status.details.add().Pack(detail)
        self._status = rpc_status.to_status(status)

    def code(self):
        return self._status.code

    def details(self):
        return self._status.details

    def trailing_metadata(self):
        return self._status.trailing_metadata


def test_rate_limited_is_retried_after_retry_info():
    retry_info = error_details_pb2.RetryInfo(
        retry_delay=duration_pb2.Duration(seconds=2, nanos=500_000_000)
    )
    errors = [SyntheticRpcError(grpc.StatusCode.UNAVAILABLE, "ORY_RATE_LIMITED", retry_info)]
    slept = []

    def call():
        if errors:
            raise errors.pop()
        return "answer"

    assert (
        explain_error(
            SyntheticRpcError(grpc.StatusCode.UNAVAILABLE, "ORY_RATE_LIMITED", retry_info)
        ).retry_after
        == 2.5
    )
    assert with_retry(call, sleep=slept.append) == "answer"
    assert slept == [2.5]


def test_unavailable_without_retry_info_backs_off_then_gives_up():
    slept = []

    def call():
        raise SyntheticRpcError(grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE")

    with pytest.raises(grpc.RpcError):
        with_retry(call, attempts=3, base_delay=0.1, sleep=slept.append)
    assert len(slept) == 2 and 0.08 <= slept[0] <= 0.12 and 0.16 <= slept[1] <= 0.24


def test_idmap_misconfigured_for_ory_is_for_an_operator_and_not_retried():
    slept = []

    def call():
        raise SyntheticRpcError(grpc.StatusCode.UNAVAILABLE, "ORY_REDIRECTED")

    with pytest.raises(grpc.RpcError) as caught:
        with_retry(call, sleep=slept.append)
    assert explain_error(caught.value).action is Action.ALERT_OPERATOR
    assert slept == []


def test_overloaded_server_is_retried():
    why = explain_error(SyntheticRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "SERVER_OVERLOADED"))
    assert why.action is Action.RETRY


def test_errors_without_idmaps_error_info_never_send_the_person_to_log_in():
    class Bare(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.UNAUTHENTICATED

        def details(self):
            return "rejected by the mesh"

        def trailing_metadata(self):
            return ()

    assert explain_error(Bare()).action is Action.FIX_CALLER

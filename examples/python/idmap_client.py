"""Calling idmap.v1.IdentityService from Python, and deciding what to do with each error.

The stubs are generated from proto/ by grpcio-tools and are not committed (see examples/README.md):

    python -m grpc_tools.protoc -I ../../proto --python_out=GEN --pyi_out=GEN \
        --grpc_python_out=GEN ../../proto/idmap/v1/identity.proto
    PYTHONPATH=GEN python idmap_client.py 127.0.0.1:50051 ory_st_...
"""

from __future__ import annotations

import dataclasses
import enum
import os
import random
import sys
import time
from collections.abc import Callable
from typing import TypeVar

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

try:
    from idmap.v1 import identity_pb2, identity_pb2_grpc
except ImportError as e:  # pragma: no cover - a set-up mistake, not a code path
    raise ImportError(
        "the idmap.v1 stubs are not on PYTHONPATH; generate them with grpc_tools.protoc "
        "(examples/run-tests shows the command) and add the output directory to PYTHONPATH"
    ) from e

# Every ErrorInfo idmap sends has this domain; an error without it did not come from idmap
# (a proxy, the mesh, the client library's own connection failure).
IDMAP_DOMAIN = "idmap"

# The reasons that say the caller's deployment is at fault, never the person's session.
CALLER_REASONS = {"CALLER_UNAUTHENTICATED", "CALLER_NOT_ALLOWED"}
# UNAVAILABLE reasons that only an operator fixing idmap's Ory settings cures.
OPERATOR_REASONS = {"ORY_ADMIN_UNAUTHORIZED", "ORY_REDIRECTED"}


class Action(enum.Enum):
    """What the calling service does next."""

    # The person's session is gone: send them to the login page.
    LOG_IN_AGAIN = "log in again"
    # The session is fine but its assurance level is too low: ask for a second factor.
    STEP_UP = "step up"
    # idmap or a dependency is briefly unable to answer: try again after a pause.
    RETRY = "retry"
    # Our own service's caller credentials or grants are wrong: page our team, not the person.
    FIX_CALLER = "fix this service's caller credentials"
    # idmap's Ory settings are wrong: retrying helps only once its operator has fixed them.
    ALERT_OPERATOR = "alert idmap's operator"
    # The request itself is malformed: a bug in the caller, retrying cannot help.
    FIX_REQUEST = "fix the request"
    NOT_FOUND = "not found"
    # A LinkIdentity that clashes with what is stored; metadata names the other side.
    CONFLICT = "conflict"
    # A bug in idmap or Ory; the server logged the detail.
    REPORT = "report a bug"


@dataclasses.dataclass
class Explanation:
    action: Action
    code: grpc.StatusCode
    message: str
    # ErrorInfo's reason and metadata; empty when the error did not come from idmap.
    reason: str = ""
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    # BadRequest's (field, description) pairs.
    field_violations: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    # RetryInfo's delay in seconds, when Ory said how long to wait.
    retry_after: float | None = None

    @property
    def redirect_browser_to(self) -> str | None:
        """Where Ory wants the browser for a step-up (PERMISSION_DENIED only)."""
        return self.metadata.get("redirect_browser_to")


def explain_error(err: grpc.RpcError) -> Explanation:
    """Decodes `grpc-status-details-bin` and says what the caller should do about `err`."""
    code = err.code()
    explanation = Explanation(action=Action.REPORT, code=code, message=err.details() or "")
    status = rpc_status.from_call(err)
    for detail in status.details if status is not None else []:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if info.domain == IDMAP_DOMAIN:
                explanation.reason = info.reason
                explanation.metadata = dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            explanation.field_violations = [(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            explanation.retry_after = retry.retry_delay.ToTimedelta().total_seconds()
    explanation.action = _action(code, explanation.reason)
    return explanation


def _action(code: grpc.StatusCode, reason: str) -> Action:
    # The reason decides before the code: UNAUTHENTICATED and PERMISSION_DENIED each cover both a
    # person's session and our own service's credentials.
    if reason in CALLER_REASONS:
        return Action.FIX_CALLER
    if code == grpc.StatusCode.UNAUTHENTICATED:
        # Only idmap's SESSION_INVALID is about the person; anything else refusing us (a mesh, a
        # gateway) is about the calling service.
        return Action.LOG_IN_AGAIN if reason == "SESSION_INVALID" else Action.FIX_CALLER
    if code == grpc.StatusCode.PERMISSION_DENIED:
        # idmap passes Ory's error id through (session_aal2_required, or forbidden): the session
        # is valid but not strong enough. Without idmap's ErrorInfo it is not about the session.
        return Action.STEP_UP if reason else Action.FIX_CALLER
    if code == grpc.StatusCode.UNAVAILABLE:
        return Action.ALERT_OPERATOR if reason in OPERATOR_REASONS else Action.RETRY
    if code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED):
        return Action.RETRY
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
        return Action.FIX_REQUEST
    if code == grpc.StatusCode.NOT_FOUND:
        return Action.NOT_FOUND
    if code == grpc.StatusCode.ALREADY_EXISTS:
        return Action.CONFLICT
    return Action.REPORT


T = TypeVar("T")


def with_retry(
    call: Callable[[], T],
    attempts: int = 4,
    base_delay: float = 0.2,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Runs `call`, retrying errors whose action is RETRY: after RetryInfo's delay when the
    server gave one, else after a jittered exponential backoff. Other errors are raised at once."""
    for attempt in range(attempts):
        try:
            return call()
        except grpc.RpcError as err:
            explanation = explain_error(err)
            if explanation.action is not Action.RETRY or attempt == attempts - 1:
                raise
            delay = explanation.retry_after
            if delay is None:
                delay = base_delay * (2**attempt) * random.uniform(0.8, 1.2)
            sleep(delay)
    raise AssertionError("unreachable: the last attempt returns or raises")


class IdmapClient:
    """IdentityService with a deadline on every call and, when given, the caller's API key."""

    def __init__(self, target: str, api_key: str | None = None, timeout: float = 5.0):
        self.channel = grpc.insecure_channel(target)
        self.stub = identity_pb2_grpc.IdentityServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.timeout = timeout
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> IdmapClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method, request):
        return method(request, timeout=self.timeout, metadata=self.metadata)

    def health(self, service: str = "") -> str:
        """The serving status's name: SERVING, NOT_SERVING, ... (health needs no caller key)."""
        answer = self.health_stub.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=self.timeout
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)

    def resolve_session(self, session_token: str | None = None, cookie: str | None = None):
        if (session_token is None) == (cookie is None):
            raise ValueError("give exactly one of session_token and cookie")
        if session_token is not None:
            request = identity_pb2.ResolveSessionRequest(session_token=session_token)
        else:
            request = identity_pb2.ResolveSessionRequest(cookie=cookie)
        return self._call(self.stub.ResolveSession, request)

    def get_user_by_ory_id(self, ory_identity_id: str):
        request = identity_pb2.GetUserByOryIdRequest(ory_identity_id=ory_identity_id)
        return self._call(self.stub.GetUserByOryId, request).user

    def get_by_external_id(self, external_id: str):
        request = identity_pb2.GetByExternalIdRequest(external_id=external_id)
        return self._call(self.stub.GetByExternalId, request).user

    def link_identity(self, ory_identity_id: str, user_id: str = "", external_id: str = ""):
        request = identity_pb2.LinkIdentityRequest(
            ory_identity_id=ory_identity_id, user_id=user_id, external_id=external_id
        )
        return self._call(self.stub.LinkIdentity, request)

    def batch_get_users(self, ory_identity_ids: list[str]):
        request = identity_pb2.BatchGetUsersRequest(ory_identity_ids=ory_identity_ids)
        return list(self._call(self.stub.BatchGetUsers, request).users)

    def invalidate_session(
        self,
        session_token: str | None = None,
        session_id: str | None = None,
        ory_identity_id: str | None = None,
    ) -> None:
        targets = {
            "session_token": session_token,
            "session_id": session_id,
            "ory_identity_id": ory_identity_id,
        }
        given = {k: v for k, v in targets.items() if v is not None}
        if len(given) != 1:
            raise ValueError("give exactly one of session_token, session_id and ory_identity_id")
        self._call(self.stub.InvalidateSession, identity_pb2.InvalidateSessionRequest(**given))


def main(argv: list[str]) -> int:
    """`idmap_client.py TARGET SESSION_TOKEN`: who the token belongs to, or what to do instead.
    Exit codes (shared with the Node and Rust examples): 0 resolved, 2 log in again, 3 step up,
    4 still unavailable after retrying, 1 anything else."""
    if len(argv) != 3:
        print(
            f"usage: {argv[0]} HOST:PORT SESSION_TOKEN  (IDMAP_API_KEY: the caller's key)",
            file=sys.stderr,
        )
        return 64
    with IdmapClient(argv[1], api_key=os.environ.get("IDMAP_API_KEY")) as client:
        try:
            answer = with_retry(lambda: client.resolve_session(session_token=argv[2]))
        except grpc.RpcError as err:
            explanation = explain_error(err)
            if explanation.action is Action.LOG_IN_AGAIN:
                print("session invalid: send the person to log in again")
                return 2
            if explanation.action is Action.STEP_UP:
                where = explanation.redirect_browser_to or "the login flow with aal=aal2"
                print(f"step up ({explanation.reason}): send the browser to {where}")
                return 3
            if explanation.action is Action.RETRY:
                print(f"idmap still unavailable ({explanation.reason}): try again later")
                return 4
            print(
                f"{explanation.action.value}: {explanation.code.name} {explanation.reason}: "
                f"{explanation.message}"
            )
            return 1
    email = answer.identity.traits.fields["email"].string_value
    aal = answer.session.authenticator_assurance_level
    if not answer.HasField("user"):
        # Only when the server runs with IDMAP_AUTO_LINK=false.
        print(f"identity {answer.identity.id} ({email}) has no user yet, session at {aal}")
        return 0
    print(f"user {answer.user.id} ({email}), session {answer.session.id} at {aal}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

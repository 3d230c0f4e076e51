"""The controller's Secret hand-over: agents get a Secret key only for their own instances.

Why this module exists: node agents hold no RBAC on Secrets (manifests/base/rbac/agent.yaml),
so a compromised node cannot read the cluster's Secrets, nor another node's instances'
console passwords or cloud-init user data. An agent that must read one asks the controller
(``POST /secrets`` on the HTTPS server every controller replica runs for the webhook,
:class:`webhook.AdmissionServer`) with its pod's projected ServiceAccount token, whose
audience is :data:`AUDIENCE` (so the token is worth nothing against the API server, and the
API server's own tokens are worth nothing here). The controller:

1. authenticates the token with a TokenReview for that audience;
2. takes the caller's node from the bound token's node-name claim, and refuses anyone but the
   agent ServiceAccount (:func:`secret_policy.caller_node`);
3. reads the namespace's VirtualInstances and Migrations fresh from the API (not a cache:
   a just-moved instance must not hand its secret to the node it left) and asks
   :func:`secret_policy.decide`;
4. only then reads the Secret with its own identity and answers with the key's value.

Anything else is 401/403 with the reason in the body (the agent turns it into the instance's
condition). Values are never logged; the log says who asked for which key and the decision.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import pydantic

from kubehv import api
from kubehv.operator import k8s, secret_policy

log = logging.getLogger(__name__)

PATH = secret_policy.PATH
AUDIENCE = secret_policy.AUDIENCE
MAX_BODY = 4096

Reply = tuple[int, dict[str, Any]]
Model = TypeVar("Model", api.VirtualInstance, api.Migration)


@dataclasses.dataclass(frozen=True)
class Review:
    """What a TokenReview said about a token."""

    authenticated: bool
    error: str = ""
    audiences: tuple[str, ...] = ()
    username: str = ""
    extra: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)


Reviewer = Callable[[str], Review]


def token_reviewer(kube: k8s.Kube, audience: str = AUDIENCE) -> Reviewer:
    """A TokenReview call with the controller's identity (RBAC: tokenreviews create)."""

    def review(token: str) -> Review:
        got = kube.review_token(token, [audience])
        if not got:
            return Review(False, "no status in the TokenReview")
        user = got.get("user") or {}
        return Review(
            authenticated=bool(got.get("authenticated")),
            error=str(got.get("error") or ""),
            audiences=tuple(got.get("audiences") or ()),
            username=str(user.get("username") or ""),
            extra=dict(user.get("extra") or {}),
        )

    return review


def _typed(kind: type[Model], items: list[dict[str, Any]]) -> list[Model]:
    """The listed objects as models; a malformed one is logged and left out (it names
    nothing an agent may read)."""
    out = []
    for item in items:
        try:
            out.append(kind.model_validate(item))
        except pydantic.ValidationError as exc:
            log.warning("secret hand-over: cannot read a %s (%s); ignoring it", kind.KIND, exc)
    return out


def agent_username(env: Mapping[str, str] = os.environ) -> str:
    """The agent's ServiceAccount user: ``KUBEHV_AGENT_SERVICE_ACCOUNT`` or
    ``system:serviceaccount:<POD_NAMESPACE>:kubehv-agent``."""
    explicit = env.get("KUBEHV_AGENT_SERVICE_ACCOUNT", "")
    if explicit:
        return explicit
    namespace = env.get("POD_NAMESPACE") or "kubehv-system"
    return f"system:serviceaccount:{namespace}:kubehv-agent"


class Handover:
    """``POST /secrets``: ``{"namespace", "name", "key"}`` -> ``{"data": <base64>}``."""

    def __init__(
        self,
        kube: k8s.Kube,
        review: Reviewer,
        agent_user: str,
        audience: str = AUDIENCE,
    ) -> None:
        self.kube, self.review, self.agent_user, self.audience = kube, review, agent_user, audience

    def handle(self, headers: Mapping[str, str], body: bytes) -> Reply:
        """One request (header names in lower case), answered with (HTTP code, JSON body);
        never raises."""
        try:
            return self._handle(headers, body)
        except Exception as exc:
            log.exception("secret hand-over failed")
            return 500, {"reason": f"the controller could not decide: {type(exc).__name__}"}

    def _handle(self, headers: Mapping[str, str], body: bytes) -> Reply:
        auth = headers.get("authorization") or ""
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return 401, {"reason": "no bearer token (the agent's projected ServiceAccount token)"}
        wanted = _wanted(body)
        if isinstance(wanted, str):
            return 400, {"reason": wanted}
        review = self.review(token.strip())
        if not review.authenticated:
            why = review.error or "not authenticated"
            log.warning("secret hand-over: token refused (%s) for %s", why, wanted)
            return 401, {"reason": f"token not accepted for audience {self.audience}: {why}"}
        if self.audience not in review.audiences:
            return 401, {"reason": f"token not issued for audience {self.audience}"}
        caller = secret_policy.caller_node(review.username, review.extra, self.agent_user)
        if not caller.allowed:
            log.warning("secret hand-over refused for %s: %s", wanted, caller.reason)
            return 403, {"reason": caller.reason}
        node, ns = caller.reason, wanted.namespace
        decision = secret_policy.decide(
            node,
            wanted,
            _typed(api.VirtualInstance, self.kube.list_instances(f"metadata.namespace={ns}")),
            _typed(api.Migration, self.kube.list_migrations(namespace=ns)),
        )
        if not decision.allowed:
            log.warning("secret hand-over to node %s refused: %s", node, decision.reason)
            return 403, {"reason": decision.reason}
        value = self.kube.read_secret_key(wanted.namespace, wanted.name, wanted.key)
        if value is None:
            log.info("secret hand-over to node %s: %s not found", node, wanted)
            return 404, {"reason": f"Secret {wanted} not found"}
        log.info("secret hand-over to node %s: %s (%s)", node, wanted, decision.reason)
        return 200, {"data": base64.b64encode(value).decode()}


def _wanted(body: bytes) -> secret_policy.SecretKey | str:
    """The request body as a SecretKey, or why it is not one."""
    if len(body) > MAX_BODY:
        return "request too large"
    try:
        doc = json.loads(body or b"{}")
    except ValueError:
        return "request body is not JSON"
    if not isinstance(doc, Mapping):
        return "request body is not a JSON object"
    parts = [doc.get(k) for k in ("namespace", "name", "key")]
    if not all(isinstance(p, str) and p for p in parts):
        return "namespace, name and key are required strings"
    return secret_policy.SecretKey(*[str(p) for p in parts])

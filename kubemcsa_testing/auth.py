"""Authentication and authorization of requests to the in-memory API server.

The admin token is a `system:masters` user; a service-account token is verified by tokens.py and is only
alive while its ServiceAccount (and, for a legacy token, its Secret) is; a token of another issuer that the
server's AuthenticationConfiguration trusts is verified by oidc.py; no token is `system:anonymous`.
Authorization is RBAC over the objects in the store (rbac.py).
"""

from __future__ import annotations

import hmac
from typing import Any

from kubemcsa_testing import errors, oidc, rbac, tokens
from kubemcsa_testing.rbac import RequestAttributes, UserInfo
from kubemcsa_testing.store import Store

ADMIN = UserInfo("admin", ("system:masters", "system:authenticated"))
ANONYMOUS = UserInfo("system:anonymous", ("system:unauthenticated",))


class Authenticator:
    def __init__(self, store: Store, authority: tokens.TokenAuthority, admin_token: str) -> None:
        self.store = store
        self.authority = authority
        self._admin_token = admin_token
        self.jwt = oidc.JWTAuthenticators()

    def __repr__(self) -> str:
        return "Authenticator(<redacted>)"

    def _lookup_sa(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.store.get("/serviceaccounts", namespace, name)

    def _lookup_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.store.get("/secrets", namespace, name)

    def authenticate(self, authorization: str | None) -> UserInfo:
        """The user behind an Authorization header; 401 Unauthorized for a token nobody issued (or revoked)."""
        if not authorization:
            return ANONYMOUS
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise errors.unauthorized()
        if hmac.compare_digest(token.encode(), self._admin_token.encode()):
            return ADMIN
        claims = self.authority.authenticate(
            token, lookup_service_account=self._lookup_sa, lookup_secret=self._lookup_secret
        )
        if claims is not None:
            return tokens.user_for_claims(claims)
        federated = self.jwt.authenticate(token)
        if federated is None:
            raise errors.unauthorized()
        return federated

    def impersonate(self, user: UserInfo, target: str | None, groups: list[str], uid: str | None) -> UserInfo:
        """The user named by Impersonate-* headers, if `user` may impersonate them (kubectl --as)."""
        if not target:
            if groups or uid:
                raise errors.StatusError(
                    500, "InternalError", "Internal error occurred: requested impersonation of groups without a user"
                )
            return user
        sa_prefix = "system:serviceaccount:"
        if target.startswith(sa_prefix) and target.count(":") == 3:
            namespace, name = target[len(sa_prefix) :].split(":")
            attrs = RequestAttributes("impersonate", "", "serviceaccounts", namespace=namespace, name=name)
        else:
            attrs = RequestAttributes("impersonate", "", "users", name=target)
        self.authorize(user, attrs)
        for group in groups:
            self.authorize(user, RequestAttributes("impersonate", "", "groups", name=group))
        if target.startswith(sa_prefix) and not groups:
            namespace = target[len(sa_prefix) :].split(":")[0]
            groups = ["system:serviceaccounts", f"system:serviceaccounts:{namespace}"]
        if target != "system:anonymous" and "system:authenticated" not in groups:
            groups = [*groups, "system:authenticated"]
        return UserInfo(target, tuple(groups), uid or "")

    def authorize(self, user: UserInfo, attrs: RequestAttributes) -> None:
        """Raise 403 Forbidden with kube's message unless RBAC allows the request."""
        if "system:masters" in user.groups:
            return
        with self.store.lock:
            namespace = attrs.namespace if attrs.resource_request else None
            roles = self.store.list("rbac.authorization.k8s.io/roles", namespace)[0] if namespace else []
            bindings = self.store.list("rbac.authorization.k8s.io/rolebindings", namespace)[0] if namespace else []
            cluster_roles = self.store.list("rbac.authorization.k8s.io/clusterroles")[0]
            cluster_bindings = self.store.list("rbac.authorization.k8s.io/clusterrolebindings")[0]
        policy = {
            "roles": roles,
            "cluster_roles": cluster_roles,
            "role_bindings": bindings,
            "cluster_role_bindings": cluster_bindings,
        }
        if not rbac.authorize(user, attrs, **policy):
            # kube names the roles a user's bindings point at but that do not exist: a common misconfiguration.
            reason = rbac.missing_role_reasons(user, attrs, **policy)
            raise errors.StatusError(
                403, "Forbidden", rbac.forbidden_message(user, attrs, reason), rbac.forbidden_details(attrs)
            )

"""Authentication and authorization of requests to the in-memory API server.

The admin token is a `system:masters` user; a service-account token is verified by tokens.py and is only
alive while its ServiceAccount (and, for a legacy token, its Secret) is; a token of another issuer that the
server's AuthenticationConfiguration trusts is verified by oidc.py; no token is `system:anonymous`.
Authorization is RBAC over the objects in the store (rbac.py); its answers are cached while no RBAC object
changes (RbacCache).
"""

from __future__ import annotations

import hmac
import threading
from typing import Any

from kubemcsa_testing import errors, oidc, rbac, tokens
from kubemcsa_testing.rbac import RequestAttributes, UserInfo
from kubemcsa_testing.store import Store

ADMIN = UserInfo("admin", ("system:masters", "system:authenticated"))
ANONYMOUS = UserInfo("system:anonymous", ("system:unauthenticated",))
RBAC_STORAGES = (
    "rbac.authorization.k8s.io/roles",
    "rbac.authorization.k8s.io/clusterroles",
    "rbac.authorization.k8s.io/rolebindings",
    "rbac.authorization.k8s.io/clusterrolebindings",
)


class RbacCache:
    """RBAC answers for one state of the RBAC objects: the rules each (user, groups, namespace) holds, and the
    decisions taken with them. The state is the four RBAC storages' newest resourceVersions: any write to a
    Role, ClusterRole or binding starts an empty cache. Bounded: past `max_entries` the oldest entries go."""

    def __init__(self, max_entries: int = 4096) -> None:
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._state: tuple[int, ...] | None = None
        self._rules: dict[tuple[str, tuple[str, ...], str], tuple[Any, ...]] = {}
        self._allowed: dict[tuple[str, tuple[str, ...], RequestAttributes], bool] = {}  # allowed requests

    def _entries_for(self, state: tuple[int, ...]) -> bool:
        """Under the lock: start afresh if the RBAC objects changed; False if `state` is older than the cache's."""
        if self._state != state:
            if self._state is not None and state < self._state:
                return False  # computed before a change that another request has seen: do not keep it
            self._state = state
            self._rules.clear()
            self._allowed.clear()
        return True

    def allowed(self, state: tuple[int, ...], user: UserInfo, attrs: RequestAttributes) -> bool:
        """True if this request was allowed in this state (False: not known to be)."""
        with self._lock:
            return self._state == state and (user.username, user.groups, attrs) in self._allowed

    def rules(self, state: tuple[int, ...], user: UserInfo, namespace: str) -> tuple[Any, ...] | None:
        with self._lock:
            if self._state != state:
                return None
            return self._rules.get((user.username, user.groups, namespace))

    def remember(
        self,
        state: tuple[int, ...],
        user: UserInfo,
        namespace: str,
        rules: tuple[Any, ...],
        allowed: RequestAttributes | None,
    ) -> None:
        """Keep the rules `user` holds in `namespace` in `state`, and a request they allowed (if any)."""
        with self._lock:
            if not self._entries_for(state):
                return
            _bounded_put(self._rules, (user.username, user.groups, namespace), rules, self.max_entries)
            if allowed is not None:
                _bounded_put(self._allowed, (user.username, user.groups, allowed), True, self.max_entries)


def _bounded_put(entries: dict[Any, Any], key: Any, value: Any, max_entries: int) -> None:
    if key not in entries and len(entries) >= max_entries:
        del entries[next(iter(entries))]  # the oldest (dicts keep insertion order)
    entries[key] = value


class Authenticator:
    def __init__(self, store: Store, authority: tokens.TokenAuthority, admin_token: str) -> None:
        self.store = store
        self.authority = authority
        self._admin_token = admin_token
        self.jwt = oidc.JWTAuthenticators()
        self.rbac_cache = RbacCache()

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
        """Raise 403 Forbidden with kube's message unless RBAC allows the request.

        An allowed request is answered from the cache while the RBAC objects are as they were; a denial is
        always evaluated afresh (its message names missing roles, and it is the rarer answer)."""
        if "system:masters" in user.groups:
            return
        try:
            hash(user.groups)
            cache: RbacCache | None = self.rbac_cache
        except TypeError:  # a SubjectAccessReview may name groups that are not strings: evaluated, not cached
            cache = None
        with self.store.lock:
            state = self._rbac_state()
        if cache is not None and cache.allowed(state, user, attrs):
            return
        namespace = rbac.authorization_namespace(attrs)
        rules = cache.rules(state, user, namespace) if cache is not None else None
        if rules is None:
            state, policy = self._policy(namespace)
            rules = rbac.rules_for(user, namespace, **policy)
        allowed = rbac.rules_allow(rules, attrs)
        if cache is not None:
            cache.remember(state, user, namespace, rules, attrs if allowed else None)
        if not allowed:
            self._deny(user, attrs)

    def _rbac_state(self) -> tuple[int, ...]:
        return tuple(self.store.last_write(key) for key in RBAC_STORAGES)

    def _policy(self, namespace: str) -> tuple[tuple[int, ...], dict[str, list[dict[str, Any]]]]:
        """The RBAC objects that can grant a request in `namespace` ("": cluster-wide only), and their state."""
        store = self.store
        with store.lock:
            return self._rbac_state(), {
                "roles": store.list(RBAC_STORAGES[0], namespace)[0] if namespace else [],
                "cluster_roles": store.list(RBAC_STORAGES[1])[0],
                "role_bindings": store.list(RBAC_STORAGES[2], namespace)[0] if namespace else [],
                "cluster_role_bindings": store.list(RBAC_STORAGES[3])[0],
            }

    def _deny(self, user: UserInfo, attrs: RequestAttributes) -> None:
        """Raise kube's 403 for a request that RBAC denies (evaluated again on the current objects)."""
        _, policy = self._policy(rbac.authorization_namespace(attrs))
        if not rbac.authorize(user, attrs, **policy):
            # kube names the roles a user's bindings point at but that do not exist: a common misconfiguration.
            reason = rbac.missing_role_reasons(user, attrs, **policy)
            raise errors.StatusError(
                403, "Forbidden", rbac.forbidden_message(user, attrs, reason), rbac.forbidden_details(attrs)
            )

"""Service-account tokens as kube-apiserver issues and checks them (pure logic, no HTTP).

TokenRequest (bound tokens), the legacy token controller's Secret tokens, bearer-token authentication,
TokenReview and the OIDC discovery documents. Wording and shapes follow kube-apiserver
(pkg/serviceaccount, pkg/registry/core/serviceaccount/storage/token.go), see
shared/reference/kube-apiserver-facts.md.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from kubemcsa_testing.errors import StatusError, bad_request, invalid
from kubemcsa_testing.rbac import UserInfo

AUTHENTICATION_GROUP = "authentication.k8s.io"
AUTHENTICATION_API_VERSION = f"{AUTHENTICATION_GROUP}/v1"
LEGACY_ISSUER = "kubernetes/serviceaccount"
SERVICE_ACCOUNT_USERNAME_PREFIX = "system:serviceaccount:"
SERVICE_ACCOUNTS_GROUP = "system:serviceaccounts"
AUTHENTICATED_GROUP = "system:authenticated"
DEFAULT_EXPIRATION_SECONDS = 3600
MIN_EXPIRATION_SECONDS = 600  # kube-apiserver refuses shorter TokenRequests ("less than 10 minutes")
MAX_EXPIRATION_SECONDS = 1 << 32

_LEGACY_NAMESPACE = "kubernetes.io/serviceaccount/namespace"
_LEGACY_SECRET_NAME = "kubernetes.io/serviceaccount/secret.name"
_LEGACY_SA_NAME = "kubernetes.io/serviceaccount/service-account.name"
_LEGACY_SA_UID = "kubernetes.io/serviceaccount/service-account.uid"
_MAX_TOKEN_LENGTH = 64 * 1024
MAX_VERIFIED_TOKENS = 1024  # tokens whose signature check is remembered (the oldest go first)

Lookup = Callable[[str, str], "dict[str, Any] | None"]


@dataclass(frozen=True)
class TokenClaims:
    """What a verified token says about its bearer (no secret material: safe to log)."""

    namespace: str
    service_account_name: str
    service_account_uid: str
    secret_name: str | None
    audiences: tuple[str, ...]
    expires_at: float | None
    secret_uid: str | None = None

    @property
    def username(self) -> str:
        return service_account_username(self.namespace, self.service_account_name)


def service_account_username(namespace: str, name: str) -> str:
    return f"{SERVICE_ACCOUNT_USERNAME_PREFIX}{namespace}:{name}"


def service_account_groups(namespace: str) -> tuple[str, ...]:
    return (SERVICE_ACCOUNTS_GROUP, f"{SERVICE_ACCOUNTS_GROUP}:{namespace}", AUTHENTICATED_GROUP)


def user_for_claims(claims: TokenClaims) -> UserInfo:
    """The user kube-apiserver sees behind a service-account token."""
    return UserInfo(
        username=claims.username,
        groups=service_account_groups(claims.namespace),
        uid=claims.service_account_uid,
    )


def self_subject_review(user: UserInfo) -> dict[str, Any]:
    """Answer POST /apis/authentication.k8s.io/v1/selfsubjectreviews: who the caller is (no uid when it has none)."""
    info: dict[str, Any] = {"username": user.username}
    if user.uid:
        info["uid"] = user.uid
    info["groups"] = list(user.groups)
    return {
        "kind": "SelfSubjectReview",
        "apiVersion": AUTHENTICATION_API_VERSION,
        "metadata": {"creationTimestamp": None},
        "status": {"userInfo": info},
    }


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _int_b64url(value: int) -> str:
    return _b64url(value.to_bytes((value.bit_length() + 7) // 8, "big"))


def rfc3339(timestamp: float) -> str:
    """RFC 3339 in UTC with a Z suffix and whole seconds, as Kubernetes writes times."""
    return datetime.fromtimestamp(int(timestamp), tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _TokenRejected(Exception):
    """Internal: why a token does not authenticate (the text never contains the token)."""


class TokenAuthority:
    """A cluster's service-account token issuer: one RSA key, one issuer URL, the API audiences."""

    def __init__(
        self,
        issuer: str,
        api_audiences: list[str] | None = None,
        *,
        leeway_seconds: float = 1.0,
        key_size: int = 2048,
    ) -> None:
        self.issuer = issuer
        self.api_audiences: list[str] = list(api_audiences) if api_audiences else [issuer]
        # kube allows go-jose's one-minute leeway; tests want expiry visible within seconds, so keep it small.
        self.leeway_seconds = leeway_seconds
        self._private_key = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
        self._public_key = self._private_key.public_key()
        der = self._public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        # Same key id derivation as kube-apiserver: base64url(sha256(PKIX DER)).
        self.key_id = _b64url(hashlib.sha256(der).digest())
        # token -> its payload, for tokens whose signature checked out (the key never changes); a client sends
        # the same token with every request, and an RSA verification costs more than the rest of the request.
        self._verified: dict[str, dict[str, Any]] = {}
        self._verified_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"TokenAuthority(issuer={self.issuer!r}, api_audiences={self.api_audiences!r}, key_id={self.key_id!r})"

    # --- signing -------------------------------------------------------------------------------------

    def _sign(self, claims: dict[str, Any]) -> str:
        header = {"alg": "RS256", "kid": self.key_id}
        signing_input = (
            _b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + _b64url(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
        )
        signature = self._private_key.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64url(signature)

    def token_request(
        self,
        body: dict[str, Any] | None,
        *,
        namespace: str,
        service_account: dict[str, Any],
        max_expiration_seconds: int | None = None,
        now: float | None = None,
        bound_pod: dict[str, Any] | None = None,
        bound_uid: str | None = None,
    ) -> dict[str, Any]:
        """Answer POST .../serviceaccounts/NAME/token as kube-apiserver does; StatusError on a bad request.

        `bound_pod`: the Pod of spec.boundObjectRef (looked up by the caller): echoed with its uid, and named in
        the token's `kubernetes.io.pod` claim; `bound_uid` the uid the request gave (echoed only if given)."""
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise bad_request("the body of a TokenRequest must be a JSON object")
        spec = body.get("spec") or {}
        metadata = body.get("metadata") or {}
        if not isinstance(spec, dict) or not isinstance(metadata, dict):
            raise _cannot_handle("TokenRequest", "spec and metadata must be objects")
        sa_meta = service_account.get("metadata") or {}
        sa_name = str(sa_meta.get("name", ""))
        sa_uid = str(sa_meta.get("uid", ""))

        audiences = spec.get("audiences")
        if audiences is None or audiences == []:
            audiences = list(self.api_audiences)
        if not isinstance(audiences, list) or not all(isinstance(a, str) for a in audiences):
            raise _cannot_handle("TokenRequest", "spec.audiences must be a list of strings")
        expiration = spec.get("expirationSeconds")
        if expiration is None:
            expiration = DEFAULT_EXPIRATION_SECONDS
        if isinstance(expiration, bool) or not isinstance(expiration, int):
            raise _cannot_handle("TokenRequest", "spec.expirationSeconds must be an integer")

        causes: list[tuple[str, str]] = []
        if expiration < MIN_EXPIRATION_SECONDS:
            causes.append(
                (
                    "spec.expirationSeconds",
                    f"Invalid value: {expiration}: may not specify a duration less than 10 minutes",
                )
            )
        if expiration > MAX_EXPIRATION_SECONDS:
            causes.append(
                (
                    "spec.expirationSeconds",
                    f"Invalid value: {expiration}: may not specify a duration larger than 2^32 seconds",
                )
            )
        if causes:
            raise invalid("TokenRequest", "", causes, group=AUTHENTICATION_GROUP)
        if metadata.get("name") and metadata["name"] != sa_name:
            raise invalid(
                "TokenRequest",
                sa_name,
                [
                    (
                        "metadata.name",
                        f'Invalid value: "{metadata["name"]}": must match the service account name if specified',
                    )
                ],
                group=AUTHENTICATION_GROUP,
            )
        if metadata.get("namespace") and metadata["namespace"] != namespace:
            raise invalid(
                "TokenRequest",
                sa_name,
                [
                    (
                        "metadata.namespace",
                        f'Invalid value: "{metadata["namespace"]}": '
                        "must match the service account namespace if specified",
                    )
                ],
                group=AUTHENTICATION_GROUP,
            )
        if max_expiration_seconds is not None and max_expiration_seconds > 0 and expiration > max_expiration_seconds:
            expiration = max_expiration_seconds

        issued = int(time.time() if now is None else now)
        expires = issued + expiration
        private: dict[str, Any] = {"namespace": namespace}
        bound_ref = None
        if bound_pod is not None:
            pod_meta = bound_pod.get("metadata") or {}
            private["pod"] = {"name": pod_meta.get("name"), "uid": pod_meta.get("uid")}
            bound_ref = {"kind": "Pod", "apiVersion": "v1", "name": pod_meta.get("name")}
            if bound_uid:  # echoed as asked: kube-apiserver does not fill the uid in (the token has it)
                bound_ref["uid"] = bound_uid
        private["serviceaccount"] = {"name": sa_name, "uid": sa_uid}
        claims = {
            "aud": list(audiences),
            "exp": expires,
            "iat": issued,
            "iss": self.issuer,
            "jti": str(uuid.uuid4()),  # kube-apiserver 1.29+ gives every token a unique ID
            "kubernetes.io": private,
            "nbf": issued,
            "sub": service_account_username(namespace, sa_name),
        }
        return {
            "kind": "TokenRequest",
            "apiVersion": AUTHENTICATION_API_VERSION,
            "metadata": {"name": sa_name, "namespace": namespace, "creationTimestamp": rfc3339(issued)},
            "spec": {"audiences": list(audiences), "expirationSeconds": expiration, "boundObjectRef": bound_ref},
            "status": {"token": self._sign(claims), "expirationTimestamp": rfc3339(expires)},
        }

    def legacy_token(self, *, namespace: str, service_account: dict[str, Any], secret: dict[str, Any]) -> str:
        """The token the legacy token controller puts in a kubernetes.io/service-account-token Secret."""
        sa_meta = service_account.get("metadata") or {}
        sa_name = str(sa_meta.get("name", ""))
        claims = {
            "iss": LEGACY_ISSUER,
            _LEGACY_NAMESPACE: namespace,
            _LEGACY_SECRET_NAME: str((secret.get("metadata") or {}).get("name", "")),
            _LEGACY_SA_NAME: sa_name,
            _LEGACY_SA_UID: str(sa_meta.get("uid", "")),
            "sub": service_account_username(namespace, sa_name),
        }
        return self._sign(claims)

    # --- verifying -----------------------------------------------------------------------------------

    def _verify_signature(self, token: str) -> dict[str, Any]:
        """The payload of a token signed by this authority's key, for one of its issuers (never modify it)."""
        if not isinstance(token, str) or len(token) > _MAX_TOKEN_LENGTH:
            raise _TokenRejected("invalid bearer token")
        with self._verified_lock:
            payload = self._verified.get(token)
        if payload is None:
            payload = self._check_signature(token)
            with self._verified_lock:
                if len(self._verified) >= MAX_VERIFIED_TOKENS:
                    del self._verified[next(iter(self._verified))]  # the oldest
                self._verified[token] = payload
        if payload.get("iss") not in (self.issuer, LEGACY_ISSUER):
            raise _TokenRejected("invalid bearer token")
        return payload

    def _check_signature(self, token: str) -> dict[str, Any]:
        parts = token.split(".")
        if len(parts) != 3:
            raise _TokenRejected("invalid bearer token")
        try:
            header = json.loads(_b64url_decode(parts[0]))
            payload = json.loads(_b64url_decode(parts[1]))
            signature = _b64url_decode(parts[2])
        except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
            raise _TokenRejected("invalid bearer token") from exc
        if not isinstance(header, dict) or not isinstance(payload, dict) or header.get("alg") != "RS256":
            raise _TokenRejected("invalid bearer token")
        if payload.get("iss") not in (self.issuer, LEGACY_ISSUER):
            # Another issuer's token: this authenticator has no opinion, like kube's JWT authenticator.
            raise _TokenRejected("invalid bearer token")
        try:
            self._public_key.verify(
                signature, f"{parts[0]}.{parts[1]}".encode("ascii"), padding.PKCS1v15(), hashes.SHA256()
            )
        except (InvalidSignature, ValueError) as exc:
            raise _TokenRejected("[invalid bearer token, square/go-jose: error in cryptographic primitive]") from exc
        return payload

    def _claims_from_payload(self, payload: dict[str, Any], now: float) -> TokenClaims:
        if payload.get("iss") == LEGACY_ISSUER:
            fields = [payload.get(k) for k in (_LEGACY_NAMESPACE, _LEGACY_SA_NAME, _LEGACY_SA_UID, _LEGACY_SECRET_NAME)]
            if not all(isinstance(f, str) and f for f in fields[:3]) or not isinstance(fields[3], str):
                raise _TokenRejected("[invalid bearer token, service account token claims could not be validated]")
            namespace, name, uid, secret_name = fields
            return TokenClaims(namespace, name, uid, secret_name, (), None)
        k8s = payload.get("kubernetes.io")
        sa = k8s.get("serviceaccount") if isinstance(k8s, dict) else None
        if not isinstance(sa, dict) or not isinstance(k8s.get("namespace"), str):
            raise _TokenRejected("[invalid bearer token, service account token claims could not be validated]")
        exp, nbf = payload.get("exp"), payload.get("nbf")
        if isinstance(exp, int | float) and now > exp + self.leeway_seconds:
            raise _TokenRejected("[invalid bearer token, service account token has expired]")
        if isinstance(nbf, int | float) and now < nbf - self.leeway_seconds:
            raise _TokenRejected("[invalid bearer token, service account token is not valid yet]")
        aud = payload.get("aud")
        if isinstance(aud, str):
            audiences: tuple[str, ...] = (aud,)
        elif isinstance(aud, list):
            audiences = tuple(a for a in aud if isinstance(a, str))
        else:
            audiences = ()
        secret = k8s.get("secret")
        return TokenClaims(
            namespace=k8s["namespace"],
            service_account_name=str(sa.get("name", "")),
            service_account_uid=str(sa.get("uid", "")),
            secret_name=secret.get("name") if isinstance(secret, dict) else None,
            audiences=audiences,
            expires_at=float(exp) if isinstance(exp, int | float) else None,
            secret_uid=secret.get("uid") if isinstance(secret, dict) else None,
        )

    def _check_objects(
        self, claims: TokenClaims, lookup_service_account: Lookup | None, lookup_secret: Lookup | None
    ) -> None:
        """The token is only as alive as its service account (and, for legacy tokens, its Secret)."""
        if lookup_service_account is not None:
            sa = lookup_service_account(claims.namespace, claims.service_account_name)
            if sa is None:
                raise _TokenRejected(
                    f'[invalid bearer token, serviceaccounts "{claims.service_account_name}" not found]'
                )
            sa_meta = sa.get("metadata") or {}
            if sa_meta.get("deletionTimestamp"):
                raise _TokenRejected(
                    f"[invalid bearer token, service account {claims.namespace}/{claims.service_account_name} "
                    "has been deleted]"
                )
            if str(sa_meta.get("uid", "")) != claims.service_account_uid:
                raise _TokenRejected(
                    f"[invalid bearer token, service account UID ({sa_meta.get('uid', '')}) does not match claim "
                    f"({claims.service_account_uid})]"
                )
        if claims.secret_name is not None and lookup_secret is not None:
            secret = lookup_secret(claims.namespace, claims.secret_name)
            if secret is None or (secret.get("metadata") or {}).get("deletionTimestamp"):
                raise _TokenRejected("[invalid bearer token, service account token has been invalidated]")
            secret_uid = str((secret.get("metadata") or {}).get("uid", ""))
            if claims.secret_uid is not None and secret_uid != claims.secret_uid:
                raise _TokenRejected("[invalid bearer token, service account token has been invalidated]")

    def _authenticate(
        self,
        token: str,
        *,
        audiences: Iterable[str] | None,
        now: float | None,
        lookup_service_account: Lookup | None,
        lookup_secret: Lookup | None,
    ) -> tuple[TokenClaims, tuple[str, ...]]:
        """(claims, the audiences granted) or _TokenRejected with kube's reason."""
        current = time.time() if now is None else now
        claims = self._claims_from_payload(self._verify_signature(token), current)
        # Legacy tokens have no aud: kube treats them as carrying the API server's own audiences.
        token_audiences = claims.audiences or tuple(self.api_audiences)
        requested = tuple(audiences) if audiences else tuple(self.api_audiences)
        granted = tuple(a for a in token_audiences if a in requested)
        if not granted:
            raise _TokenRejected(
                f"[invalid bearer token, token audiences {_go_quote_list(token_audiences)} is invalid for the target "
                f"audiences {_go_quote_list(requested)}]"
            )
        self._check_objects(claims, lookup_service_account, lookup_secret)
        return claims, granted

    def authenticate(
        self,
        token: str,
        *,
        now: float | None = None,
        lookup_service_account: Lookup | None = None,
        lookup_secret: Lookup | None = None,
    ) -> TokenClaims | None:
        """The claims of a valid token of this authority for the API audiences, else None (never raises).

        Pass the lookups to also refuse tokens whose service account (or legacy Secret) is gone or replaced.
        """
        try:
            claims, _ = self._authenticate(
                token,
                audiences=None,
                now=now,
                lookup_service_account=lookup_service_account,
                lookup_secret=lookup_secret,
            )
        except _TokenRejected:
            return None
        except Exception:  # a token must never crash the server; treat anything odd as unauthenticated
            return None
        return claims

    def token_review(
        self,
        body: dict[str, Any] | None,
        *,
        lookup_service_account: Lookup,
        lookup_secret: Lookup,
        now: float | None = None,
    ) -> dict[str, Any]:
        """Answer POST /apis/authentication.k8s.io/v1/tokenreviews as kube-apiserver does."""
        if not isinstance(body, dict):
            raise bad_request("the body of a TokenReview must be a JSON object")
        spec = body.get("spec")
        if not isinstance(spec, dict):
            spec = {}
        token = spec.get("token")
        if not isinstance(token, str) or not token:
            raise invalid(
                "TokenReview",
                "",
                [("spec.token", "Required value: token must not be empty")],
                group=AUTHENTICATION_GROUP,
            )
        spec_audiences = spec.get("audiences") or []
        if not isinstance(spec_audiences, list) or not all(isinstance(a, str) for a in spec_audiences):
            raise _cannot_handle("TokenReview", "spec.audiences must be a list of strings")
        status: dict[str, Any] = {"user": {}}
        try:
            claims, granted = self._authenticate(
                token,
                audiences=spec_audiences or None,
                now=now,
                lookup_service_account=lookup_service_account,
                lookup_secret=lookup_secret,
            )
        except _TokenRejected as exc:
            status["authenticated"] = False
            status["error"] = str(exc)
        except Exception:  # an odd but validly signed payload: refuse it rather than answer 500
            status["authenticated"] = False
            status["error"] = "[invalid bearer token, service account token claims could not be validated]"
        else:
            user = user_for_claims(claims)
            status = {
                "authenticated": True,
                "user": {"username": user.username, "uid": user.uid, "groups": list(user.groups)},
                "audiences": list(granted),
            }
        out_spec: dict[str, Any] = {"token": token}
        if spec_audiences:
            out_spec["audiences"] = list(spec_audiences)
        return {
            "kind": "TokenReview",
            "apiVersion": AUTHENTICATION_API_VERSION,
            "metadata": {"creationTimestamp": None},
            "spec": out_spec,
            "status": status,
        }

    # --- discovery -----------------------------------------------------------------------------------

    def openid_configuration(self, jwks_uri: str) -> dict[str, Any]:
        """/.well-known/openid-configuration, as kube-apiserver serves it."""
        return {
            "issuer": self.issuer,
            "jwks_uri": jwks_uri,
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
        }

    def jwks(self) -> dict[str, Any]:
        """/openid/v1/jwks: the public signing key."""
        numbers = self._public_key.public_numbers()
        return {
            "keys": [
                {
                    "use": "sig",
                    "kty": "RSA",
                    "kid": self.key_id,
                    "alg": "RS256",
                    "n": _int_b64url(numbers.n),
                    "e": _int_b64url(numbers.e),
                }
            ]
        }

    def public_key_pem(self) -> bytes:
        return self._public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def _cannot_handle(kind: str, detail: str) -> StatusError:
    """kube's 400 for a body that does not decode into the expected type."""
    return bad_request(f'{kind} in version "v1" cannot be handled as a {kind}: {detail}')


def _go_quote_list(items: Iterable[str]) -> str:
    """Go's %q of a []string: ["a" "b"]."""
    return "[" + " ".join(json.dumps(i) for i in items) + "]"


def decode_unverified(token: str) -> dict[str, Any]:
    """The payload of a JWT without checking it (for tests and debugging; never trust the result)."""
    try:
        payload = json.loads(_b64url_decode(token.split(".")[1]))
    except (IndexError, ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise ValueError("not a JWT: expected three base64url parts separated by dots") from exc
    if not isinstance(payload, dict):
        raise ValueError("not a JWT: the payload is not a JSON object")
    return payload


__all__ = [
    "StatusError",
    "TokenAuthority",
    "TokenClaims",
    "decode_unverified",
    "rfc3339",
    "self_subject_review",
    "service_account_groups",
    "service_account_username",
    "user_for_claims",
]

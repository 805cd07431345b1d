"""kube-apiserver's JWT authenticator, configured as with `--authentication-config` (structured authentication).

A cluster that trusts another cluster's service-account tokens (OIDC federation) is configured with an
`AuthenticationConfiguration` whose `jwt` entries name an issuer URL, a discovery URL, a CA, the audiences it
accepts and how the user name is made from a claim. As kube-apiserver (v1.36, see the facts file, "A cluster that
trusts another cluster's service-account tokens"):
- the discovery document and the JWKS are fetched anonymously over HTTPS with the configured CA; the discovery
  document's `issuer` must equal `issuer.url`; until they are fetched, tokens of that issuer get 401;
- a token is accepted when its `iss` is the issuer, its RS256 signature verifies with a key of the JWKS, one of its
  `aud` is a configured audience, and it has not expired; nothing else is looked up, so a token of a deleted
  service account keeps working until it expires;
- the user is `<prefix><claim>` with no uid and no groups of its own (the server adds `system:authenticated`).
"""

from __future__ import annotations

import binascii
import json
import logging
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from kubemcsa_testing.rbac import UserInfo
from kubemcsa_testing.tokens import AUTHENTICATED_GROUP, _b64url_decode

log = logging.getLogger(__name__)

API_VERSIONS = ("apiserver.config.k8s.io/v1", "apiserver.config.k8s.io/v1beta1", "apiserver.config.k8s.io/v1alpha1")
KIND = "AuthenticationConfiguration"
_MAX_TOKEN_LENGTH = 64 * 1024
_MAX_DOCUMENT_BYTES = 1 << 20
_FETCH_TIMEOUT_SECONDS = 5.0


class ConfigurationError(ValueError):
    """An AuthenticationConfiguration kube-apiserver would refuse to start with; the message says which field."""


@dataclass(frozen=True)
class JWTIssuer:
    """One `jwt` entry of an AuthenticationConfiguration."""

    url: str
    audiences: tuple[str, ...]
    username_claim: str
    username_prefix: str
    discovery_url: str = ""
    certificate_authority: str = ""

    @property
    def discovery_document_url(self) -> str:
        return self.discovery_url or self.url.rstrip("/") + "/.well-known/openid-configuration"


def parse_authentication_configuration(config: Mapping[str, Any] | str) -> list[JWTIssuer]:
    """The JWT issuers of an AuthenticationConfiguration (a dict, or its YAML text); ConfigurationError if invalid."""
    if isinstance(config, str):
        try:
            config = yaml.safe_load(config)
        except yaml.YAMLError as exc:
            raise ConfigurationError(f"the authentication configuration is not valid YAML: {exc}") from None
    if not isinstance(config, Mapping):
        raise ConfigurationError("the authentication configuration must be a YAML mapping")
    if config.get("apiVersion") not in API_VERSIONS or config.get("kind") != KIND:
        raise ConfigurationError(f"the authentication configuration must be kind {KIND} of {API_VERSIONS[0]}")
    unknown = set(config) - {"apiVersion", "kind", "jwt", "anonymous"}
    if unknown:
        raise ConfigurationError(f"unsupported fields in the authentication configuration: {sorted(unknown)}")
    entries = config.get("jwt") or []
    if not isinstance(entries, list):
        raise ConfigurationError("jwt: must be a list")
    issuers = [_parse_jwt(entry, f"jwt[{i}]") for i, entry in enumerate(entries)]
    urls = [issuer.url for issuer in issuers]
    for i, url in enumerate(urls):
        if url in urls[:i]:
            raise ConfigurationError(f'jwt[{i}].issuer.url: Duplicate value: "{url}"')
    return issuers


def _parse_jwt(entry: Any, field: str) -> JWTIssuer:
    if not isinstance(entry, Mapping):
        raise ConfigurationError(f"{field}: must be a mapping")
    unsupported = set(entry) - {"issuer", "claimMappings"}
    if unsupported:  # claimValidationRules, userValidationRules...: refuse rather than silently ignore
        raise ConfigurationError(f"{field}: the in-memory server does not support {sorted(unsupported)}")
    issuer = entry.get("issuer")
    if not isinstance(issuer, Mapping):
        raise ConfigurationError(f"{field}.issuer: Required value")
    url = issuer.get("url")
    if not isinstance(url, str) or not url.startswith("https://"):
        raise ConfigurationError(f"{field}.issuer.url: Invalid value: URL scheme must be https")
    discovery_url = issuer.get("discoveryURL") or ""
    if not isinstance(discovery_url, str) or (discovery_url and not discovery_url.startswith("https://")):
        raise ConfigurationError(f"{field}.issuer.discoveryURL: Invalid value: URL scheme must be https")
    if discovery_url and discovery_url.rstrip("/") == url.rstrip("/"):
        raise ConfigurationError(f"{field}.issuer.discoveryURL: Invalid value: discoveryURL must be different from URL")
    audiences = issuer.get("audiences")
    if not isinstance(audiences, list) or not audiences or not all(isinstance(a, str) and a for a in audiences):
        raise ConfigurationError(f"{field}.issuer.audiences: Required value: at least one issuer.audiences is required")
    if len(audiences) > 1 and issuer.get("audienceMatchPolicy") != "MatchAny":
        raise ConfigurationError(
            f'{field}.issuer.audienceMatchPolicy: Invalid value: "": audienceMatchPolicy must be MatchAny '
            "for multiple audiences"
        )
    ca = issuer.get("certificateAuthority") or ""
    if not isinstance(ca, str) or (ca and "-----BEGIN CERTIFICATE-----" not in ca):
        raise ConfigurationError(f"{field}.issuer.certificateAuthority: Invalid value: must be PEM certificates")
    username = ((entry.get("claimMappings") or {}) if isinstance(entry.get("claimMappings"), Mapping) else {}).get(
        "username"
    )
    if not isinstance(username, Mapping) or not isinstance(username.get("claim"), str) or not username["claim"]:
        raise ConfigurationError(f"{field}.claimMappings.username: Required value: claim or expression is required")
    prefix = username.get("prefix")
    if not isinstance(prefix, str):
        raise ConfigurationError(
            f"{field}.claimMappings.username.prefix: Required value: prefix is required when claim is set"
        )
    return JWTIssuer(
        url=url,
        audiences=tuple(audiences),
        username_claim=username["claim"],
        username_prefix=prefix,
        discovery_url=discovery_url,
        certificate_authority=ca,
    )


class _Rejected(Exception):
    """Internal: why a token of this issuer does not authenticate (never contains the token)."""


class JWTAuthenticator:
    """Authenticates the JWTs of one configured issuer, fetching its discovery document and keys over HTTPS."""

    def __init__(self, issuer: JWTIssuer, *, leeway_seconds: float = 1.0, retry_seconds: float = 1.0) -> None:
        self.issuer = issuer
        self.leeway_seconds = leeway_seconds
        # After a failed fetch, wait this long before trying again (kube-apiserver retries in the background).
        self.retry_seconds = retry_seconds
        self._keys: dict[str, rsa.RSAPublicKey] = {}
        self._fetched_at = 0.0
        self._failed_at = 0.0
        self._lock = threading.Lock()
        self.last_error = ""

    def __repr__(self) -> str:
        return f"JWTAuthenticator(issuer={self.issuer.url!r}, audiences={list(self.issuer.audiences)!r})"

    # --- fetching -------------------------------------------------------------------------------------

    def _context(self) -> ssl.SSLContext:
        if self.issuer.certificate_authority:
            return ssl.create_default_context(cadata=self.issuer.certificate_authority)
        return ssl.create_default_context()

    def _get_json(self, url: str) -> Any:
        # Anonymous, as kube fetches; only https URLs get here (checked in the configuration and the document).
        # Both types: kube-apiserver serves its keys as application/jwk-set+json and answers 406 to application/json.
        accept = "application/json, application/jwk-set+json"
        request = urllib.request.Request(url, headers={"Accept": accept})  # noqa: S310
        with urllib.request.urlopen(request, timeout=_FETCH_TIMEOUT_SECONDS, context=self._context()) as response:  # noqa: S310
            return json.loads(response.read(_MAX_DOCUMENT_BYTES))

    def _fetch_keys(self) -> dict[str, rsa.RSAPublicKey]:
        discovery = self._get_json(self.issuer.discovery_document_url)
        if not isinstance(discovery, dict):
            raise _Rejected("the discovery document is not a JSON object")
        if discovery.get("issuer") != self.issuer.url:
            raise _Rejected(
                f'oidc: issuer did not match the issuer returned by provider, expected "{self.issuer.url}" '
                f'got "{discovery.get("issuer")}"'
            )
        jwks_uri = discovery.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith("https://"):
            raise _Rejected("the discovery document names no https jwks_uri")
        jwks = self._get_json(jwks_uri)
        keys: dict[str, rsa.RSAPublicKey] = {}
        for key in (jwks.get("keys") if isinstance(jwks, dict) else None) or []:
            if not isinstance(key, dict) or key.get("kty") != "RSA" or key.get("use", "sig") != "sig":
                continue
            try:
                n = int.from_bytes(_b64url_decode(str(key["n"])), "big")
                e = int.from_bytes(_b64url_decode(str(key["e"])), "big")
                keys[str(key.get("kid", ""))] = rsa.RSAPublicNumbers(e, n).public_key()
            except (KeyError, ValueError, binascii.Error):
                continue
        if not keys:
            raise _Rejected("the JWKS holds no usable RSA signing key")
        return keys

    def _key(self, kid: str) -> rsa.RSAPublicKey | None:
        """The signing key `kid`, fetching the keys when they are unknown (at most once per retry_seconds)."""
        with self._lock:
            key = self._keys.get(kid) or (self._keys.get("") if kid else None)
            if key is not None:
                return key
            now = time.monotonic()
            if now - max(self._fetched_at, self._failed_at) < self.retry_seconds:
                return None
            try:
                self._keys = self._fetch_keys()
                self._fetched_at, self.last_error = now, ""
            except (OSError, ValueError, _Rejected, urllib.error.URLError) as exc:
                self._failed_at = now
                self.last_error = f"fetching the keys of {self.issuer.url} failed: {_describe(exc)}"
                log.warning("JWT authenticator for %s: %s", self.issuer.url, self.last_error)
                return None
            return self._keys.get(kid) or (self._keys.get("") if kid else None)

    # --- verifying ------------------------------------------------------------------------------------

    def claims_issuer(self, payload: Mapping[str, Any]) -> bool:
        return payload.get("iss") == self.issuer.url

    def authenticate(self, token: str, header: Mapping[str, Any], payload: Mapping[str, Any], now: float) -> UserInfo:
        """The user behind a token whose unverified `iss` is this issuer; _Rejected otherwise."""
        if header.get("alg") != "RS256":
            raise _Rejected("unsupported signing algorithm")
        key = self._key(str(header.get("kid") or ""))
        if key is None:
            raise _Rejected("the issuer's keys are not available")
        signing_input, _, signature = token.rpartition(".")
        try:
            key.verify(_b64url_decode(signature), signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
        except (InvalidSignature, ValueError, binascii.Error) as exc:
            raise _Rejected("oidc: failed to verify signature") from exc
        aud = payload.get("aud")
        token_audiences = [aud] if isinstance(aud, str) else [a for a in aud or [] if isinstance(a, str)]
        if not any(a in self.issuer.audiences for a in token_audiences):
            raise _Rejected(f"oidc: expected audience in {list(self.issuer.audiences)!r}")
        exp = payload.get("exp")
        if not isinstance(exp, int | float) or isinstance(exp, bool) or now > exp + self.leeway_seconds:
            raise _Rejected("oidc: token is expired")
        nbf = payload.get("nbf")
        if isinstance(nbf, int | float) and now < nbf - self.leeway_seconds:
            raise _Rejected("oidc: current time is before the nbf (not before) time")
        claim = payload.get(self.issuer.username_claim)
        if not isinstance(claim, str) or not claim:
            raise _Rejected(f"oidc: parse username claims {self.issuer.username_claim!r}: claim not present")
        return UserInfo(self.issuer.username_prefix + claim, (AUTHENTICATED_GROUP,), "")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return str(exc) or type(exc).__name__


def _unverified_parts(token: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    if len(token) > _MAX_TOKEN_LENGTH or token.count(".") != 2:
        return None
    head, body, _ = token.split(".")
    try:
        header, payload = json.loads(_b64url_decode(head)), json.loads(_b64url_decode(body))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None
    if not isinstance(header, dict) or not isinstance(payload, dict):
        return None
    return header, payload


class JWTAuthenticators:
    """The `jwt` entries of the server's AuthenticationConfiguration; replaced whole when the file changes."""

    def __init__(self) -> None:
        self._authenticators: tuple[JWTAuthenticator, ...] = ()

    def __repr__(self) -> str:
        return f"JWTAuthenticators({list(self._authenticators)!r})"

    def configure(self, config: Mapping[str, Any] | str | None, *, retry_seconds: float = 1.0) -> None:
        """Use this AuthenticationConfiguration from now on (None: no JWT issuers); ConfigurationError if invalid."""
        issuers = parse_authentication_configuration(config) if config is not None else []
        self._authenticators = tuple(JWTAuthenticator(i, retry_seconds=retry_seconds) for i in issuers)

    @property
    def issuers(self) -> tuple[JWTIssuer, ...]:
        return tuple(a.issuer for a in self._authenticators)

    def authenticate(self, token: str, now: float | None = None) -> UserInfo | None:
        """The user behind `token` if a configured issuer vouches for it, else None (never raises)."""
        authenticators = self._authenticators
        if not authenticators:
            return None
        parts = _unverified_parts(token)
        if parts is None:
            return None
        header, payload = parts
        current = time.time() if now is None else now
        for authenticator in authenticators:
            if not authenticator.claims_issuer(payload):
                continue
            try:
                return authenticator.authenticate(token, header, payload, current)
            except _Rejected:
                return None
            except Exception:  # an odd but signed token must never crash the server
                return None
        return None


__all__ = [
    "ConfigurationError",
    "JWTAuthenticator",
    "JWTAuthenticators",
    "JWTIssuer",
    "parse_authentication_configuration",
]

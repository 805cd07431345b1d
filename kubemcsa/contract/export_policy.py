"""Who may import a service account: what its owner says on it in the source cluster (pure: data in, data out).

The owner of a service account exports it with the label `multicluster.admiralty.io/exported: "true"` and the
annotation `multicluster.admiralty.io/export-to: "cluster1/team-a, cluster1/ci-*, cluster3/*"`: patterns of
CONSUMER_CLUSTER/NAMESPACE, `*` matching any run of characters within its part. The source cluster's RBAC
enforces the cluster part (a Role with resourceNames, see kubemcsa/cli/allow.py); the consumer's controller enforces
the namespace part with `export_verdict`.

Annotations are written by hand, so parsing is lenient about separators, blanks, case and repeats, and safe about
the rest: an item that is not a valid pattern matches nothing (never everything), and matching is linear-time
whatever the pattern. Anyone who may annotate the account writes the input, so its cost is bounded: an annotation
longer than MAX_EXPORT_TO_LENGTH characters or of more than MAX_EXPORT_TO_ENTRIES items is not parsed further and
exports to nobody (the import's condition names the cap), and parsing is linear in the annotation's length.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from kubemcsa.contract import api

# Kubernetes names are lowercase letters, digits, '-' and '.'; '*' is the only wildcard.
_PART = re.compile(r"^[a-z0-9.*-]+$")
_SEPARATORS = re.compile(r"[,\s;]+")
_AROUND_SLASH = re.compile(r"\s*/\s*")
_MAX_PART = 253
# What the controller reads of an export-to annotation at most: far more than anyone writes by hand, far less than
# what would cost it (or its memory, through the parse cache) anything noticeable.
MAX_EXPORT_TO_ENTRIES = 1000
MAX_EXPORT_TO_LENGTH = 64 * 1024
# Values up to this length are parsed once and remembered; longer (rare) ones are parsed each time, still linearly,
# so that the cache holds at most _CACHED_VALUES * _CACHED_LENGTH characters.
_CACHED_VALUES = 4096
_CACHED_LENGTH = 4096
# Items quoted in messages are cut here: the annotation is someone else's text.
_MAX_QUOTED = 200


@dataclass(frozen=True, order=True)
class ExportPattern:
    """One CONSUMER_CLUSTER/NAMESPACE pattern of an export-to annotation."""

    cluster: str
    namespace: str

    def matches(self, cluster: str, namespace: str) -> bool:
        return glob_match(self.cluster, cluster) and glob_match(self.namespace, namespace)

    @property
    def cluster_is_literal(self) -> bool:
        """True if the cluster part names one cluster (RBAC can grant to it; it cannot grant to a pattern)."""
        return "*" not in self.cluster

    def __str__(self) -> str:
        return f"{self.cluster}/{self.namespace}"


@dataclass(frozen=True)
class ExportTo:
    """A parsed export-to annotation: the valid patterns in order, and the items that are not patterns."""

    patterns: tuple[ExportPattern, ...] = ()
    rejected: tuple[str, ...] = ()
    too_large: str = ""  # why the annotation was not read (over a cap): then it exports to nobody

    def allows(self, cluster: str, namespace: str) -> bool:
        return any(p.matches(cluster, namespace) for p in self.patterns)

    def allows_any_cluster(self, namespace: str) -> bool:
        """True if a pattern whose cluster part is `*` admits `namespace`: whatever this cluster is called."""
        return any(p.cluster == "*" and glob_match(p.namespace, namespace) for p in self.patterns)

    def may_allow(self, namespace: str) -> bool:
        """True if some pattern admits `namespace` for some cluster name (which one decides)."""
        return any(glob_match(p.namespace, namespace) for p in self.patterns)

    def __str__(self) -> str:
        return format_export_to(self.patterns)


@dataclass(frozen=True)
class Verdict:
    """Whether an import may get a token, and if not, the condition reason and a message saying what to do."""

    allowed: bool
    reason: str = ""
    message: str = ""


def glob_match(pattern: str, text: str) -> bool:
    """True if `text` matches `pattern`, where `*` matches any run of characters (none included).

    Greedy matching with one backtrack point: O(len(pattern) * len(text)) at worst, unlike a regex of many `.*`.
    """
    p = t = 0
    star = -1
    star_t = 0
    while t < len(text):
        if p < len(pattern) and pattern[p] != "*" and pattern[p] == text[t]:
            p += 1
            t += 1
        elif p < len(pattern) and pattern[p] == "*":
            star, star_t = p, t
            p += 1
        elif star >= 0:
            star_t += 1
            p, t = star + 1, star_t
        else:
            return False
    while p < len(pattern) and pattern[p] == "*":
        p += 1
    return p == len(pattern)


def _clean_part(part: str) -> str:
    return re.sub(r"\*+", "*", part.strip())


def parse_pattern(text: str) -> ExportPattern:
    """One CONSUMER_CLUSTER/NAMESPACE pattern; ValueError with a one-sentence fix if it is not one."""
    item = text.strip().lower()
    if item.count("/") != 1:
        raise ValueError(
            f"{_quote(text)} is not CLUSTER/NAMESPACE; write e.g. cluster1/team-a, or cluster1/* for every namespace."
        )
    cluster, namespace = (_clean_part(part) for part in item.split("/"))
    for part, what in ((cluster, "cluster"), (namespace, "namespace")):
        if not part or len(part) > _MAX_PART or not _PART.match(part):
            raise ValueError(
                f"the {what} part of {_quote(text)} is not a name or a pattern; use lowercase letters, digits, "
                "'-', '.' and '*'."
            )
    return ExportPattern(cluster, namespace)


def _parse_text(value: str) -> ExportTo:
    """Linear in len(value): one split, each item parsed once, repeats dropped through a dict (not a list scan)."""
    if len(value) > MAX_EXPORT_TO_LENGTH:
        return ExportTo(
            too_large=f"is {len(value)} characters long, more than the {MAX_EXPORT_TO_LENGTH} the controller reads"
        )
    items = _SEPARATORS.split(_AROUND_SLASH.sub("/", value), maxsplit=MAX_EXPORT_TO_ENTRIES + 1)
    items = [item for item in items if item]
    if len(items) > MAX_EXPORT_TO_ENTRIES:
        return ExportTo(too_large=f"has more than the {MAX_EXPORT_TO_ENTRIES} entries the controller reads")
    patterns: dict[ExportPattern, None] = {}
    rejected: list[str] = []
    for item in items:
        try:
            patterns.setdefault(parse_pattern(item))
        except ValueError:
            rejected.append(item[:_MAX_QUOTED])
    return ExportTo(tuple(patterns), tuple(rejected))


_parse_short_text = lru_cache(maxsize=_CACHED_VALUES)(_parse_text)


def parse_export_to(value: Any) -> ExportTo:
    """The patterns of an export-to annotation value; items separated by commas, semicolons or blanks.

    Anything that is not a string, every item that is not a pattern, and a value over a cap (see `too_large`)
    export to nobody.
    """
    if not isinstance(value, str):
        return ExportTo()
    return _parse_short_text(value) if len(value) <= _CACHED_LENGTH else _parse_text(value)


def format_export_to(patterns: Iterable[ExportPattern]) -> str:
    """The annotation value for `patterns`, as `kubemcsa allow` writes it."""
    return ", ".join(str(p) for p in patterns)


def _meta(obj: Any) -> dict[str, Any]:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    return meta if isinstance(meta, dict) else {}


def _string_map(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def is_exported(service_account: Any) -> bool:
    """True if the service account carries the exported label (its export-to then says to whom)."""
    return _string_map(_meta(service_account).get("labels")).get(api.EXPORTED_LABEL) == api.EXPORTED_LABEL_VALUE


def export_to_of(service_account: Any) -> ExportTo:
    return parse_export_to(_string_map(_meta(service_account).get("annotations")).get(api.EXPORT_TO_ANNOTATION))


def allow_command(name: str, namespace: str, source: str, consumer: str, import_namespace: str) -> str:
    """The command the owner runs to let `consumer/import_namespace` import `namespace/name` from `source`."""
    return f"kubemcsa allow {name} -n {namespace} --context {source} --to {consumer}/{import_namespace}"


def export_verdict(
    service_account: dict[str, Any] | None,
    *,
    exists: bool | None,
    source: str,
    namespace: str,
    name: str,
    consumer: str | None,
    import_namespace: str,
) -> Verdict:
    """May import namespace `import_namespace` of cluster `consumer` get a token for `namespace/name` of `source`?

    `service_account` is the account as the export watch last saw it (None: not exported, or no such account);
    `exists` says whether the account exists at all when the watch does not have it (None: unknown).
    `consumer` None: the controller does not know this cluster's name in the source; a `*` cluster pattern
    matches it all the same, and where only a name could decide, the message says to start with --cluster-name.
    """
    what = f"Service account {namespace}/{name} in cluster {source}"
    shown_consumer = consumer if consumer is not None else "<this cluster>"
    to = f"{shown_consumer}/{import_namespace}"
    fix = f"ask its owner to run: {allow_command(name, namespace, source, shown_consumer, import_namespace)}"
    unnamed = (
        f" The controller does not know this cluster's name in cluster {source}; start it with --cluster-name "
        "(the name bootstrap gave this cluster there)."
        if consumer is None
        else ""
    )
    if service_account is None:
        if exists is False:
            return Verdict(
                False,
                api.REASON_REMOTE_SERVICE_ACCOUNT_NOT_FOUND,
                f"{what} does not exist; create it there (and export it), or fix spec.namespace and spec.name.",
            )
        return Verdict(False, api.REASON_NOT_EXPORTED, f"{what} is not exported; {fix}.{unnamed}")
    if not is_exported(service_account):
        return Verdict(False, api.REASON_NOT_EXPORTED, f"{what} is not exported; {fix}.{unnamed}")
    export_to = export_to_of(service_account)
    if export_to.too_large:
        return Verdict(
            False,
            api.REASON_NOT_EXPORTED,
            f"{what} is exported to nobody: its {api.EXPORT_TO_ANNOTATION} annotation {export_to.too_large}; ask "
            f"its owner to list at most {MAX_EXPORT_TO_ENTRIES} CLUSTER/NAMESPACE patterns (wildcards such as "
            "cluster1/team-* cover many).",
        )
    if consumer is None:
        if export_to.allows_any_cluster(import_namespace):
            return Verdict(True)
        if export_to.may_allow(import_namespace):
            return Verdict(
                False,
                api.REASON_NOT_EXPORTED,
                f"{what} is exported to {_quote(str(export_to))}: whether that includes this cluster depends on "
                "its name, which the controller does not know; start the controller with --cluster-name (the name "
                f"bootstrap gave this cluster in cluster {source}).",
            )
    elif export_to.allows(consumer, import_namespace):
        return Verdict(True)
    listed = _quote(str(export_to)) if export_to.patterns else "nobody"
    message = f"{what} is exported to {listed}, not to {to}; {fix}.{unnamed}"
    if export_to.rejected:
        message += f" Its export-to has items that are not CLUSTER/NAMESPACE: {_quote(', '.join(export_to.rejected))}."
    return Verdict(False, api.REASON_NOT_EXPORTED, message)


def _quote(text: str) -> str:
    cut = text if len(text) <= _MAX_QUOTED else text[:_MAX_QUOTED] + "..."
    return repr(cut)

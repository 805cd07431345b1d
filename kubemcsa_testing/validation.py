"""Validation of objects written to the in-memory API server (pure functions).

Each check returns (field, message) causes, turned into a 422 Invalid Status by the caller; messages follow
kube-apiserver's wording. Custom resources are pruned and validated against their CRD's structural schema.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import re
from typing import Any

from kubemcsa_testing.resources import ResourceInfo

Cause = tuple[str, str]

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QUALIFIED_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_CONFIG_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_DNS_LABEL_MSG = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and "
    "end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is "
    "'[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)
_DNS_SUBDOMAIN_MSG = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must "
    "start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is "
    "'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
MAX_ANNOTATIONS_BYTES = 256 * 1024


def _q(value: Any) -> str:
    return json.dumps(value)


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def name_causes(name: str, rule: str, field: str = "metadata.name") -> list[Cause]:
    """Why `name` is not a valid object name under `rule` ("label", "subdomain" or "path")."""
    if rule == "path":
        if name in (".", ".."):
            return [(field, f"Invalid value: {_q(name)}: may not be '{name}'")]
        for bad in ("/", "%"):
            if bad in name:
                return [(field, f"Invalid value: {_q(name)}: may not contain '{bad}'")]
        return []
    if rule == "label":
        if len(name) > 63:
            return [(field, f"Invalid value: {_q(name)}: must be no more than 63 characters")]
        if not _DNS_LABEL.match(name):
            return [(field, f"Invalid value: {_q(name)}: {_DNS_LABEL_MSG}")]
        return []
    if len(name) > 253:
        return [(field, f"Invalid value: {_q(name)}: must be no more than 253 characters")]
    if not _DNS_SUBDOMAIN.match(name):
        return [(field, f"Invalid value: {_q(name)}: {_DNS_SUBDOMAIN_MSG}")]
    return []


def qualified_key_causes(key: str, field: str) -> list[Cause]:
    """Label and annotation keys: `[prefix/]name`, prefix a DNS subdomain, name up to 63 characters."""
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return [(field, f"Invalid value: {_q(key)}: prefix part {_DNS_SUBDOMAIN_MSG}")]
    if not name or len(name) > 63 or not _QUALIFIED_NAME.match(name):
        return [
            (
                field,
                f"Invalid value: {_q(key)}: name part must consist of alphanumeric characters, '-', '_' or '.', "
                "and must start and end with an alphanumeric character (max 63 characters)",
            )
        ]
    return []


def metadata_causes(obj: dict[str, Any], info: ResourceInfo) -> list[Cause]:
    """Causes common to every object: name, labels, annotations, finalizers, ownerReferences."""
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        return [("metadata", "Required value")]
    causes: list[Cause] = []
    name = meta.get("name")
    if not name:
        if not meta.get("generateName"):
            causes.append(("metadata.name", "Required value: name or generateName is required"))
    elif not isinstance(name, str):
        causes.append(("metadata.name", f"Invalid value: {_q(name)}: must be a string"))
    else:
        causes.extend(name_causes(name, info.name_rule))
    labels = meta.get("labels")
    if labels is not None:
        if not isinstance(labels, dict):
            causes.append(("metadata.labels", "Invalid value: must be a map of strings"))
        else:
            for key, value in labels.items():
                causes.extend(qualified_key_causes(key, "metadata.labels"))
                if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
                    causes.append(
                        (
                            "metadata.labels",
                            f"Invalid value: {_q(value)}: a valid label must be an empty string or consist of "
                            "alphanumeric characters, '-', '_' or '.', and must start and end with an "
                            "alphanumeric character (max 63 characters)",
                        )
                    )
    annotations = meta.get("annotations")
    if annotations is not None:
        if not isinstance(annotations, dict) or not all(isinstance(v, str) for v in annotations.values()):
            causes.append(("metadata.annotations", "Invalid value: must be a map of strings"))
        else:
            for key in annotations:
                causes.extend(qualified_key_causes(key.lower(), "metadata.annotations"))
            size = sum(len(k) + len(v) for k, v in annotations.items())
            if size > MAX_ANNOTATIONS_BYTES:
                causes.append(("metadata.annotations", f"Too long: must have at most {MAX_ANNOTATIONS_BYTES} bytes"))
    finalizers = meta.get("finalizers")
    if finalizers is not None and (
        not isinstance(finalizers, list) or not all(isinstance(f, str) and f for f in finalizers)
    ):
        causes.append(("metadata.finalizers", "Invalid value: must be a list of non-empty strings"))
    refs = meta.get("ownerReferences")
    if refs is not None:
        if not isinstance(refs, list):
            causes.append(("metadata.ownerReferences", "Invalid value: must be a list"))
        else:
            for i, ref in enumerate(refs):
                where = f"metadata.ownerReferences[{i}]"
                if not isinstance(ref, dict):
                    causes.append((where, "Invalid value: must be an object"))
                    continue
                for key in ("apiVersion", "kind", "name", "uid"):
                    if not ref.get(key) or not isinstance(ref.get(key), str):
                        causes.append((f"{where}.{key}", 'Invalid value: "": ' + f"{key} must not be empty"))
            controllers = [r for r in refs if isinstance(r, dict) and r.get("controller")]
            if len(controllers) > 1:
                causes.append(
                    ("metadata.ownerReferences", "Invalid value: Only one reference can have Controller set to true")
                )
    return causes


def _data_key_causes(data: Any, field: str) -> list[Cause]:
    causes: list[Cause] = []
    if data is None:
        return causes
    if not isinstance(data, dict):
        return [(field, "Invalid value: must be a map")]
    for key in data:
        if not _CONFIG_KEY.match(key) or len(key) > 253:
            causes.append(
                (
                    f"{field}[{key}]",
                    f"Invalid value: {_q(key)}: a valid config key must consist of alphanumeric characters, "
                    "'-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for "
                    "validation is '[-._a-zA-Z0-9]+')",
                )
            )
    return causes


def secret_causes(obj: dict[str, Any]) -> list[Cause]:
    """Secret keys, base64 values, and the service-account-token annotation."""
    data = obj.get("data")
    causes = _data_key_causes(data, "data")
    if isinstance(data, dict):
        for key, value in data.items():
            if not isinstance(value, str):
                causes.append((f"data[{key}]", "Invalid value: must be a base64-encoded string"))
                continue
            try:
                base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                causes.append((f"data[{key}]", "Invalid value: illegal base64 data"))
    string_data = obj.get("stringData")
    causes.extend(_data_key_causes(string_data, "stringData"))
    if isinstance(string_data, dict) and not all(isinstance(v, str) for v in string_data.values()):
        causes.append(("stringData", "Invalid value: values must be strings"))
    if obj.get("type") == "kubernetes.io/service-account-token":
        annotations = (obj.get("metadata") or {}).get("annotations") or {}
        if not annotations.get("kubernetes.io/service-account.name"):
            causes.append(("metadata.annotations[kubernetes.io/service-account.name]", "Required value"))
    return causes


def configmap_causes(obj: dict[str, Any]) -> list[Cause]:
    causes = _data_key_causes(obj.get("data"), "data") + _data_key_causes(obj.get("binaryData"), "binaryData")
    data = obj.get("data")
    if isinstance(data, dict) and not all(isinstance(v, str) for v in data.values()):
        causes.append(("data", "Invalid value: values must be strings"))
    return causes


def pod_causes(obj: dict[str, Any]) -> list[Cause]:
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return [("spec.containers", "Required value")]
    causes: list[Cause] = []
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers:
        causes.append(("spec.containers", "Required value"))
    for kind in ("containers", "initContainers", "volumes"):
        if spec.get(kind) is not None and not isinstance(spec[kind], list):
            causes.append((f"spec.{kind}", "Invalid value: must be a list"))
    for kind in ("containers", "initContainers"):
        seen: set[str] = set()
        for i, c in enumerate(_list(spec.get(kind))):
            where = f"spec.{kind}[{i}]"
            if not isinstance(c, dict):
                causes.append((where, "Invalid value: must be an object"))
                continue
            name = c.get("name")
            if not isinstance(name, str | None):
                causes.append((f"{where}.name", f"Invalid value: {_q(name)}: must be a string"))
            elif not name:
                causes.append((f"{where}.name", "Required value"))
            elif name in seen:
                causes.append((f"{where}.name", f"Duplicate value: {_q(name)}"))
            else:
                seen.add(name)
                causes.extend(name_causes(str(name), "label", f"{where}.name"))
            if not c.get("image") or not isinstance(c.get("image"), str):
                causes.append((f"{where}.image", "Required value"))
            for key in ("volumeMounts", "env", "ports", "args", "command", "envFrom"):
                if c.get(key) is not None and not isinstance(c[key], list):
                    causes.append((f"{where}.{key}", "Invalid value: must be a list"))
            for j, mount in enumerate(_list(c.get("volumeMounts"))):
                if not isinstance(mount, dict):
                    causes.append((f"{where}.volumeMounts[{j}]", "Invalid value: must be an object"))
    volumes = set()
    for i, v in enumerate(_list(spec.get("volumes"))):
        name = v.get("name") if isinstance(v, dict) else None
        if not isinstance(name, str) or not name:
            causes.append((f"spec.volumes[{i}].name", "Required value"))
        elif name in volumes:
            causes.append((f"spec.volumes[{i}].name", f"Duplicate value: {_q(name)}"))
        else:
            volumes.add(name)
    for kind in ("containers", "initContainers"):
        for i, c in enumerate(_list(spec.get(kind))):
            paths: set[str] = set()
            for j, m in enumerate(_list(_dict(c).get("volumeMounts"))):
                where = f"spec.{kind}[{i}].volumeMounts[{j}]"
                mount = _dict(m)
                mount_path = mount.get("mountPath")
                if not isinstance(mount.get("name"), str) or mount.get("name") not in volumes:
                    causes.append((f"{where}.name", f"Not found: {_q(mount.get('name'))}"))
                elif not isinstance(mount_path, str) or not mount_path:
                    causes.append((f"{where}.mountPath", "Required value"))
                elif mount_path in paths:
                    causes.append((f"{where}.mountPath", f"Invalid value: {_q(mount_path)}: must be unique"))
                else:
                    paths.add(mount_path)
    return causes


def crd_causes(obj: dict[str, Any]) -> list[Cause]:
    """The parts of CRD validation clients rely on: names, group, scope, versions, one storage version."""
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return [("spec", "Required value")]
    causes: list[Cause] = []
    group = spec.get("group")
    names = _dict(spec.get("names"))
    plural = names.get("plural")
    if not group or not isinstance(group, str) or "." not in group:
        causes.append(("spec.group", f"Invalid value: {_q(group)}: should be a domain with at least one dot"))
    if not plural or not isinstance(plural, str):
        causes.append(("spec.names.plural", "Required value"))
    elif name_causes(plural, "label"):
        causes += name_causes(plural, "label", "spec.names.plural")
    if not names.get("kind") or not isinstance(names.get("kind"), str):
        causes.append(("spec.names.kind", "Required value"))
    for key in ("singular", "listKind"):
        if names.get(key) is not None and not isinstance(names[key], str):
            causes.append((f"spec.names.{key}", "Invalid value: must be a string"))
    short_names = names.get("shortNames")
    if short_names is not None and not (isinstance(short_names, list) and all(isinstance(x, str) for x in short_names)):
        causes.append(("spec.names.shortNames", "Invalid value: must be a list of strings"))
    name = _dict(obj.get("metadata")).get("name")
    if plural and group and name != f"{plural}.{group}":
        causes.append(("metadata.name", f'Invalid value: {_q(name)}: must be spec.names.plural+"."+spec.group'))
    if spec.get("scope") not in ("Namespaced", "Cluster"):
        causes.append(
            ("spec.scope", f'Unsupported value: {_q(spec.get("scope"))}: supported values: "Cluster", "Namespaced"')
        )
    versions = spec.get("versions")
    if not isinstance(versions, list) or not versions:
        causes.append(("spec.versions", "Invalid value: must have exactly one version marked as storage version"))
        return causes
    storage = [v for v in versions if isinstance(v, dict) and v.get("storage")]
    if len(storage) != 1:
        causes.append(("spec.versions", "Invalid value: must have exactly one version marked as storage version"))
    for i, v in enumerate(versions):
        if not isinstance(v, dict) or not v.get("name"):
            causes.append((f"spec.versions[{i}].name", "Required value"))
            continue
        if not isinstance(v["name"], str) or name_causes(v["name"], "label"):
            causes.append((f"spec.versions[{i}].name", f"Invalid value: {_q(v['name'])}: must be a DNS label"))
        if v.get("subresources") is not None and not isinstance(v["subresources"], dict):
            causes.append((f"spec.versions[{i}].subresources", "Invalid value: must be an object"))
        schema = _dict(v.get("schema")).get("openAPIV3Schema")
        if schema is None:
            causes.append((f"spec.versions[{i}].schema.openAPIV3Schema", "Required value: schemas are required"))
        elif not isinstance(schema, dict) or schema.get("type") != "object":
            causes.append(
                (f"spec.versions[{i}].schema.openAPIV3Schema.type", "Unsupported value: must be object at the root")
            )
        else:
            causes += _rule_compile_causes(schema, f"spec.versions[{i}].schema.openAPIV3Schema")
    return causes


def _rule_compile_causes(schema: dict[str, Any], field: str) -> list[Cause]:
    """kube compiles a CRD's CEL rules when the CRD is written; here, a rule outside the evaluator's subset is
    refused at that point too, so that no rule is ever silently skipped."""
    from kubemcsa_testing import cel

    causes: list[Cause] = []
    for j, rule in enumerate(_list(schema.get("x-kubernetes-validations"))):
        text = _dict(rule).get("rule")
        where = f"{field}.x-kubernetes-validations[{j}].rule"
        if not isinstance(text, str) or not text:
            causes.append((where, "Required value"))
            continue
        try:
            cel.compile_expression(text, variables={"self", "oldSelf"})
        except cel.CelError as exc:
            causes.append((where, f"Invalid value: {_q(text)}: compilation failed: {exc}"))
    for key, sub in _dict(schema.get("properties")).items():
        if isinstance(sub, dict):
            causes += _rule_compile_causes(sub, f"{field}.properties[{key}]")
    if isinstance(schema.get("items"), dict):
        causes += _rule_compile_causes(schema["items"], f"{field}.items")
    return causes


def _strings_causes(value: Any, field: str, required: bool = False) -> list[Cause]:
    if value is None:
        return [(field, "Required value")] if required else []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return [(field, f"Invalid value: {_q(value)}: must be a list of strings")]
    if required and not value:
        return [(field, "Required value")]
    return []


def _label_selector_causes(value: Any, field: str) -> list[Cause]:
    if value is None:
        return []
    if not isinstance(value, dict):
        return [(field, "Invalid value: must be a label selector object")]
    causes: list[Cause] = []
    labels = value.get("matchLabels")
    if labels is not None and (not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values())):
        causes.append((f"{field}.matchLabels", "Invalid value: must be a map of strings"))
    expressions = value.get("matchExpressions")
    if expressions is not None and not isinstance(expressions, list):
        causes.append((f"{field}.matchExpressions", "Invalid value: must be a list"))
    for i, expr in enumerate(_list(expressions)):
        where = f"{field}.matchExpressions[{i}]"
        if not isinstance(expr, dict) or not isinstance(expr.get("key"), str):
            causes.append((f"{where}.key", "Required value"))
            continue
        op = expr.get("operator")
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            causes.append((f"{where}.operator", f'Unsupported value: {_q(op)}: supported values: "DoesNotExist", '
                           '"Exists", "In", "NotIn"'))  # fmt: skip
        causes += _strings_causes(expr.get("values"), f"{where}.values", required=op in ("In", "NotIn"))
    return causes


def webhook_configuration_causes(obj: dict[str, Any]) -> list[Cause]:
    """admissionregistration/v1 webhook configurations: the fields the API server relies on to call webhooks."""
    webhooks = obj.get("webhooks")
    if webhooks is None:
        return []
    if not isinstance(webhooks, list):
        return [("webhooks", "Invalid value: must be a list")]
    causes: list[Cause] = []
    names: set[str] = set()
    for i, hook in enumerate(webhooks):
        where = f"webhooks[{i}]"
        if not isinstance(hook, dict):
            causes.append((where, "Invalid value: must be an object"))
            continue
        name = hook.get("name")
        if not isinstance(name, str) or name.count(".") < 2 or name_causes(name, "subdomain"):
            message = "should be a domain with at least three segments separated by dots"
            causes.append((f"{where}.name", f"Invalid value: {_q(name)}: {message}"))  # fmt: skip
        elif name in names:
            causes.append((f"{where}.name", f"Duplicate value: {_q(name)}"))
        else:
            names.add(name)
        causes += _strings_causes(hook.get("admissionReviewVersions"), f"{where}.admissionReviewVersions", True)
        if hook.get("sideEffects") not in ("None", "NoneOnDryRun"):
            causes.append((f"{where}.sideEffects", f'Unsupported value: {_q(hook.get("sideEffects"))}: supported '
                           'values: "None", "NoneOnDryRun"'))  # fmt: skip
        if hook.get("failurePolicy") not in (None, "Ignore", "Fail"):
            causes.append((f"{where}.failurePolicy", f'Unsupported value: {_q(hook.get("failurePolicy"))}: supported '
                           'values: "Fail", "Ignore"'))  # fmt: skip
        if hook.get("matchPolicy") not in (None, "Exact", "Equivalent"):
            causes.append((f"{where}.matchPolicy", f"Unsupported value: {_q(hook.get('matchPolicy'))}"))
        if hook.get("reinvocationPolicy") not in (None, "Never", "IfNeeded"):
            causes.append((f"{where}.reinvocationPolicy", f"Unsupported value: {_q(hook.get('reinvocationPolicy'))}"))
        timeout = hook.get("timeoutSeconds")
        if timeout is not None and (
            not isinstance(timeout, int) or isinstance(timeout, bool) or not 1 <= timeout <= 30
        ):
            causes.append((f"{where}.timeoutSeconds", f"Invalid value: {_q(timeout)}: the timeout value must be "
                           "between 1 and 30 seconds"))  # fmt: skip
        config = hook.get("clientConfig")
        if not isinstance(config, dict) or (config.get("url") is None) == (config.get("service") is None):
            causes.append((f"{where}.clientConfig", "Required value: exactly one of url or service is required"))
        else:
            url, service = config.get("url"), config.get("service")
            if url is not None and (not isinstance(url, str) or not url.startswith("https://")):
                causes.append((f"{where}.clientConfig.url", f"Invalid value: {_q(url)}: 'https' is the only allowed "
                               "URL scheme"))  # fmt: skip
            if service is not None and (
                not isinstance(service, dict) or not isinstance(service.get("name"), str)
                or not isinstance(service.get("namespace"), str)
                or not isinstance(service.get("port", 443), int) or not isinstance(service.get("path", ""), str)
            ):  # fmt: skip
                causes.append((f"{where}.clientConfig.service", "Invalid value: needs a namespace, a name and a port"))
            bundle = config.get("caBundle")
            if bundle is not None and not isinstance(bundle, str):
                causes.append((f"{where}.clientConfig.caBundle", "Invalid value: must be base64-encoded PEM"))
        rules = hook.get("rules")
        if rules is not None and not isinstance(rules, list):
            causes.append((f"{where}.rules", "Invalid value: must be a list"))
        for j, rule in enumerate(_list(rules)):
            rule_where = f"{where}.rules[{j}]"
            if not isinstance(rule, dict):
                causes.append((rule_where, "Invalid value: must be an object"))
                continue
            for key in ("operations", "apiGroups", "apiVersions", "resources"):
                causes += _strings_causes(rule.get(key), f"{rule_where}.{key}", required=True)
            if rule.get("scope") not in (None, "*", "Cluster", "Namespaced"):
                causes.append((f"{rule_where}.scope", f"Unsupported value: {_q(rule.get('scope'))}"))
        causes += _label_selector_causes(hook.get("namespaceSelector"), f"{where}.namespaceSelector")
        causes += _label_selector_causes(hook.get("objectSelector"), f"{where}.objectSelector")
    return causes


def rbac_causes(obj: dict[str, Any], kind: str) -> list[Cause]:
    """Roles' rules and bindings' roleRef and subjects, as kube validates them."""
    causes: list[Cause] = []
    if kind in ("Role", "ClusterRole"):
        rules = obj.get("rules")
        if rules is not None and not isinstance(rules, list):
            return [("rules", "Invalid value: must be a list")]
        for i, rule in enumerate(_list(rules)):
            where = f"rules[{i}]"
            if not isinstance(rule, dict):
                causes.append((where, "Invalid value: must be an object"))
                continue
            causes += _strings_causes(rule.get("verbs"), f"{where}.verbs", required=True)
            for key in ("apiGroups", "resources", "resourceNames", "nonResourceURLs"):
                causes += _strings_causes(rule.get(key), f"{where}.{key}")
        if kind == "ClusterRole" and obj.get("aggregationRule") is not None:
            rule = obj["aggregationRule"]
            selectors = rule.get("clusterRoleSelectors") if isinstance(rule, dict) else None
            if not isinstance(selectors, list):
                causes.append(("aggregationRule.clusterRoleSelectors", "Required value"))
            for i, selector in enumerate(_list(selectors)):
                causes += _label_selector_causes(selector, f"aggregationRule.clusterRoleSelectors[{i}]")
        return causes
    ref = obj.get("roleRef")
    if not isinstance(ref, dict):
        causes.append(("roleRef", "Required value"))
    else:
        if ref.get("apiGroup") != "rbac.authorization.k8s.io":
            causes.append(("roleRef.apiGroup", f'Unsupported value: {_q(ref.get("apiGroup"))}: supported values: '
                           '"rbac.authorization.k8s.io"'))  # fmt: skip
        allowed = ("Role", "ClusterRole") if kind == "RoleBinding" else ("ClusterRole",)
        if ref.get("kind") not in allowed:
            causes.append(("roleRef.kind", f"Unsupported value: {_q(ref.get('kind'))}: supported values: "
                           + ", ".join(_q(a) for a in allowed)))  # fmt: skip
        if not isinstance(ref.get("name"), str) or not ref.get("name"):
            causes.append(("roleRef.name", "Required value"))
    subjects = obj.get("subjects")
    if subjects is not None and not isinstance(subjects, list):
        causes.append(("subjects", "Invalid value: must be a list"))
    for i, subject in enumerate(_list(subjects)):
        where = f"subjects[{i}]"
        if not isinstance(subject, dict):
            causes.append((where, "Invalid value: must be an object"))
            continue
        if subject.get("kind") not in ("ServiceAccount", "User", "Group"):
            causes.append((f"{where}.kind", f'Unsupported value: {_q(subject.get("kind"))}: supported values: '
                           '"ServiceAccount", "User", "Group"'))  # fmt: skip
        if not isinstance(subject.get("name"), str) or not subject.get("name"):
            causes.append((f"{where}.name", "Required value"))
        for key in ("namespace", "apiGroup"):
            if subject.get(key) is not None and not isinstance(subject[key], str):
                causes.append((f"{where}.{key}", "Invalid value: must be a string"))
        if subject.get("kind") == "ServiceAccount" and kind == "ClusterRoleBinding" and not subject.get("namespace"):
            causes.append((f"{where}.namespace", "Required value"))
    return causes


def object_causes(obj: dict[str, Any], info: ResourceInfo) -> list[Cause]:
    causes = metadata_causes(obj, info)
    if info.group == "" and info.plural == "secrets":
        causes += secret_causes(obj)
    elif info.group == "" and info.plural == "configmaps":
        causes += configmap_causes(obj)
    elif info.group == "" and info.plural == "pods":
        causes += pod_causes(obj)
    elif info.plural == "customresourcedefinitions" and info.group == "apiextensions.k8s.io":
        causes += crd_causes(obj)
    elif info.group == "admissionregistration.k8s.io":
        causes += webhook_configuration_causes(obj)
    elif info.group == "rbac.authorization.k8s.io":
        causes += rbac_causes(obj, info.kind)
    return causes


# Custom resources: structural schema pruning and validation ------------------------------------------

_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
}


def prune(value: Any, schema: dict[str, Any] | None, root: bool = True) -> Any:
    """Drop fields the schema does not know (kube prunes them silently) unless it preserves unknown fields."""
    if schema is None:
        return value
    if isinstance(value, dict):
        if schema.get("x-kubernetes-preserve-unknown-fields") and not schema.get("properties"):
            return value
        props = schema.get("properties") or {}
        additional = schema.get("additionalProperties")
        out = {}
        for key, item in value.items():
            if root and key in ("apiVersion", "kind", "metadata"):
                out[key] = item
            elif key in props:
                out[key] = prune(item, props[key], root=False)
            elif isinstance(additional, dict):
                out[key] = prune(item, additional, root=False)
            elif additional is True or schema.get("x-kubernetes-preserve-unknown-fields"):
                out[key] = item
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [prune(item, schema["items"], root=False) for item in value]
    return value


def unknown_fields(value: Any, schema: dict[str, Any] | None, path: str = "") -> list[str]:
    """The paths of fields `prune` would drop (for fieldValidation=Strict), e.g. ["spec.colour"]."""
    if schema is None:
        return []
    out: list[str] = []
    if isinstance(value, dict):
        if schema.get("x-kubernetes-preserve-unknown-fields") and not schema.get("properties"):
            return []
        props = schema.get("properties") or {}
        additional = schema.get("additionalProperties")
        for key, item in value.items():
            sub = f"{path}.{key}" if path else key
            if not path and key in ("apiVersion", "kind", "metadata"):
                continue
            if key in props:
                out += unknown_fields(item, props[key], sub)
            elif isinstance(additional, dict):
                out += unknown_fields(item, additional, sub)
            elif additional is not True and not schema.get("x-kubernetes-preserve-unknown-fields"):
                out.append(sub)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            out += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return out


def schema_causes(value: Any, schema: dict[str, Any], path: str = "") -> list[Cause]:
    """Causes for `value` against an OpenAPI v3 structural schema (type, required, enum, bounds, ...)."""
    field = path or "<root>"
    if value is None:
        if schema.get("nullable"):
            return []
        if schema.get("type"):
            return [(field, f'Invalid value: "null": {field} in body must be of type {schema["type"]}: "null"')]
        return []
    expected = schema.get("type")
    if expected in _TYPES and not _TYPES[expected](value):
        actual = _type_name(value)
        return [(field, f"Invalid value: {_q(actual)}: {field} in body must be of type {expected}: {_q(actual)}")]
    if expected == "string" and schema.get("x-kubernetes-int-or-string"):
        pass
    causes: list[Cause] = []
    if "enum" in schema and value not in schema["enum"]:
        allowed = ", ".join(_q(v) for v in schema["enum"])
        causes.append((field, f"Unsupported value: {_q(value)}: supported values: {allowed}"))
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema:
            if schema.get("exclusiveMinimum") and value <= schema["minimum"]:
                causes.append(
                    (field, f"Invalid value: {_q(value)}: {field} in body should be greater than {schema['minimum']}")
                )
            elif value < schema["minimum"]:
                causes.append(
                    (
                        field,
                        f"Invalid value: {_q(value)}: {field} in body should be greater than or equal to "
                        f"{schema['minimum']}",
                    )
                )
        if "maximum" in schema:
            if schema.get("exclusiveMaximum") and value >= schema["maximum"]:
                causes.append(
                    (field, f"Invalid value: {_q(value)}: {field} in body should be less than {schema['maximum']}")
                )
            elif value > schema["maximum"]:
                causes.append(
                    (
                        field,
                        f"Invalid value: {_q(value)}: {field} in body should be less than or equal to "
                        f"{schema['maximum']}",
                    )
                )
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            causes.append(
                (
                    field,
                    f"Invalid value: {_q(value)}: {field} in body should be at least {schema['minLength']} chars long",
                )
            )
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            causes.append((field, f"Too long: may not be longer than {schema['maxLength']}"))
        if "pattern" in schema and not re.search(schema["pattern"], value):
            causes.append((field, f"Invalid value: {_q(value)}: {field} in body should match '{schema['pattern']}'"))
    if isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            causes.append(
                (field, f"Invalid value: {len(value)}: {field} in body should have at least {schema['minItems']} items")
            )
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            causes.append((field, f"Too many: {len(value)}: must have at most {schema['maxItems']} items"))
        items = schema.get("items")
        if isinstance(items, dict):
            for i, item in enumerate(value):
                causes.extend(schema_causes(item, items, f"{path}[{i}]"))
        if schema.get("x-kubernetes-list-type") == "set":
            # kube-apiserver rejects a repeated item of a set list at the index where it repeats.
            seen: list[Any] = []
            for i, item in enumerate(value):
                if item in seen:
                    causes.append((f"{path}[{i}]", f"Duplicate value: {_q(item)}"))
                else:
                    seen.append(item)
    if isinstance(value, dict):
        for key in schema.get("required") or []:
            if key not in value:
                causes.append((f"{path}.{key}" if path else key, "Required value"))
        props = schema.get("properties") or {}
        additional = schema.get("additionalProperties")
        for key, item in value.items():
            if not path and key in ("apiVersion", "kind", "metadata"):
                continue
            sub = f"{path}.{key}" if path else key
            if key in props:
                causes.extend(schema_causes(item, props[key], sub))
            elif isinstance(additional, dict):
                causes.extend(schema_causes(item, additional, sub))
    return causes


_MISSING = object()


@functools.lru_cache(maxsize=512)
def _compiled_rule(text: str) -> tuple[Any, bool]:
    """(program, whether it reads oldSelf) for a CRD validation rule; compiled once per rule text, not per write
    (programs are immutable). A rule outside the evaluator's subset raises CelError each time (not cached)."""
    from kubemcsa_testing import cel

    try:
        return cel.compile_expression(text, variables={"self"}), False
    except cel.CelError:
        return cel.compile_expression(text, variables={"self", "oldSelf"}), True


def rule_causes(value: Any, schema: dict[str, Any], path: str = "", *, old: Any = _MISSING) -> list[Cause]:
    """Causes for the CRD validation rules (`x-kubernetes-validations`, CEL with `self`) that `value` breaks.

    As kube-apiserver: a rule is checked where its field is present, a failure is `Invalid value: "<type>":
    <message>` at that field (the rule itself when there is no message), and an evaluation error is an
    invalid value too. A transition rule (one that reads `oldSelf`) is checked only on an update, where the
    field had a value before (`old`, the previous object; absent on create). A rule outside the evaluator's
    subset raises CelError: it must fail loudly, not pass.
    """
    from kubemcsa_testing import cel

    if value is None or not isinstance(schema, dict):
        return []
    field = path or "<root>"
    causes: list[Cause] = []
    for rule in schema.get("x-kubernetes-validations") or []:
        if not isinstance(rule, dict) or not isinstance(rule.get("rule"), str):
            continue
        program, transition = _compiled_rule(rule["rule"])
        activation: dict[str, Any] = {"self": value}
        if transition:
            if old is _MISSING or old is None:
                continue  # a transition rule: nothing to compare with
            activation["oldSelf"] = old
        try:
            passed = program.evaluate(activation) is True
        except cel.CelError:
            passed = False
        if not passed:
            message = rule.get("message") or f"failed rule: {rule['rule']}"
            causes.append((str(rule.get("fieldPath") or field), f"Invalid value: {_q(_type_name(value))}: {message}"))
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        previous = old if isinstance(old, dict) else {}
        for key, item in value.items():
            if not path and key in ("apiVersion", "kind", "metadata"):
                continue
            if key in props:
                sub_old = previous.get(key, _MISSING) if old is not _MISSING else _MISSING
                causes.extend(rule_causes(item, props[key], f"{path}.{key}" if path else key, old=sub_old))
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):  # list items have no old value here (kube pairs them only in map lists)
            causes.extend(rule_causes(item, schema["items"], f"{path}[{i}]"))
    return causes


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null"

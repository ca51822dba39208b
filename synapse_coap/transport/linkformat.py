"""The CoAP server's ``/.well-known/core`` (RFC 6690): the link-format document and its query
filters."""

from __future__ import annotations

#: The observable resource listed in ``/.well-known/core`` when push is enabled.
OBSERVABLE_SYNC = "/_matrix/client/v3/sync"


def _links(
    resources: tuple[str, ...], observable: tuple[str, ...] = ()
) -> list[tuple[str, dict[str, str]]]:
    """(href, attributes) of what ``/.well-known/core`` lists (``obs``: RFC 7641 §6)."""
    out = [("/.well-known/core", {"ct": "40"})]
    for path in resources:
        out.append((path, {"rt": path.strip("/").replace("/", ".").replace("_", "")}))
    for path in observable:
        name = path.strip("/").replace("/", ".").replace("_", "")
        out.append((path, {"rt": name, "obs": ""}))
    return out


def _link_value(attrs: dict[str, str], name: str) -> str:
    if name == "rt":
        return f'{name}="{attrs[name]}"'
    return f"{name}={attrs[name]}" if attrs[name] else name


def _filter_matches(href: str, attrs: dict[str, str], query: str) -> bool:
    """RFC 6690 4.1: ``name=value``, a trailing ``*`` matching any suffix; for a
    space-separated attribute (rt, if) any one of its values matches."""
    name, _, want = query.partition("=")
    prefix = want.endswith("*")
    want = want[:-1] if prefix else want
    if name == "href":
        values = [href]
    elif name in attrs:
        values = attrs[name].split(" ") if name in ("rt", "if") else [attrs[name]]
    else:
        return False
    return any(v.startswith(want) if prefix else v == want for v in values)


def _link_format(
    resources: tuple[str, ...],
    queries: list[str] | None = None,
    observable: tuple[str, ...] = (),
) -> bytes:
    """The RFC 6690 document, filtered by its ``Uri-Query`` values (RFC 6690 4.1)."""
    parts = []
    for href, link_attrs in _links(resources, observable):
        if queries and not all(_filter_matches(href, link_attrs, q) for q in queries):
            continue
        parts.append(";".join([f"<{href}>", *(_link_value(link_attrs, k) for k in link_attrs)]))
    return ",".join(parts).encode()

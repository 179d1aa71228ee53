"""Credentials out of everything written or logged: URIs with their user info and secret-looking query
values replaced by ***."""
from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

SECRET_KEYS = re.compile(r"pass|secret|token|key|sig|cred|auth", re.IGNORECASE)


def redact(text: str) -> str:
    """A URI with its user info and secret-looking query values (password, token, signature, key, ...)
    replaced by ***: `s3://KEY:SECRET@host/b` -> `s3://***@host/b`. Anything else is returned as it is."""
    if "://" not in text:
        return text
    try:
        parts = urlsplit(text)
    except ValueError:
        return "***"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        query = urlencode([(k, "***" if SECRET_KEYS.search(k) else v) for k, v in parse_qsl(query, keep_blank_values=True)],
                          safe="*")
    if (netloc, query) == (parts.netloc, parts.query):
        return text  # nothing secret (urlunsplit would also rewrite sqlite:////abs as sqlite://abs)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def scrub(text: str, *uris: str) -> str:
    """Free text (an error message) with credentials removed: every `scheme://user:secret@` user info, and
    the user info of each of `uris` wherever it appears (some libraries name `KEY:SECRET@bucket` bare)."""
    for uri in uris:
        netloc = urlsplit(str(uri)).netloc if "://" in str(uri) else ""
        if "@" in netloc:
            text = text.replace(netloc.rsplit("@", 1)[0] + "@", "***@")
    return USERINFO.sub("***@", text)

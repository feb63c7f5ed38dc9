"""Secrets never shown or saved: the password of a storage URL, hidden in every message that passes through
model-opt (its own, a database driver's, Optuna's) and in every report.

A URL's password is what lies between the first ':' after the user and the last '@' of the URL, so a password
holding '@' is hidden whole; secret query parameters (``password=``, ``token=``, ...) are hidden too. A password
given in a URL is also remembered for the rest of the process (:func:`remember`), so that a driver's message that
quotes it without the URL around it is redacted as well. Characters a URL must write percent-encoded are refused in
a password (:func:`check_url`), since drivers split such URLs in other places than we do.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, quote, unquote, urlencode

from .errors import UsageError

#: Query parameters of a URL whose values are secrets.
SECRET_KEYS = ("password", "passwd", "pwd", "pass", "secret", "token", "sslpassword", "sslkey")
#: Characters that a password in a URL must write percent-encoded (a raw one changes where the URL splits).
RAW_IN_PASSWORD = {" ": "%20", "@": "%40", "?": "%3F", "/": "%2F", "#": "%23"}
#: Remembered secrets shorter than this are hidden only inside URLs (hiding every "ab" in a message would ruin it).
MIN_FREE_TEXT = 3
_REMEMBERED: set[str] = set()
_URL = re.compile(r"""[A-Za-z][A-Za-z0-9+.\-]*://[^\s"'<>()\[\]{},]+""")  # (not the quotes around it)


def split_password(url: str) -> tuple[str, str | None, str]:
    """``(scheme://user, password or None, the rest from the last '@')``; no user info: ``(url, None, "")``."""
    scheme, sep, rest = url.partition("://")
    at = rest.rfind("@")
    if not sep or at < 0:
        return url, None, ""
    user, colon, password = rest[:at].partition(":")
    return f"{scheme}://{user}", (password if colon else None), rest[at:]


def remember(url: str) -> None:
    """Remember the password of ``url`` (raw and decoded) and its secret query values, to hide them anywhere."""
    _, password, rest = split_password(url)
    found = [password] if password else []
    query = (rest or url).partition("?")[2]
    found += [v for k, v in parse_qsl(query, keep_blank_values=True) if k.lower() in SECRET_KEYS and v]
    for secret in found:
        _REMEMBERED.update({secret, unquote(secret), quote(unquote(secret), safe="")})


def check_url(url: str, flag: str = "--storage") -> None:
    """Refuse a URL whose password holds a character URLs must percent-encode (drivers would split it
    elsewhere: part of the password shown as a host name, or the rest of the URL read as the password)."""
    remember(url)
    _, password, _ = split_password(url)
    bad = next((c for c in RAW_IN_PASSWORD if password and c in password), None)
    if bad is None and password and re.search(r"%(?![0-9A-Fa-f]{2})", password):
        bad = "%"
    if bad is not None:
        encoded = RAW_IN_PASSWORD.get(bad, "%25")
        raise UsageError(f"the password in {flag} {redact(url)} holds {bad!r}, which a URL must write "
                         f"percent-encoded", f"write {bad!r} as {encoded} in the URL's password")


def redact(text: object) -> str:
    """``text`` with every URL's password and secret query values replaced by ***, and every remembered secret
    hidden wherever it appears."""
    text = str(text)
    for secret in sorted(_REMEMBERED, key=len, reverse=True):
        if len(secret) >= MIN_FREE_TEXT:
            text = text.replace(secret, "***")
    return _URL.sub(lambda match: redact_url(match.group(0)), text)


def redact_url(url: str) -> str:
    """One URL with its password and secret query values replaced by ***."""
    head, password, rest = split_password(url)
    if password is not None:
        url = f"{head}:***{rest}"
    main, question, query = url.partition("?")
    if not question:
        return url
    params = parse_qsl(query, keep_blank_values=True)
    hidden = [(k, "***" if k.lower() in SECRET_KEYS else v) for k, v in params]
    return f"{main}?{urlencode(hidden, doseq=True, safe='*') if hidden else '***'}"

"""Secrets out of every text that leaves the process: masked by value, and by name.

``redact_text`` is the one scrubber; every sink — log lines, spans, run errors, dead letters,
payloads on the bus, the progress bucket, service replies — passes its text through it, or
through ``redact_url``, ``redact_headers`` and ``redact_json``, which apply it to text with a
shape. It applies two kinds of rule:

* **by value**: every secret the daemon holds — the resolved ``{ secret = … }`` values and
  ``[sources.auth]`` credentials of its settings (``registered``: at start and at every
  reload), and each OAuth token as it is fetched (``remember``; the token it replaces is
  dropped). A secret is masked in every form it takes on the wire: as is; URL-encoded (any of
  its characters percent-encoded or not, hex in either case, a space as ``+``, encoded twice);
  JSON-escaped (``\\"``, ``\\/``, ``\\uXXXX``); and, sent as HTTP Basic, the base64 of
  ``user:password``. ``Bearer <token>`` holds the token, so it is masked with it. A text cut
  in the middle of a secret (an error body kept to its first 200 bytes) ends with the
  secret's start: that tail is masked too.
* **by name**: query parameters and headers named like credentials (``api_key``, ``token``,
  ``Authorization`` …), those the configuration sends a secret in (``params.appid = { secret
  = … }`` makes ``appid`` one), and ``user:pass@`` in URLs.

A secret shorter than ``MIN_CHARS`` characters is not masked by value: "2024" or "test" would
turn up in every line. It is still masked by name where coleta sends it (its parameter or
header, ``Authorization`` for Basic, whose base64 is long enough to be masked by value), and
``registered`` reports it so that the daemon warns at start.

State is per process and read without locks: every change builds new, immutable rules.
"""

from __future__ import annotations

import base64
import contextlib
import re
import string
import threading
from collections.abc import Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote_plus, unquote_plus, urlsplit, urlunsplit

import msgspec

__all__ = [
    "MIN_CHARS",
    "REDACTED",
    "Registration",
    "Secret",
    "redact_headers",
    "redact_json",
    "redact_text",
    "redact_url",
    "registered",
    "remember",
    "shown_url",
]

REDACTED = "REDACTED"
#: Secrets shorter than this are masked by name only (see the module docstring).
MIN_CHARS = 6


@dataclass(frozen=True, slots=True)
class Secret:
    """A secret value the daemon holds: where it is configured, and how it travels.

    ``where`` names the configuration key (``sources[0].params.appid``), never the value.
    """

    where: str
    value: str
    #: The query parameter it is sent as: masked by that name too, whatever its length.
    param: str | None = None
    #: The header it is sent in: masked by that name too.
    header: str | None = None
    #: Sent as HTTP Basic with this user name: ``base64(user:value)`` is masked too.
    basic_user: str | None = None


# -- rules by name -----------------------------------------------------------------------
# Query parameter names that carry credentials: api_key, apikey, access_token,
# client_secret, X-Amz-Signature, sig (Azure SAS), password, ... Two carve-outs keep
# common harmless names readable: author(s) and keyword(s). "sig" must stand alone
# ("assignee" contains it).
_SENSITIVE_PARAM = re.compile(
    r"key(?!words?(?![a-z]))|token|secret|passw(?:or)?d|pwd|signature|(?<![a-z])sig(?![a-z])"
    r"|auth(?!ors?(?![a-z]))|credential|session|access",
    re.IGNORECASE,
)
_SENSITIVE_HEADER = re.compile(
    r"^(?:proxy-)?authorization$|^(?:set-)?cookie$|token|secret|key|auth|passw(?:or)?d"
    r"|signature|credential",
    re.IGNORECASE,
)
_URL_IN_TEXT = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"<>`]+", re.IGNORECASE)


# -- rules by value ----------------------------------------------------------------------
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_JSON_SHORT = {'"': '\\"', "\\": "\\\\", "/": "\\/", "\b": "\\b", "\f": "\\f", "\n": "\\n"}
_JSON_SHORT |= {"\r": "\\r", "\t": "\\t"}


def _hex(byte: int, width: int = 2) -> str:
    """``byte`` in hex, each letter matching either case."""
    return "".join(f"[{c}{c.lower()}]" if c.isalpha() else c for c in f"{byte:0{width}X}")


def _char(ch: str) -> str:
    """A pattern for ``ch`` as it may be written in a URL or a JSON string."""
    if ch in _UNRESERVED:
        return re.escape(ch)
    options = [re.escape(ch), "".join("%(?:25)?" + _hex(b) for b in ch.encode())]
    if ch == " ":
        options.append(r"\+")
    if ch in _JSON_SHORT:
        options.append(re.escape(_JSON_SHORT[ch]))
    units = ch.encode("utf-16-be")
    options.append(
        "".join(r"\\u" + _hex(int.from_bytes(units[i : i + 2]), 4) for i in range(0, len(units), 2))
    )
    return "(?:" + "|".join(options) + ")"


def _wire_pattern(texts: Iterable[str]) -> str:
    """A pattern matching any of ``texts`` as is, URL-encoded in any way, or JSON-escaped.

    Built as a trie (secrets sharing a start share its pattern), so that a position of a
    text is tried against the distinct first characters rather than against every secret:
    with a thousand secrets, redacting a line costs a tenth of a plain alternation.
    """
    trie: dict[str, Any] = {}
    for text in texts:
        node = trie
        for ch in text:
            node = node.setdefault(ch, {})
        node[""] = {}  # a text ends here
    return _trie_pattern(trie)


def _trie_pattern(node: dict[str, Any]) -> str:
    chain = []
    while True:  # a run of single characters: no group (and no recursion) needed
        keys = sorted(key for key in node if key)
        if len(keys) != 1 or "" in node:
            break
        chain.append(_char(keys[0]))
        node = node[keys[0]]
    if not keys:
        return "".join(chain)
    branches = "|".join(_char(key) + _trie_pattern(node[key]) for key in keys)
    return "".join(chain) + f"(?:{branches})" + ("?" if "" in node else "")


def _basic(user: str, password: str) -> list[str]:
    """What HTTP Basic puts on the wire for ``user:password`` (as is, and form-encoded first,
    as RFC 6749 asks of OAuth clients), without the ``=`` padding a text may cut off."""
    pairs = {f"{user}:{password}", f"{quote_plus(user)}:{quote_plus(password)}"}
    return [base64.b64encode(pair.encode()).decode().rstrip("=") for pair in pairs]


@dataclass(frozen=True, slots=True)
class _Rules:
    """One immutable set of rules; replaced whole whenever a secret comes or goes."""

    #: Every form of every secret long enough; None when there is none.
    pattern: re.Pattern[str] | None = None
    #: The literal forms (as is, base64) by their first ``MIN_CHARS`` characters: a text cut
    #: in the middle of one ends with its start. ``longest``: the longest one's length.
    heads: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    longest: int = 0
    #: Lower-case names of the parameters and headers the configuration sends secrets in.
    params: frozenset[str] = frozenset()
    headers: frozenset[str] = frozenset()


def _rules(secrets: Iterable[Secret], tokens: Iterable[str]) -> _Rules:
    literals: set[str] = set()
    params: set[str] = set()
    headers: set[str] = set()
    for secret in secrets:
        if secret.param:
            params.add(secret.param.lower())
        if secret.header:
            headers.add(secret.header.lower())
        literals.add(secret.value)
        if secret.basic_user is not None:
            literals.update(_basic(secret.basic_user, secret.value))
    literals.update(tokens)
    kept = sorted(text for text in literals if len(text) >= MIN_CHARS)
    heads: dict[str, tuple[str, ...]] = {}
    for text in kept:
        heads[text[:MIN_CHARS]] = (*heads.get(text[:MIN_CHARS], ()), text)
    return _Rules(
        pattern=re.compile(_wire_pattern(kept)) if kept else None,
        heads=heads,
        longest=max(map(len, kept), default=0),
        params=frozenset(params),
        headers=frozenset(headers),
    )


class _Registry:
    """The secrets of every registration and the tokens remembered, and their rules."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.registrations: list[Registration] = []
        self.tokens: dict[Hashable, str] = {}
        self.rules = _Rules()

    def rebuild(self) -> None:
        """Build the rules again from what is held (call with ``lock`` held)."""
        secrets = [secret for r in self.registrations for secret in r.secrets]
        self.rules = _rules(secrets, self.tokens.values())


_registry = _Registry()


class Registration:
    """The secrets one daemon holds, masked while it is registered (``registered``)."""

    def __init__(self) -> None:
        self.secrets: frozenset[Secret] = frozenset()

    def update(self, secrets: Iterable[Secret]) -> list[str]:
        """Mask ``secrets`` too (a reload's); returns where those too short to be masked by
        value are configured. Secrets no longer configured stay masked: a rotated key may
        still be valid, and still be echoed by a run begun before the reload."""
        new = frozenset(secrets)
        with _registry.lock:
            self.secrets = self.secrets | new
            _registry.rebuild()
        return sorted({s.where for s in new if len(s.value) < MIN_CHARS and s.value})


@contextlib.contextmanager
def registered(secrets: Iterable[Secret] = ()) -> Iterator[Registration]:
    """Mask ``secrets`` (and those later given to ``update``) until the block ends."""
    registration = Registration()
    with _registry.lock:
        _registry.registrations.append(registration)
    try:
        registration.update(secrets)
        yield registration
    finally:
        with _registry.lock:
            _registry.registrations.remove(registration)
            _registry.rebuild()


def remember(key: Hashable, value: str) -> None:
    """Mask ``value`` (a token fetched at run time) from now on, instead of the value
    remembered under ``key`` before, if any."""
    with _registry.lock:
        if _registry.tokens.get(key) == value:
            return
        _registry.tokens[key] = value
        _registry.rebuild()


def _reset_for_tests() -> None:
    with _registry.lock:
        _registry.registrations.clear()
        _registry.tokens.clear()
        _registry.rebuild()


# -- the scrubbers -----------------------------------------------------------------------
def redact_text(text: str) -> str:
    """``text`` with every secret masked, in every form, and every URL in it redacted."""
    rules = _registry.rules
    text = _by_value(text, rules)
    if "://" in text:
        text = _URL_IN_TEXT.sub(lambda match: _embedded_url(match.group(), rules), text)
    return text


def redact_url(url: str) -> str:
    """Drop ``user:pass@``, mask secret values and sensitive query (and fragment) values;
    other parameters keep their order and encoding. A URL that cannot be parsed is replaced
    whole: a readable secret is worse than an unreadable log line."""
    rules = _registry.rules
    return _url_by_name(_by_value(url, rules), rules)


def redact_headers(headers: Mapping[str, str], *, by_value: bool = True) -> dict[str, str]:
    """Copy ``headers``: credential-bearing ones (by name) replaced by ``REDACTED``, the
    others' values through ``redact_text`` (``by_value=False``: left as they are)."""
    rules = _registry.rules
    return {
        name: REDACTED
        if _SENSITIVE_HEADER.search(name) or name.lower() in rules.headers
        else (redact_text(value) if by_value else value)
        for name, value in headers.items()
    }


def redact_json(data: bytes) -> bytes:
    """A JSON document with every string in it (keys too) through ``redact_text``.

    Masking the encoded text instead could break the document (a secret that is all digits,
    inside a number). Returned as it is while there is nothing it could hold.
    """
    if _registry.rules.pattern is None and b"://" not in data:
        return data
    return msgspec.json.encode(_redact_value(msgspec.json.decode(data)))


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {redact_text(str(k)): _redact_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_value(item) for item in value]
    return value


def _by_value(text: str, rules: _Rules) -> str:
    if rules.pattern is None:
        return text
    text = rules.pattern.sub(REDACTED, text)
    return _cut_tail(text, rules)


def _cut_tail(text: str, rules: _Rules) -> str:
    """``text`` without a tail that is the start of a secret (the text was cut there)."""
    for start in range(max(0, len(text) - rules.longest + 1), len(text) - MIN_CHARS + 1):
        for literal in rules.heads.get(text[start : start + MIN_CHARS], ()):
            if len(literal) > len(text) - start and literal.startswith(text[start:]):
                return text[:start] + REDACTED
    return text


def _embedded_url(url: str, rules: _Rules) -> str:
    """A URL found in text, redacted. The punctuation after it ("at nats://h:4222: refused")
    is set apart when the URL cannot be parsed with it; one that cannot be parsed at all
    keeps its scheme and host only (where no key travels), to say what was wrong."""
    safe = _url_by_name(url, rules)
    if safe != REDACTED:
        return safe
    stripped = url.rstrip(_AFTER_URL)
    if stripped and stripped != url:
        safe = _url_by_name(stripped, rules)
        if safe != REDACTED:
            return safe + url[len(stripped) :]
    return _scheme_and_host(url)


def shown_url(url: str) -> str:
    """``redact_url(url)``; one it cannot parse (and hides whole) shows its scheme and host,
    where no key travels: enough to see what is wrong with it."""
    safe = redact_url(url)
    return safe if safe != REDACTED else _scheme_and_host(url)


def _scheme_and_host(url: str) -> str:
    scheme, _, rest = url.partition("://")
    netloc = re.split(r"[/?#]", rest, maxsplit=1)[0].rpartition("@")[2]
    host = _HOST.match(netloc)
    return f"{scheme}://{host[0]}/..." if host and host[0] else REDACTED


_AFTER_URL = ".,;:!?)]}"
#: An unparsable URL's host: an IPv6 address in brackets (maybe unclosed), or a name without
#: what follows a colon (a port, or what someone meant as a password).
_HOST = re.compile(r"\[[0-9A-Fa-f:.]*\]?|[^:\[\]]+")


def _url_by_name(url: str, rules: _Rules) -> str:
    try:
        parts = urlsplit(url)
        _ = parts.port  # validates the netloc; raises ValueError on garbage
    except ValueError:
        return REDACTED
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit(
        (
            parts.scheme,
            netloc,
            parts.path,
            _query_by_name(parts.query, rules),
            _query_by_name(parts.fragment, rules) if "=" in parts.fragment else parts.fragment,
        )
    )


def _query_by_name(query: str, rules: _Rules) -> str:
    if not query:
        return query
    pairs = []
    for pair in query.split("&"):
        name, equals, _value = pair.partition("=")
        if equals:
            plain = unquote_plus(name)
            if _SENSITIVE_PARAM.search(plain) or plain.lower() in rules.params:
                pair = f"{name}={REDACTED}"
        pairs.append(pair)
    return "&".join(pairs)

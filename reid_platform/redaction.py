"""Secrets out of every text we print, log, raise or store in MLflow: passwords in URIs, secret query
parameters, and the values of secret environment variables.

``redact`` is the one function for all of them; ``carries_secret`` says whether a text would change
under it (a URI that would is refused where it would be stored, e.g. with a Ray job). This module
imports nothing of the package, so that every layer can use it.
"""

from __future__ import annotations

import logging
import os
import re
from urllib.parse import quote, unquote_plus

MASK = "***"
# A URI runs to the next whitespace: a password may hold any other character, quotes included. The
# punctuation of a sentence it ends is left out (and left as it is).
_URI = re.compile(r"[a-z][a-z0-9+.-]*://\S+?(?=[.,;:!?)\]}'\"]*(?:\s|$))", re.IGNORECASE)
# Query parameters and environment variables are secret when a word of their name is one of these
# (X-Amz-Signature, access_token, accessToken, api_key, AWS_SESSION_TOKEN, MLFLOW_TRACKING_PASSWORD),
# or when the name holds "secret" or "password" anywhere (AWS_SECRET_ACCESS_KEY, DBPASSWORD).
_SECRET_WORDS = {"password", "passwd", "token", "secret", "key", "apikey", "signature", "sig", "credential", "credentials"}
# A variable with one of these last words names where a secret is, not the secret (RAY_AUTH_TOKEN_PATH).
_LOCATION_WORDS = {"path", "file", "dir"}
# Shorter values of secret variables are not searched for in texts: they would mask common words (a
# compose file's MLFLOW_TRACKING_PASSWORD=mlflow would hide every "mlflow"). Tokens and keys are longer.
MIN_SECRET_LENGTH = 10


def _is_secret_name(name: str) -> bool:
    words = [word for word in re.split(r"[^a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()) if word]
    if not words or words[-1] in _LOCATION_WORDS:
        return False
    return any(word in _SECRET_WORDS for word in words) or any(part in name.lower() for part in ("secret", "password"))


def _redact_query(query: str) -> str:
    parameters = []
    for parameter in query.split("&"):
        name, equals, value = parameter.partition("=")
        parameters.append(f"{name}={MASK}" if equals and value and _is_secret_name(unquote_plus(name)) else parameter)
    return "&".join(parameters)


def _redact_uri(uri: str) -> str:
    """One URI with the password of its user info and its secret query parameters masked.

    The password is everything between the user name's ':' and the last '@': a password with an
    unencoded '/', '@' or ':' is not a valid URI, so urllib.parse would end the authority at its '/'
    and print the rest as a path; an '@' in a path after a 'host:port' is masked with it, which
    hides too much rather than too little.
    """
    scheme, _, rest = uri.partition("://")
    userinfo, at, location = rest.rpartition("@")
    user, colon, password = userinfo.partition(":")
    if at and colon and password and not re.search(r"[/?#]", user):
        rest = f"{user}:{MASK}@{location}"
    else:
        location = rest
    before_fragment, hash_, fragment = location.partition("#")
    path, question, query = before_fragment.partition("?")
    if question:
        redacted_location = f"{path}?{_redact_query(query)}{hash_}{fragment}"
        rest = rest[: len(rest) - len(location)] + redacted_location
    return f"{scheme}://{rest}"


def _environment() -> dict[str, str]:
    """A snapshot of the environment. Another thread may remove a variable while it is read (MLflow's
    telemetry does, in a Ray Tune trial), which makes reading os.environ raise KeyError: read it again."""
    while True:
        try:
            return dict(os.environ)
        except KeyError:
            continue


def _secret_values() -> set[str]:
    """The values of this process's secret environment variables, as given and percent-encoded."""
    values = {value for name, value in _environment().items() if _is_secret_name(name) and len(value) >= MIN_SECRET_LENGTH}
    return values | {quote(value, safe="") for value in values}


def redact(text: str) -> str:
    """``text`` with every URI's password and secret query parameters (token=, key=, X-Amz-Signature=,
    ...) and every value of a secret environment variable (*_PASSWORD, *_TOKEN, *SECRET*, *_KEY, ...)
    replaced by ***: safe to print, log, raise and store."""
    text = _URI.sub(lambda match: _redact_uri(match.group()), text)
    for value in sorted(_secret_values(), key=len, reverse=True):  # longest first: one may hold another
        text = text.replace(value, MASK)
    return text


def first_line(text: str, limit: int) -> str:
    """The first non-empty line of ``text``, redacted, then cut to ``limit`` characters (redacted
    first: a cut URI would no longer show its password for what it is)."""
    lines = [line.strip() for line in redact(text).splitlines() if line.strip()]
    return lines[0][:limit] if lines else ""


def carries_secret(text: str) -> bool:
    """Whether ``text`` holds anything ``redact`` would mask (exactly then)."""
    return redact(text) != text


def redact_log_records() -> None:
    """Every log record this process makes from now on, from any library's logger (MLflow's warnings
    quote the request's URI, password included), carries its message and traceback redacted. Records
    are rewritten where they are made, so every handler and every logger's own configuration sees
    only the redacted text. A record without a secret is left as it was (formatters that read its
    arguments keep them). Idempotent."""
    make = logging.getLogRecordFactory()
    if getattr(make, "redacts", False):
        return

    def redacted_record(*args, **kwargs) -> logging.LogRecord:
        record = make(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed call: the handler reports it, as without us
            return record
        if (redacted := redact(message)) != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:  # formatters reuse exc_text when it is set
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return record

    redacted_record.redacts = True
    logging.setLogRecordFactory(redacted_record)

"""One progress line to the user, once, from any process (driver, Ray Train controller or worker),
redacted: these lines end up in job logs, and some quote URIs or error messages."""

from __future__ import annotations

import sys

from reid_platform.redaction import redact


def say(line: str) -> None:
    # Inside Ray Train workers print() on sys.stdout is also copied into Ray Train's logger, which
    # prints it a second time; the process's own stdout is not copied.
    print(redact(line), file=sys.__stdout__, flush=True)

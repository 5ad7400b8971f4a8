"""One progress line to the user, once, from any process (driver, Ray Train controller or worker)."""

from __future__ import annotations

import sys


def say(line: str) -> None:
    # Inside Ray Train workers print() on sys.stdout is also copied into Ray Train's logger, which
    # prints it a second time; the process's own stdout is not copied.
    print(line, file=sys.__stdout__, flush=True)

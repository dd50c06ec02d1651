"""What the check scripts (deploy_check, observability_check, compose_check, render_k8s) share: the
list of problems found, which lets every check run before the script fails with all of
them, and the progress lines."""

from __future__ import annotations

import sys
from typing import Any


class Failures:
    def __init__(self) -> None:
        self.messages: list[str] = []

    def add(self, where: str, message: str) -> None:
        line = f"{where}: {message}"
        if line not in self.messages:  # some tools repeat themselves
            self.messages.append(line)

    def check(self, condition: Any, where: str, message: str) -> bool:
        if not condition:
            self.add(where, message)
        return bool(condition)

    def report(self) -> int:
        """Prints the problems to stderr; the exit code: 1 if there were any."""
        if not self.messages:
            return 0
        print(f"\n{len(self.messages)} problem(s):", file=sys.stderr)
        for message in self.messages:
            print(f"  {message}", file=sys.stderr)
        return 1


def step(message: str) -> None:
    print(f"  - {message}", flush=True)

"""Values made from a fuzzer's bytes: strings that have broken parsers before (`../`, NUL, very
long), JSON values of any shape, and choices among known-good values, so that a harness reaches
deep code as often as it tries the edges.

Works on atheris's FuzzedDataProvider; every harness decodes its input with it, so a crash file
replays the same execution (tests/fuzz/test_regressions.py).
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

T = TypeVar("T")
# Where a harness keeps its files: the runner (tests/fuzz/run.py) makes this directory and removes
# it after the harness's process ends (libFuzzer ends the process without Python's exit handlers).
SCRATCH_ENV = "TULLE_FUZZ_SCRATCH"


def scratch_dir(prefix: str) -> str:
    """A new directory for one harness's files: in the runner's, else on tmpfs if there is one
    (the plugin and the agent fsync what they record)."""
    base = os.environ.get(SCRATCH_ENV)
    if not base and os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        base = "/dev/shm"
    return tempfile.mkdtemp(prefix=prefix, dir=base or None)


class Harness(Protocol):
    def one_input(self, data: bytes) -> None: ...


def fuzz(make_harness: Callable[[], Harness]) -> None:
    """Run libFuzzer on the harness, made at the first input (once atheris has set up coverage)."""
    import atheris

    harness: Harness | None = None

    def one_input(data: bytes) -> None:
        nonlocal harness
        if harness is None:
            harness = make_harness()
        harness.one_input(data)

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


# Strings a path, a name or a parser has choked on somewhere; the fuzzer combines them.
NASTY = [
    "",
    "../",
    "..",
    "/../../etc/passwd",
    "a\x00b",
    "\x00",
    "/",
    "//",
    "a" * 100_000,
    "é",
    "\u2028",
    "\ud7ff",
    "-",
    ".",
    "default/../kube-system",
    "workloadendpoints/x",
    "NaN",
    " ",
    "\n",
    "%s%n",
    "$(reboot)",
    "`id`",
    "; rm -rf /",
    "A" * 254,
    "a" * 64,
]


class Provider(Protocol):
    """The part of atheris.FuzzedDataProvider the harnesses use."""

    def ConsumeIntInRange(self, low: int, high: int) -> int: ...

    def ConsumeInt(self, size: int) -> int: ...

    def ConsumeBool(self) -> bool: ...

    def ConsumeFloat(self) -> float: ...

    def ConsumeBytes(self, count: int) -> bytes: ...

    def ConsumeUnicodeNoSurrogates(self, count: int) -> str: ...

    def remaining_bytes(self) -> int: ...


class Values:
    """Fuzzed values, each drawn from the provider's bytes."""

    def __init__(self, fdp: Provider) -> None:
        self.fdp = fdp

    def pick(self, choices: list[T]) -> T:
        return choices[self.fdp.ConsumeIntInRange(0, len(choices) - 1)]

    def chance(self, percent: int) -> bool:
        return self.fdp.ConsumeIntInRange(0, 99) < percent

    def text(self, limit: int = 40) -> str:
        """A nasty string, a fuzzed one, or one glued from both."""
        way = self.fdp.ConsumeIntInRange(0, 3)
        if way == 0:
            return self.pick(NASTY)
        if way == 1:
            return self.fdp.ConsumeUnicodeNoSurrogates(self.fdp.ConsumeIntInRange(0, limit))
        if way == 2:
            return self.pick(NASTY) + self.fdp.ConsumeUnicodeNoSurrogates(self.fdp.ConsumeIntInRange(0, limit))
        return self.fdp.ConsumeUnicodeNoSurrogates(self.fdp.ConsumeIntInRange(0, limit)) + self.pick(NASTY)

    def string_or(self, good: list[str], limit: int = 40) -> str:
        """Mostly one of `good`; else a fuzzed string."""
        return self.pick(good) if self.chance(70) else self.text(limit)

    def scalar(self) -> Any:
        way = self.fdp.ConsumeIntInRange(0, 6)
        if way == 0:
            return None
        if way == 1:
            return self.fdp.ConsumeBool()
        if way == 2:
            return self.fdp.ConsumeInt(self.pick([1, 2, 4, 9]))
        if way == 3:
            return self.fdp.ConsumeFloat()  # NaN and infinities too
        return self.text()

    def json(self, depth: int = 3) -> Any:
        """Any JSON value (floats may be NaN or infinite, as Python's json reads them)."""
        if depth <= 0 or self.chance(50):
            return self.scalar()
        size = self.fdp.ConsumeIntInRange(0, 4)
        if self.fdp.ConsumeBool():
            return [self.json(depth - 1) for _ in range(size)]
        return {self.text(12): self.json(depth - 1) for _ in range(size)}

    def maybe(self, value: Any, percent: int = 80) -> Any:
        """`value` most of the time, else any JSON value in its place."""
        return value if self.chance(percent) else self.json(2)

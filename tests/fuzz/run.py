"""Run the fuzz harnesses, each in its own process (libFuzzer owns the process and ends it), and
print what each did: executions, coverage (edges and features of Tulle's own code, as atheris
counts them), corpus size, time, and the inputs that failed.

    python -m tests.fuzz.run                       # 100,000 executions of each harness
    python -m tests.fuzz.run --runs 2000 --seconds 20 plugin
    python -m tests.fuzz.run --replay               # the saved failing inputs only, once each

The corpus each run grows is kept in --work (default .make/fuzz) and read again by the next run;
the inputs that once failed (tests/fuzz/regressions/HARNESS/) are always read first.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

from tests.fuzz.values import SCRATCH_ENV, scratch_dir

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HARNESSES = ("plugin", "admission", "agent_api")
REGRESSIONS = os.path.join(REPO, "tests", "fuzz", "regressions")
# libFuzzer's own limits for one input: seconds before it counts as a hang, memory before OOM.
PER_INPUT_TIMEOUT_S = 10
RSS_LIMIT_MB = 2048


@dataclass
class Outcome:
    harness: str
    status: int
    runs: int = 0
    edges: int = 0
    features: int = 0
    corpus: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)
    log: str = ""

    def line(self) -> str:
        rate = self.runs / self.seconds if self.seconds else 0.0
        verdict = "ok" if self.status == 0 else f"FAILED ({', '.join(self.failures) or f'exit {self.status}'})"
        return (
            f"{self.harness:<10} {self.runs:>9,} runs  cov {self.edges:>5} ft {self.features:>6}  "
            f"corpus {self.corpus:>5}  {self.seconds:>7.1f} s  {rate:>7.0f}/s  {verdict}"
        )


def _parse(outcome: Outcome, log: str) -> None:
    runs = re.findall(r"stat::number_of_executed_units: (\d+)", log) or re.findall(r"Done (\d+) runs", log)
    if runs:
        outcome.runs = int(runs[-1])
    if found := re.findall(r"cov: (\d+) ft: (\d+) corp: (\d+)", log):
        outcome.edges, outcome.features, outcome.corpus = (int(x) for x in found[-1])
    outcome.failures = re.findall(r"Test unit written to (\S+)", log)


def run_harness(name: str, runs: int, work: str, seconds: float | None = None, replay: bool = False) -> Outcome:
    """Fuzz one harness for `runs` executions (or `seconds`, whichever ends first)."""
    home = os.path.join(work, name)
    corpus = os.path.join(home, "corpus")
    artifacts = os.path.join(home, "failures")
    os.makedirs(corpus, exist_ok=True)
    os.makedirs(artifacts, exist_ok=True)
    regressions = os.path.join(REGRESSIONS, name)
    saved = sorted(os.path.join(regressions, f) for f in os.listdir(regressions)) if os.path.isdir(regressions) else []
    cmd = [sys.executable, "-m", f"tests.fuzz.fuzz_{name}"]
    if replay:
        if not saved:
            return Outcome(name, 0)
        # Given files rather than folders, libFuzzer runs each once and stops at the first failure.
        cmd += saved
    else:
        cmd += [corpus, *([regressions] if saved else []), f"-runs={runs}", "-len_control=0", "-max_len=4096"]
        if seconds:
            cmd.append(f"-max_total_time={int(seconds)}")
    cmd += [
        f"-timeout={PER_INPUT_TIMEOUT_S}",
        f"-rss_limit_mb={RSS_LIMIT_MB}",
        f"-artifact_prefix={artifacts}/",
        "-print_final_stats=1",
    ]
    scratch = scratch_dir(f"tulle-fuzz-{name}-run-")
    started = time.monotonic()
    try:
        proc = subprocess.run(
            cmd,
            cwd=REPO,
            env={**os.environ, SCRATCH_ENV: scratch},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    outcome = Outcome(name, proc.returncode, seconds=time.monotonic() - started, log=proc.stdout)
    _parse(outcome, proc.stdout)
    with open(os.path.join(home, "last.log"), "w") as f:
        f.write(proc.stdout)
    return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("harnesses", nargs="*", help=f"of {', '.join(HARNESSES)} (default: all)")
    parser.add_argument("--runs", type=int, default=100_000, help="executions of each harness (default: %(default)s)")
    parser.add_argument("--seconds", type=float, help="stop each harness after this long")
    parser.add_argument("--work", default=os.path.join(REPO, ".make", "fuzz"), help="corpus and logs")
    parser.add_argument("--replay", action="store_true", help="run the saved failing inputs once each")
    args = parser.parse_args(argv)
    if unknown := set(args.harnesses) - set(HARNESSES):
        parser.error(f"no harness named {', '.join(sorted(unknown))}; the harnesses are {', '.join(HARNESSES)}")
    failed = False
    for name in args.harnesses or HARNESSES:
        outcome = run_harness(name, args.runs, args.work, args.seconds, args.replay)
        print(outcome.line(), flush=True)
        if outcome.status != 0:
            failed = True
            print("\n".join(outcome.log.splitlines()[-40:]), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""How fast the CLI answers: ``gradfit --help`` and ``gradfit models`` against ``import torch``.

Each is a fresh process, timed wall clock, best of 5. The CLI's help and model list do not
load torch (tests/test_cli_startup.py checks that), so both should take a fraction of the
reference. Run: .venv/bin/python benchmarks/bench_cli_startup.py
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

REPEATS = 5


def gradfit_command() -> list[str]:
    """The console script beside this Python, else ``python -m gradfit.cli``."""
    script = Path(sys.executable).parent / "gradfit"
    if script.exists():
        return [str(script)]
    found = shutil.which("gradfit")
    return [found] if found else [sys.executable, "-m", "gradfit.cli"]


def best_wall_time(command: list[str], repeats: int = REPEATS) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    gradfit = gradfit_command()
    cases = {
        "gradfit --help": [*gradfit, "--help"],
        "gradfit models": [*gradfit, "models"],
        "python -c 'import torch' (reference)": [sys.executable, "-c", "import torch"],
    }
    print(f"best of {REPEATS} wall times, fresh process each")
    for label, command in cases.items():
        print(f"{label:40s} {best_wall_time(command):7.3f} s")


if __name__ == "__main__":
    main()

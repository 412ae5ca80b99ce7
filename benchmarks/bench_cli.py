"""CLI start-up latency: `mmcore list-encoders` beside `python -c "import torch"` and `python -c pass`.

Each command runs ``--repeats`` times as a fresh process, interleaved so that load changes hit all of
them alike; the table gives the median and IQR wall time and the ratios. Target (docs/performance.md):
`mmcore list-encoders` median <= 0.30 s on the 2-core machine with the four first-party plugins
installed, and far below `import torch`. Also reports whether the listing imported torch,
transformers or timm (it must not).

    python benchmarks/bench_cli.py
    python benchmarks/bench_cli.py --repeats 21 --json cli.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from rich.console import Console
from rich.table import Table

HEAVY = ("torch", "transformers", "timm", "torchaudio")


def commands() -> dict[str, list[str]]:
    script = shutil.which("mmcore", path=os.path.dirname(sys.executable)) or shutil.which("mmcore")
    listing = [script] if script else [sys.executable, "-m", "mmcore"]
    return {
        "mmcore list-encoders": [*listing, "list-encoders"],
        "mmcore list-encoders --json": [*listing, "list-encoders", "--json"],
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
        "python -c pass": [sys.executable, "-c", "pass"],
    }


def heavy_modules_imported() -> list[str]:
    code = (
        "import sys\nfrom mmcore.cli.app import main\n"
        "try:\n    main(['list-encoders', '--json'])\nexcept SystemExit:\n    pass\n"
        f"print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})), file=sys.stderr)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stderr.strip().splitlines()[-1].split() if out.stderr.strip() else []


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    cmds = commands()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for cmd in cmds.values():  # warm the file cache once
        subprocess.run(cmd, capture_output=True, env=env, check=True)
    times: dict[str, list[float]] = {name: [] for name in cmds}
    for _ in range(args.repeats):
        for name, cmd in cmds.items():
            start = time.perf_counter()
            subprocess.run(cmd, capture_output=True, env=env, check=True)
            times[name].append(time.perf_counter() - start)
    listing = subprocess.run(cmds["mmcore list-encoders --json"], capture_output=True, text=True, check=True)
    encoders = sorted({row["plugin"] for row in json.loads(listing.stdout)})
    heavy = heavy_modules_imported()

    base = statistics.median(times['python -c "import torch"'])
    table = Table(title=f"CLI latency, median of {args.repeats} (plugins with encoders: {', '.join(encoders) or 'none'})")
    for col in ("command", "median", "IQR", "vs import torch"):
        table.add_column(col, justify="left" if col == "command" else "right")
    result = {"repeats": args.repeats, "plugins": encoders, "heavy_imports": heavy, "commands": {}}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4)
        med = statistics.median(ts)
        result["commands"][name] = {"median_s": med, "iqr_s": q[2] - q[0], "ratio_vs_import_torch": med / base}
        table.add_row(name, f"{med:.3f} s", f"{q[2] - q[0]:.3f} s", f"{med / base:.2f}x")
    console = Console()
    console.print(table)
    console.print(f"heavy modules imported by list-encoders: {', '.join(heavy) or 'none'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()

"""`make bench`: every benchmark in bench/, one after the other; results go to BENCHMARKS.md by hand.

    python -m bench                    # all
    python -m bench store pair         # a selection (module suffixes: bench_<name>.py)
"""
import importlib
import pkgutil
import sys
from pathlib import Path


def benchmark_names() -> list[str]:
    """The suffixes of the ``bench_<name>.py`` modules next to this file."""
    return sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules([str(Path(__file__).parent)])
                  if m.name.startswith("bench_"))


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    names = benchmark_names()
    selected = argv or names
    unknown = [n for n in selected if n not in names]
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; available: {names}")
    for name in selected:
        print(f"\n## bench_{name}\n", flush=True)
        importlib.import_module(f"bench.bench_{name}").main([])


if __name__ == "__main__":
    main()

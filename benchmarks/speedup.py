"""Speedup benchmark; same as `saguaro bench`. Run `python benchmarks/speedup.py --help`."""

from saguaro.bench.benchmark import main

if __name__ == "__main__":
    main()

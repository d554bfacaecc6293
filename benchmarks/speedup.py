"""Speedup benchmark; same as `saguaro bench`. Run `python benchmarks/speedup.py --help`."""

from saguaro.benchmark import main

if __name__ == "__main__":
    main()

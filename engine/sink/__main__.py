"""``python -m engine.sink``: the sink without the main CLI."""

from __future__ import annotations

import argparse
import sys

from engine.sink.cli import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine.sink", description="SMTP sink for dev, tests and benchmarks."
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""``python -m hybridpar.book {build,labs,vendor}``; see :mod:`hybridpar.book`."""
from __future__ import annotations

import argparse
import sys

from hybridpar.book.build import ROOT, build_book
from hybridpar.book.run_labs import main as labs_main
from hybridpar.book.vendor import vendor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hybridpar.book", description="Build the book, run its labs, "
                                     "vendor its JavaScript (see `pydoc hybridpar.book`).")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="jupyter-book build . -W -n --keep-going (chapters executed, labs rendered)")
    sub.add_parser("labs", help="execute lab notebooks in place; see `python -m hybridpar.book.run_labs -h`",
                   add_help=False)
    sub.add_parser("vendor", help="re-fetch _assets/vendor/ from npm")
    args, rest = parser.parse_known_args(argv)
    if args.command == "labs":
        return labs_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "vendor":
        for path in vendor(ROOT):
            print(f"{path.stat().st_size:>10,d}  {path.relative_to(ROOT)}")
        return 0
    result = build_book(ROOT)
    print(f"[hybridpar] book build {'succeeded' if result.ok else 'FAILED'} in {result.seconds:.0f} s: {result.html}")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())

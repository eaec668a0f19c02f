"""Writes docs/api-reference.md from crds/*.yaml; `--check` only says whether it is current."""

from __future__ import annotations

import argparse
import sys

from apireference import PAGE, ROOT, render


def main() -> int:
    parser = argparse.ArgumentParser(prog="hack/gen-api-reference", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the page differs from the CRDs")
    args = parser.parse_args()
    page = render()
    current = PAGE.read_text() if PAGE.exists() else ""
    relative = PAGE.relative_to(ROOT)
    if args.check:
        if current != page:
            print(f"{relative} is stale: run hack/gen-api-reference", file=sys.stderr)
            return 1
        return 0
    if current != page:
        PAGE.write_text(page)
        print(f"wrote {relative}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

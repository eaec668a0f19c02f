"""The machine's Debian mirror, from its own apt sources: what every Debian rootfs and image is built from.

The node rootfs (hack/node/rootfs.sh), the operator image's base (operator_image.py) and the kind
node image (hack/kind/up.sh passes it as a build argument) all take the archive this machine's apt
already uses, so a machine behind a local mirror or proxy builds from that, and the repository names
no mirror of its own. Sources are read in apt's order, sources.list first, then the files of
sources.list.d by name: the one-line format (`deb [options] URI suite components`) of sources.list
and *.list, and the deb822 stanzas (`Types:`, `URIs:`, `Suites:`) of *.sources. The mirror is the
first binary (`deb`) source over http or https whose path ends in /debian and whose suites are not
all security suites: the Debian archive, not the security archive (/debian-security) nor another
project's repository.

The shell scripts call it through hack/lib/common.sh's `debian_mirror`: `python3 -m
localenv.apt_mirror` prints the mirror, or fails saying where it looked.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from localenv.procs import LocalEnvError

APT_DIR = Path("/etc/apt")
# deb [options] URI suite [components]: the options are one bracketed group, which may hold spaces.
ONE_LINE = re.compile(r"^(?P<type>deb|deb-src)\s+(?:\[[^\]]*\]\s*)?(?P<uri>\S+)\s+(?P<suite>\S+)")


@dataclass(frozen=True)
class Source:
    """One entry of apt's sources: a stanza of a .sources file, or a line of a .list file."""

    types: tuple[str, ...]
    uris: tuple[str, ...]
    suites: tuple[str, ...]


def one_line_sources(text: str) -> list[Source]:
    """The entries of a sources.list or *.list file; comments (from `#` on) and other lines skipped."""
    entries = []
    for line in text.splitlines():
        match = ONE_LINE.match(line.split("#", 1)[0].strip())
        if match:
            entries.append(Source((match["type"],), (match["uri"],), (match["suite"],)))
    return entries


def deb822_sources(text: str) -> list[Source]:
    """The stanzas of a *.sources file; a stanza with `Enabled: no` is left out, as apt leaves it."""
    entries = []
    for stanza in re.split(r"\n[ \t]*\n", text):
        fields: dict[str, str] = {}
        name = ""
        for line in stanza.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0] in " \t" and name:
                fields[name] += " " + line.strip()
            elif ":" in line:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                fields[name] = value.strip()
        if fields.get("enabled", "yes").lower() == "no":
            continue
        if "uris" in fields:
            entries.append(
                Source(
                    tuple(fields.get("types", "").split()),
                    tuple(fields["uris"].split()),
                    tuple(fields.get("suites", "").split()),
                )
            )
    return entries


def apt_sources(apt_dir: Path = APT_DIR) -> list[Source]:
    """Every entry of the machine's apt sources, in the order apt reads them."""
    entries = []
    main_list = apt_dir / "sources.list"
    if main_list.is_file():
        entries += one_line_sources(main_list.read_text())
    parts = apt_dir / "sources.list.d"
    for path in sorted(parts.iterdir()) if parts.is_dir() else []:
        if path.suffix == ".list" and path.is_file():
            entries += one_line_sources(path.read_text())
        elif path.suffix == ".sources" and path.is_file():
            entries += deb822_sources(path.read_text())
    return entries


def debian_archive(entries: list[Source]) -> str | None:
    """The first Debian archive among the entries (without a trailing slash), or None."""
    for entry in entries:
        # bookworm-security, or buster/updates before bullseye.
        if "deb" not in entry.types or all(s.endswith(("-security", "/updates")) for s in entry.suites):
            continue
        for uri in entry.uris:
            parts = urlsplit(uri)
            if parts.scheme in ("http", "https") and parts.path.rstrip("/").endswith("/debian"):
                return uri.rstrip("/")
    return None


def debian_mirror(apt_dir: Path = APT_DIR) -> str:
    """The machine's Debian mirror; LocalEnvError, naming where it looked, when its sources have none."""
    mirror = debian_archive(apt_sources(apt_dir))
    if mirror is None:
        raise LocalEnvError(
            f"no Debian mirror found in {apt_dir / 'sources.list'} or {apt_dir / 'sources.list.d'}; "
            "add the Debian archive this machine may use (a deb source over http or https whose path "
            "ends in /debian) to its apt sources"
        )
    return mirror


def main() -> int:
    try:
        print(debian_mirror())
    except LocalEnvError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

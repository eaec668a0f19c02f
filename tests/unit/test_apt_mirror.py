"""The Debian mirror every rootfs and image of the local environment is built from is the one the
machine's apt sources name (hack/localenv/apt_mirror.py), in either format apt reads: the Debian
archive, never the security archive or another project's repository; none is an error saying where
it looked."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from localenv.apt_mirror import Source, deb822_sources, debian_archive, debian_mirror, one_line_sources
from localenv.procs import REPO_ROOT, LocalEnvError, require

# As a Debian 12 installation writes it: the security stanza after the archive's, comments between.
DEB822 = """\
Types: deb
# a snapshot of the archive
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
"""

ONE_LINE = """\
# deb http://commented.example/debian bookworm main
deb-src http://sources.example/debian bookworm main
deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://mirror.example/debian/ bookworm main
deb [ arch=amd64 ] http://mirror.example/debian-security bookworm-security main  # updates
"""


def apt_dir(tmp_path: Path, files: dict[str, str]) -> Path:
    (tmp_path / "sources.list.d").mkdir()
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def test_deb822_stanzas_give_their_types_uris_and_suites() -> None:
    assert deb822_sources(DEB822) == [
        Source(("deb",), ("http://mirror.example/debian",), ("bookworm", "bookworm-updates")),
        Source(("deb",), ("http://mirror.example/debian-security",), ("bookworm-security",)),
    ]
    assert debian_archive(deb822_sources(DEB822)) == "http://mirror.example/debian"


def test_deb822_reads_several_uris_continuation_lines_and_skips_disabled_stanzas() -> None:
    text = """\
Types: deb
URIs: http://off.example/debian
Suites: trixie
Enabled: no

types: deb-src deb
uris: ftp://ftp.example/debian https://first.example/debian/
 http://second.example/debian
suites: trixie
"""
    (entry,) = deb822_sources(text)
    assert entry.types == ("deb-src", "deb")
    assert entry.uris == ("ftp://ftp.example/debian", "https://first.example/debian/", "http://second.example/debian")
    # Over http or https only, without the trailing slash.
    assert debian_archive([entry]) == "https://first.example/debian"


def test_one_line_entries_skip_comments_and_read_past_options() -> None:
    entries = one_line_sources(ONE_LINE)
    assert entries == [
        Source(("deb-src",), ("http://sources.example/debian",), ("bookworm",)),
        Source(("deb",), ("http://mirror.example/debian/",), ("bookworm",)),
        Source(("deb",), ("http://mirror.example/debian-security",), ("bookworm-security",)),
    ]
    assert debian_archive(entries) == "http://mirror.example/debian"


@pytest.mark.parametrize(
    "line",
    [
        "deb-src http://mirror.example/debian bookworm main",
        "deb http://security.example/debian-security bookworm-security main",
        "deb http://security.example/debian buster/updates main",
        "deb https://vendor.example/apt cloud-sdk-bookworm main",
        "deb file:/srv/debian bookworm main",
    ],
)
def test_not_the_debian_archive(line: str) -> None:
    assert debian_archive(one_line_sources(line)) is None


def test_sources_list_comes_before_sources_list_d_and_its_files_by_name(tmp_path: Path) -> None:
    root = apt_dir(
        tmp_path,
        {
            "sources.list": "deb http://main-list.example/debian trixie main\n",
            "sources.list.d/a.sources": "Types: deb\nURIs: http://a.example/debian\nSuites: trixie\n",
        },
    )
    assert debian_mirror(root) == "http://main-list.example/debian"
    (root / "sources.list").unlink()
    (root / "sources.list.d/0.list").write_text("deb http://zero.example/debian trixie main\n")
    assert debian_mirror(root) == "http://zero.example/debian"
    # Files apt does not read do not count.
    (root / "sources.list.d/0.list").rename(root / "sources.list.d/0.list.disabled")
    assert debian_mirror(root) == "http://a.example/debian"


def test_no_debian_archive_is_an_error_naming_where_it_looked(tmp_path: Path) -> None:
    root = apt_dir(tmp_path, {"sources.list.d/vendor.list": "deb https://vendor.example/apt stable main\n"})
    with pytest.raises(LocalEnvError, match=r"^no Debian mirror found in .*/sources\.list or .*/sources\.list\.d; "):
        debian_mirror(root)
    with pytest.raises(LocalEnvError, match="no Debian mirror found"):
        debian_mirror(tmp_path / "missing")


def test_the_shell_scripts_get_the_same_mirror_as_the_python_code() -> None:
    """hack/lib/common.sh's debian_mirror runs this module: one answer for every consumer."""
    try:
        expected = debian_mirror()
    except LocalEnvError:
        expected = ""
    require(bool(expected), "this machine's apt sources name no Debian archive")
    script = f"source {REPO_ROOT}/hack/lib/common.sh && debian_mirror"
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout == expected + "\n"

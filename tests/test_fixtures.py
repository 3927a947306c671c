"""The suite's own ground: the reference fixtures cannot drift silently, and a reference package
that does not import fails the suite instead of skipping it."""

import hashlib

from conftest import FIXTURES, ROOT


def test_fixtures_match_their_recorded_sha256():
    """tests/fixtures/SHA256SUMS (`sha256sum -c SHA256SUMS` in that folder) lists every file."""
    recorded = {}
    for line in (FIXTURES / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        recorded[name] = digest
    found = {
        path.relative_to(FIXTURES).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(FIXTURES.rglob("*"))
        if path.is_file() and path.name not in ("README.md", "SHA256SUMS")
    }
    assert sorted(found) == sorted(recorded)
    changed = [name for name in found if found[name] != recorded[name]]
    assert not changed, f"fixtures changed since SHA256SUMS was written: {changed}"


def test_no_test_skips_when_a_reference_package_is_missing():
    """torch (pinned), diffusers and transformers are in the test extra: without them the
    parity tests must fail, not pass by skipping."""
    skipping = [
        path.name
        for path in sorted((ROOT / "tests").glob("*.py"))
        if "importorskip" in path.read_text() and path.name != "test_fixtures.py"
    ]
    assert skipping == []

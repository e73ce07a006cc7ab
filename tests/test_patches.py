"""The patch series as CI checks it (scripts/check_patches.py): each patch a mail with a message that says why, the
whole series applying in order to the pinned sdist's llama.cpp; a fixture series with a message-less patch, or
with a patch that no longer applies, fails and names the patch."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import check_patches  # noqa: E402

PATCHES = ROOT / "patches"


def run(directory: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "check_patches.py"), "--patches", str(directory)],
                          capture_output=True, text=True, timeout=300)


def test_the_project_series_passes():
    r = run(PATCHES)
    assert r.returncode == 0, r.stderr
    assert f"{len(check_patches.series(PATCHES))} patches" in r.stdout


@pytest.fixture
def fixture_series(tmp_path) -> Path:
    out = tmp_path / "patches"
    shutil.copytree(PATCHES, out)
    return out


def _last_generic(directory: Path) -> Path:
    # a small generic patch: the edit below must hit its message and one of its hunks
    return next(p for p in check_patches.series(directory) if "vulkan-build-against" in p.name)


def test_a_patch_without_a_message_fails(fixture_series):
    p = _last_generic(fixture_series)
    head, _, rest = p.read_text().partition("\n\n")
    _, sep, diff = rest.partition("\n---\n")
    p.write_text(head + "\n\nSigned-off-by: someone <a@b>\n" + sep + diff)
    r = run(fixture_series)
    assert r.returncode == 1
    assert p.name in r.stderr and "no message" in r.stderr


def test_a_diff_without_a_mail_header_fails(fixture_series):
    p = _last_generic(fixture_series)
    text = p.read_text()
    p.write_text(text[text.index("diff --git"):])  # a bare `git diff`, as the series once was
    r = run(fixture_series)
    assert r.returncode == 1
    assert f"{p.name}: is not git format-patch output" in r.stderr


def test_a_patch_that_no_longer_applies_fails(fixture_series):
    p = _last_generic(fixture_series)
    text = p.read_text()
    # a context line the pinned tree does not have: the hunk no longer applies
    first = text.index("\n@@ ")
    line = text.index("\n ", first + 1)
    p.write_text(text[:line + 2] + "upstream moved this line " + text[line + 2:])
    r = run(fixture_series)
    assert r.returncode == 1
    assert f"{p.name}: does not apply" in r.stderr


def test_message_check_reads_subject_and_body():
    ok = "From 0 Mon Sep 17 00:00:00 2001\nFrom: a <a@b>\nSubject: [PATCH] x: y\n\nWhy it is.\n---\n f | 1 +\n"
    assert check_patches.message_problem(ok) is None
    assert "no subject" in check_patches.message_problem(ok.replace("Subject: [PATCH] x: y", "Subject: [PATCH]"))
    assert "no author" in check_patches.message_problem(ok.replace("From: a <a@b>", "From: "))

"""`dglocal serve` refuses options it would start with and then fail every request on, or silently ignore, before it
resolves or loads the model: one error line, exit 1."""

from __future__ import annotations

import time

import pytest

from test_cli import piped

pytestmark = pytest.mark.backend


def refused(*args) -> str:
    t0 = time.monotonic()
    out = piped("serve", *args, "--host", "192.0.2.1")  # not this machine's address: the checks come first
    assert time.monotonic() - t0 < 60
    assert out.returncode == 1 and len(out.stderr.splitlines()) == 1, (out.returncode, out.stderr[-2000:])
    return out.stderr.strip()


@pytest.mark.parametrize("args, message", [
    (("--queue", "0"), "error: --queue must be in 1..1000000, got 0"),  # every request answered 503
    (("--queue", "-1"), "error: --queue must be in 1..1000000, got -1"),
    (("--api-key", ""), "error: --api-key is empty: give a key, or leave the option out to serve without one"),
    (("--api-key", "  "), "error: --api-key is empty"),  # both turned authentication off
    (("--api-key", "abc\ndef"), "error: --api-key has '\\n' (U+000A) at character 4: a key is printable ASCII"),
    (("--api-key", "k\x7fey"), "error: --api-key has '\\x7f' (U+007F) at character 2"),
    (("--api-key", "clé"), "error: --api-key has 'é' (U+00E9) at character 3"),
    (("--api-key", "key "), "error: --api-key starts or ends with a space"),
    (("--image-files", "{tmp}"), "error: --image-files lets requests name image files: it needs the vision tower"),
    (("--image-files", "{tmp}/absent", "--mmproj", "{tmp}/mmproj.gguf"), "error: --image-files {tmp}/absent: no such "
                                                                          "directory"),
    (("--image-files", "{tmp}/file.png", "--mmproj", "{tmp}/mmproj.gguf"), "error: --image-files {tmp}/file.png: not a "
                                                                            "directory"),
], ids=["queue 0", "queue -1", "empty key", "blank key", "newline", "DEL", "non-ASCII", "trailing space",
        "no mmproj", "absent", "a file"])
def test_bad_serve_options_are_refused_before_the_model(tiny_f32_gguf, tmp_path, args, message):
    (tmp_path / "file.png").write_bytes(b"\x89PNG")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    message = message.replace("{tmp}", str(tmp_path))
    assert refused(tiny_f32_gguf, *args).startswith(message)
    # a model path that does not exist: the same error, so the check came before the model was even looked for
    assert refused(tmp_path / "absent.gguf", *args).startswith(message)

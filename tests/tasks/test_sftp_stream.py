"""tasks.sftp's request stream against a real OpenSSH sftp-server run locally (over its stdin and
stdout, as `ssh -s ... sftp` gives it): answers in order, never more in flight than allowed,
drawn as answers come, and every answer read even when some are refusals."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tasks import sftp

SERVER = next((p for p in ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server",
                           "/usr/libexec/sftp-server") if os.path.exists(p)), None)
pytestmark = pytest.mark.skipif(SERVER is None or shutil.which("ssh") is None,
                                reason="needs OpenSSH's sftp-server: apt-get install openssh-server")


@pytest.fixture
def session():
    s = sftp.Session([SERVER])
    yield s
    s.close()


def test_a_stream_writes_in_order_with_a_bounded_window_and_draws_after_each_answer(session, tmp_path):
    target = tmp_path / "big.bin"
    blocks = [os.urandom(32 * 1024) for _ in range(300)]
    h, = session.run([sftp.open_write(str(target), 0o600)])
    assert h.ok
    drawn, answered = [], []

    def requests():
        for i, block in enumerate(blocks):
            # What the caller learned from the answers so far shapes what it draws next.
            assert len(drawn) - len(answered) <= sftp.MAX_INFLIGHT
            drawn.append(i)
            yield sftp.write(h.data, i * len(block), block), i

    for tag, reply in session.stream(requests()):
        assert reply.ok and tag == len(answered)  # in the requests' order
        answered.append(tag)
    assert answered == list(range(len(blocks)))
    session.run([sftp.close(h.data)])
    assert target.read_bytes() == b"".join(blocks)


def test_refusals_in_a_stream_are_answered_and_the_session_goes_on(session, tmp_path):
    (tmp_path / "ro").mkdir()
    h, = session.run([sftp.open_write(str(tmp_path / "ok.bin"), 0o600)])
    reqs = [(sftp.write(h.data, 0, b"a"), "write"), (sftp.lstat(str(tmp_path / "missing")), "missing"),
            (sftp.write(b"no-such-handle", 0, b"x"), "bad handle"), (sftp.write(h.data, 1, b"b"), "write")]
    got = [(tag, reply.ok) for tag, reply in session.stream(iter(reqs))]
    assert got == [("write", True), ("missing", False), ("bad handle", False), ("write", True)]
    closed, = session.run([sftp.close(h.data)])  # nothing was left unread on the session
    assert closed.ok and (tmp_path / "ok.bin").read_bytes() == b"ab"
    assert list(session.stream(iter([]))) == []

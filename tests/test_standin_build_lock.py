"""The stand-in image build lock must not deadlock pyinfra's greenlets (CI hung on it once).

pyinfra runs every host's deploy code in gevent greenlets of one process; two GPU hosts asked
for the image at once, one blocked in ``flock`` while the other waited for its mmdebstrap child.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.conftest import PROJECT

SCRIPT = textwrap.dedent(
    """
    from gevent import monkey

    monkey.patch_all()

    import subprocess
    import sys
    import tempfile

    import gevent

    from infra.standin.image import _lock_cooperatively

    path = tempfile.mkstemp()[1]

    def build(name):
        with open(path, "w") as lock:
            _lock_cooperatively(lock, poll_s=0.05)
            # the holder waits for a child process, as the build waits for mmdebstrap
            subprocess.run(["sleep", "0.3"], check=True)
            print(name, flush=True)

    gevent.joinall([gevent.spawn(build, "a"), gevent.spawn(build, "b")], raise_error=True)
    """
)


def test_two_greenlets_building_at_once_both_finish() -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.split()) == ["a", "b"]

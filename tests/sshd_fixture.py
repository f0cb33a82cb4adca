"""A real OpenSSH server on 127.0.0.1 for tests: `sshd` yields a Remote that logs in to it.

Loaded as a plugin (conftest.py: pytest_plugins = ["tests.sshd_fixture"]). The server runs as the
current user with throwaway host and client keys in a temp dir, so nothing in ~/.ssh or
/etc/ssh is read or changed. Skips with its reason where openssh-server is not installed.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.ship.ssh import Remote

SSHD = Path("/usr/sbin/sshd")
START_TIMEOUT_S = 10.0  # sshd listens within ~100 ms; 10 s allows a loaded CI runner
START_ATTEMPTS = 3  # another process may take the free port between our probe and sshd's bind


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remote]:
    """Start sshd on a free port of 127.0.0.1 and yield a Remote (key, known_hosts, workdir set)."""
    # 1) check the binaries   2) keys and config   3) start and wait   4) yield   5) stop
    if not SSHD.exists():
        pytest.skip("openssh-server not installed: apt-get install openssh-server")
    for tool in ("ssh", "scp", "ssh-keygen"):
        if shutil.which(tool) is None:
            pytest.skip(f"`{tool}` not installed: apt-get install openssh-client")

    tmp = tmp_path_factory.mktemp("sshd")
    host_key, client_key = tmp / "host_ed25519", tmp / "client_ed25519"
    keygen(host_key)
    keygen(client_key)
    (tmp / "authorized_keys").write_text(client_key.with_suffix(".pub").read_text())
    if os.geteuid() == 0:
        # sshd started by root chroots its pre-auth child into /run/sshd and refuses to start
        # without it; the Debian package creates it only when its service starts.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)

    proc, port = _start(tmp, host_key)
    known_hosts = tmp / "known_hosts"
    key_type, key_b64 = host_key.with_suffix(".pub").read_text().split()[:2]
    known_hosts.write_text(f"[127.0.0.1]:{port} {key_type} {key_b64}\n")
    try:
        yield Remote(
            host="127.0.0.1",
            # The account sshd authenticates; $USER can differ from it (sudo, su, CI env).
            user=pwd.getpwuid(os.getuid()).pw_name,
            port=port,
            identity_file=client_key,
            known_hosts=known_hosts,
            workdir=str(tmp / "remote-work"),  # keep tests out of the real ~/.cache
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def keygen(path: Path) -> None:
    """Write an unencrypted ed25519 key pair at `path` and `path`.pub."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
                   check=True, capture_output=True, timeout=30)


def _start(tmp: Path, host_key: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Start sshd, retrying on a new port if the probed one was taken; return it and its port."""
    log = tmp / "sshd.log"
    for _ in range(START_ATTEMPTS):
        port = _free_port()
        config = tmp / "sshd_config"
        config.write_text(_config(tmp, host_key, port))
        with log.open("ab") as log_file:
            # -D: stay in the foreground so we own the process; -e: log to stderr (the log file).
            proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(config)],
                                    stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file)
        if _wait_listening(proc, port):
            return proc, port
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=5)
        if "Address already in use" not in log.read_text(errors="replace"):
            break
    raise RuntimeError(f"sshd did not start listening within {START_TIMEOUT_S:g} s. Its log "
                       f"({log}):\n{log.read_text(errors='replace')[-3000:]}")


def _config(tmp: Path, host_key: Path, port: int) -> str:
    return "\n".join([
        f"Port {port}",
        "ListenAddress 127.0.0.1",
        f"HostKey {host_key}",
        f"AuthorizedKeysFile {tmp / 'authorized_keys'}",
        f"PidFile {tmp / 'sshd.pid'}",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",
        # The temp dir's parents (e.g. /tmp) are group/world-writable, which StrictModes refuses.
        "StrictModes no",
        # No PAM: a test server needs no session setup, and /etc/pam.d may be absent.
        "UsePAM no",
        # scp from OpenSSH 9.0 on speaks SFTP; internal-sftp needs no sftp-server binary path.
        "Subsystem sftp internal-sftp",
        "PrintMotd no",
        "LogLevel VERBOSE",
        "",
    ])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(proc: subprocess.Popen[bytes], port: int) -> bool:
    """Poll until the port accepts a connection; False if sshd exits or time runs out."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False

"""Run commands on an edge device and copy files to it, over OpenSSH.

We drive the system `ssh` and `scp` binaries rather than a Python SSH library: they honour the
user's ~/.ssh/config (jump hosts, agents) and need no extra dependency. Host keys are always
verified (StrictHostKeyChecking=yes); a device we have not seen before is an error that says how
to trust it, never a silent accept.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import PrivateAttr, ValidationError

from pipeline.config import DeviceSpec

CONNECT_TIMEOUT_S = 10  # a Jetson on the LAN answers in well under a second; 10 s allows Wi-Fi
STDERR_TAIL_CHARS = 2000  # enough for a Python traceback's last frames, short enough to read

PARSE_FORM = "[user@]host[:port], with an IPv6 host in brackets: user@[::1]:2222"
# Remote paths handed to scp must survive both scp protocols: the legacy one (clients before
# OpenSSH 9.0) passes them through the remote shell and the SFTP one expands glob characters.
# Allowing only these characters makes both read the path literally.
_SAFE_REMOTE_PATH = re.compile(r"[A-Za-z0-9._/+@%=,:-]+")
# How ssh reports its own failures (exit code 255) when it could not connect at all.
_CONNECT_FAILURES = ("Connection refused", "timed out", "Could not resolve",
                     "Connection closed", "Connection reset", "kex_exchange_identification")


class RemoteError(RuntimeError):
    """A remote command (or ssh itself) failed; `returncode` is None on a timeout."""

    def __init__(self, message: str, returncode: int | None = None, stderr_tail: str = "") -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr_tail = stderr_tail


class SSHConnectError(RemoteError):
    """ssh could not reach or log in to the device (exit code 255)."""


class HostKeyError(SSHConnectError):
    """The device's host key is unknown or differs from the one in known_hosts."""


class RemoteTimeout(RemoteError):
    """The command ran past its timeout; the local ssh was killed."""


class Remote(DeviceSpec):
    """A DeviceSpec being talked to (pipeline/config.py declares its fields, defaults and checks)."""

    _home: str | None = PrivateAttr(None)  # the remote $HOME, looked up once by resolve_path()

    @classmethod
    def parse(cls, spec: str, **fields: Any) -> Remote:
        """Read `[user@]host[:port]` (the form of PIPELINE_DEVICE); `fields` set the other attributes."""
        m = re.fullmatch(r"(?:([^@\s]+)@)?(\[[^\]\s]+\]|[^@:\[\]\s]+)(?::(\d+))?", spec.strip())
        if not m:
            raise ValueError(f"Cannot read device {spec!r}: expected {PARSE_FORM}.")
        user, host, port = m.group(1), m.group(2).strip("[]"), m.group(3)
        try:
            return cls(host=host, user=user, port=int(port) if port else 22, **fields)
        except ValidationError as e:
            raise ValueError(f"Cannot read device {spec!r}: {reasons(e)}. Expected {PARSE_FORM}.") from None

    def replace(self, **changes: Any) -> Remote:
        """A checked copy with `changes` applied; it looks the remote $HOME up afresh."""
        return type(self).model_validate({**self.model_dump(), **changes})

    @property
    def destination(self) -> str:
        """`user@host` for ssh, or just `host`."""
        return f"{self.user}@{self.host}" if self.user else self.host

    @property
    def known_hosts_name(self) -> str:
        """The name ssh looks this device up by in known_hosts: `host`, or `[host]:port` off port 22."""
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"


def run(
    remote: Remote,
    argv: Sequence[str],
    timeout: float = 300.0,
    cwd: str | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run `argv` on the device and return its output.

    The command line is built with shlex.join, so each element reaches the remote program as one
    literal argument: no element can add shell syntax. `cwd` (may start with `~/`) is entered
    first. A non-zero exit raises RemoteError (or returns, with check=False); ssh's own failures
    raise SSHConnectError or HostKeyError, which say how to fix them; a timeout raises RemoteTimeout.
    """
    if not argv:
        raise ValueError("run() needs a command: pass a non-empty argument list, e.g. ['uname', '-a'].")
    command = shlex.join(argv)
    if cwd is not None:
        command = f"cd -- {shlex.quote(resolve_path(remote, cwd))} && {command}"
    # -T: no terminal, so output is byte-exact; stdin is /dev/null so ssh never waits on ours.
    ssh_argv = ["ssh", "-T", *_ssh_options(remote), "-p", str(remote.port), "--", remote.destination, command]
    proc = _call(remote, ssh_argv, timeout, what=f"`{command}`")
    if check and proc.returncode != 0:
        raise RemoteError(
            f"Command `{command}` on {remote.destination} exited with code {proc.returncode}. "
            f"Its stderr ends with:\n{_tail(proc.stderr)}",
            proc.returncode,
            _tail(proc.stderr),
        )
    return proc


def put(remote: Remote, local_paths: Sequence[str | Path], remote_dir: str, timeout: float = 600.0) -> None:
    """Copy files and directories (recursively) into `remote_dir`, creating it first."""
    if not local_paths:
        raise ValueError("put() needs at least one local path to copy.")
    sources = []
    for p in local_paths:
        path = Path(p)
        if not path.exists():
            raise FileNotFoundError(f"Cannot copy {path} to the device: it does not exist.")
        # Absolute paths begin with '/', so scp never reads a ':' in them as host:path. abspath,
        # not resolve(): a symlink must arrive under its own name, not its target's.
        sources.append(os.path.abspath(path))
    target = resolve_path(remote, remote_dir)
    _check_scp_path(target)
    run(remote, ["mkdir", "-p", "--", target], timeout=timeout)
    _scp(remote, [*sources, _scp_remote(remote, target + "/")], timeout)


def resolve_path(remote: Remote, path: str) -> str:
    """Replace a leading `~` or `~/` with the device's $HOME, looked up once per Remote."""
    if path != "~" and not path.startswith("~/"):
        if path.startswith("~"):
            raise ValueError(f"Remote path {path!r}: only '~' or '~/...' is supported, not '~user'.")
        return path
    if remote._home is None:
        home = run(remote, ["sh", "-c", 'printf %s "$HOME"'], timeout=CONNECT_TIMEOUT_S + 20).stdout
        if not home.startswith("/"):
            raise RemoteError(f"$HOME on {remote.destination} is {home!r}, not an absolute path; "
                              "give the remote path as an absolute path instead of '~/...'.")
        remote._home = home.rstrip("/") or "/"
    return remote._home + path[1:]


def _ssh_options(remote: Remote) -> list[str]:
    """The options ssh and scp share: verified host keys, no prompts, bounded connect."""
    opts = [
        "-o", "BatchMode=yes",  # never prompt for a password or passphrase: fail instead
        "-o", "StrictHostKeyChecking=yes",  # never accept-new, never no: see HostKeyError
        "-o", f"ConnectTimeout={CONNECT_TIMEOUT_S}",
        # Notice a device that reboots or drops off Wi-Fi mid-run within a minute.
        "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4",
    ]
    if remote.known_hosts is not None:
        # An explicit file is the whole trust list: the global one must not vouch for the host.
        opts += ["-o", f"UserKnownHostsFile={_ssh_quote(os.fspath(remote.known_hosts))}",
                 "-o", "GlobalKnownHostsFile=/dev/null"]
    if remote.identity_file is not None:
        # IdentitiesOnly: offer only this key, so agent keys do not use up the server's MaxAuthTries.
        opts += ["-i", os.fspath(remote.identity_file), "-o", "IdentitiesOnly=yes"]
    return opts


def _scp(remote: Remote, args: list[str], timeout: float) -> None:
    """Run scp -r with the shared options; raise on any failure."""
    # -p: keep modes and times, so a copied runner stays executable. No -q: it also silences
    # ssh's host-key messages, which HostKeyError needs (the progress meter is off without a tty).
    argv = ["scp", "-r", "-p", *_ssh_options(remote), "-P", str(remote.port), "--", *args]
    proc = _call(remote, argv, timeout, what="scp " + " ".join(args))
    if proc.returncode != 0:
        raise RemoteError(f"scp {' '.join(args)} failed with code {proc.returncode}. "
                          f"Its stderr ends with:\n{_tail(proc.stderr)}", proc.returncode, _tail(proc.stderr))


def _call(remote: Remote, argv: list[str], timeout: float, what: str) -> subprocess.CompletedProcess[str]:
    """Run ssh or scp locally; turn timeouts and ssh's own failures (code 255) into clear errors."""
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              encoding="utf-8", errors="replace", timeout=timeout)
    except FileNotFoundError:
        raise SSHConnectError(f"`{argv[0]}` is not installed here: apt-get install openssh-client.") from None
    except subprocess.TimeoutExpired as e:
        # The remote process may outlive the killed ssh until it next writes; say so.
        raise RemoteTimeout(f"{what} on {remote.destination} ran past {timeout:g} s; the local ssh was "
                            "killed (the remote process may still be running). Raise the timeout if "
                            "the work is expected to take longer.", None,
                            _tail(_text(e.stderr))) from None
    if proc.returncode == 255:
        _raise_for_ssh_failure(remote, proc.stderr)
    return proc


def _raise_for_ssh_failure(remote: Remote, stderr: str) -> None:
    """Raise HostKeyError or SSHConnectError if ssh itself failed; else return (the command exited 255)."""
    tail = _tail(stderr)
    if "Host key verification failed" in stderr or "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr:
        # The default file is shown unquoted so the shell still expands its '~'.
        kh = "~/.ssh/known_hosts"
        if remote.known_hosts is not None:
            kh = shlex.quote(os.fspath(remote.known_hosts))
        name, port_opt = shlex.quote(remote.known_hosts_name), f"-p {remote.port} " if remote.port != 22 else ""
        changed = "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr
        reason = ("its host key differs from the one in " if changed else "it has no host key in ") + kh
        fix = f"ssh-keygen -R {name} -f {kh} && " if changed else ""
        raise HostKeyError(
            f"Refusing to connect to {remote.known_hosts_name}: {reason}. First compare the key "
            f"out of band (on the device: ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub; here: "
            f"ssh-keyscan {port_opt}{remote.host} | ssh-keygen -lf -). If it matches, trust it with:\n"
            f"  {fix}ssh-keyscan {port_opt}{remote.host} >> {kh}\nssh said:\n{tail}", 255, tail)
    if "Permission denied" in stderr:
        raise SSHConnectError(
            f"{remote.destination} refused our key. Install it on the device with "
            f"`ssh-copy-id -p {remote.port} {remote.destination}`, or set identity_file to the right "
            f"key.\nssh said:\n{tail}", 255, tail)
    if re.search(r"^ssh: ", stderr, re.M) or any(marker in stderr for marker in _CONNECT_FAILURES):
        raise SSHConnectError(
            f"Could not connect to {remote.destination} port {remote.port}: check the device is "
            f"on, reachable, and runs sshd (`ssh -p {remote.port} {remote.destination} true` "
            f"shows the same error).\nssh said:\n{tail}", 255, tail)


def reasons(err: ValidationError) -> str:
    """A pydantic error as one line: 'field: why; field: why'."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'device'}: {e['msg'].removeprefix('Value error, ')}"
                     for e in err.errors())


def _check_scp_path(path: str) -> None:
    if not _SAFE_REMOTE_PATH.fullmatch(path) or path.startswith("-"):
        raise ValueError(f"Remote path {path!r} has characters scp may reinterpret; use only "
                         "letters, digits and . _ - + @ % = , : / in device paths.")


def _scp_remote(remote: Remote, path: str) -> str:
    host = f"[{remote.host}]" if ":" in remote.host else remote.host  # IPv6 needs brackets in scp
    return f"{remote.user}@{host}:{path}" if remote.user else f"{host}:{path}"


def _ssh_quote(value: str) -> str:
    # ssh splits -o values on whitespace; double quotes keep a path with spaces whole.
    return f'"{value}"' if re.search(r"\s", value) else value


def _tail(text: str) -> str:
    return text[-STDERR_TAIL_CHARS:].strip()


def _text(data: bytes | str | None) -> str:
    if isinstance(data, bytes):
        return data.decode("utf-8", errors="replace")
    return data or ""

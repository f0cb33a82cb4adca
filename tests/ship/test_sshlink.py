"""pipeline.ship.ssh against a real OpenSSH server on 127.0.0.1 (the `sshd` fixture), no mocks.

The "device" is this machine, so a test can check the remote side by looking at local files.
"""

from __future__ import annotations

import os
import pwd
import socket
import uuid
from pathlib import Path

import pytest
import yaml

from pipeline.config import PROFILES_DIR, load_profile
from pipeline.errors import ConfigError
from pipeline.ship.ssh import (
    HostKeyError,
    Remote,
    RemoteError,
    RemoteTimeout,
    SSHConnectError,
    _scp,
    put,
    resolve_path,
    run,
)
from tests.sshd_fixture import keygen

# --- Remote.parse: no server needed --------------------------------------------------------------

@pytest.mark.parametrize("spec, host, user, port", [
    ("jetson", "jetson", None, 22),
    ("nvidia@jetson.local", "jetson.local", "nvidia", 22),
    ("nvidia@10.0.0.5:2222", "10.0.0.5", "nvidia", 2222),
    ("jetson-orin:2200", "jetson-orin", None, 2200),
    ("nvidia@[::1]:2222", "::1", "nvidia", 2222),
    ("[fe80::1%eth0]", "fe80::1%eth0", None, 22),
    ("  nvidia@jetson  ", "jetson", "nvidia", 22),
])
def test_parse_accepts(spec: str, host: str, user: str | None, port: int) -> None:
    remote = Remote.parse(spec)
    assert (remote.host, remote.user, remote.port) == (host, user, port)


def test_parse_sets_other_fields() -> None:
    remote = Remote.parse("nvidia@jetson", python="python3.8", known_hosts="/tmp/kh")
    assert (remote.python, remote.known_hosts) == ("python3.8", Path("/tmp/kh"))
    assert remote.workdir == "~/.cache/compress-pipeline"


@pytest.mark.parametrize("spec", [
    "", "nvidia@", "@jetson", "jetson:", "jetson:ssh", "jetson:0", "jetson:70000", "a@b@c",
    "::1",  # IPv6 needs brackets, else the port is ambiguous
    "[::1", "nvidia@jetson:22:33", "jet son", "-oProxyCommand=touch_x", "nvidia@-oProxyCommand=x",
    "-l@jetson", "jetson;reboot", "$(reboot)@jetson",
])
def test_parse_rejects_with_expected_form(spec: str) -> None:
    with pytest.raises(ValueError, match=r"\[user@\]host\[:port\]"):
        Remote.parse(spec)


def test_constructor_rejects_option_like_host() -> None:
    with pytest.raises(ValueError, match="Bad SSH host"):
        Remote(host="-oProxyCommand=touch /tmp/x")


@pytest.mark.parametrize("field, value, why", [
    ("host", "jetson;reboot", "Bad SSH host"), ("host", "jet son", "Bad SSH host"),
    ("host", "-oProxyCommand=touch_x", "Bad SSH host"), ("user", "$(reboot)", "Bad SSH user"),
    ("user", "nvidia nvidia", "Bad SSH user"), ("port", 0, "greater than or equal to 1"),
    ("port", 70000, "less than or equal to 65535"),
])
def test_a_profile_device_with_a_bad_value_fails_at_load(tmp_path: Path, field: str, value, why: str) -> None:
    data = yaml.safe_load((PROFILES_DIR / "jetson.yaml").read_text())
    data["device"] = {"host": "jetson.local", "user": "nvidia", field: value}
    path = tmp_path / "jetson-bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_profile(str(path))
    assert str(path) in str(info.value) and f"device.{field}" in str(info.value) and why in str(info.value)
    data["device"][field] = {"host": "jetson.local", "user": "nvidia", "port": 2222}[field]
    path.write_text(yaml.safe_dump(data))
    assert load_profile(str(path)).device.model_dump()[field] == data["device"][field]


# --- run -----------------------------------------------------------------------------------------

def test_run_returns_stdout(sshd: Remote) -> None:
    proc = run(sshd, ["printf", "%s|", "hello world", "b"], timeout=30)
    assert proc.returncode == 0
    assert proc.stdout == "hello world|b|"


def test_nonzero_exit_raises_remote_error_with_code_and_stderr(sshd: Remote) -> None:
    with pytest.raises(RemoteError) as info:
        run(sshd, ["sh", "-c", "echo 'model not found' >&2; exit 7"], timeout=30)
    assert info.value.returncode == 7
    assert "model not found" in info.value.stderr_tail
    assert not isinstance(info.value, SSHConnectError)


def test_check_false_returns_the_exit_code(sshd: Remote) -> None:
    assert run(sshd, ["sh", "-c", "exit 3"], timeout=30, check=False).returncode == 3


@pytest.mark.parametrize("template", [
    "; touch {m}", "$(touch {m})", "`touch {m}`", "| touch {m}", "&& touch {m}", "\ntouch {m}",
    "' ; touch {m} ; '", "\" ; touch {m} ; \"",
])
def test_argv_is_passed_literally_not_as_shell(sshd: Remote, template: str) -> None:
    marker = Path(f"/tmp/pwned-{uuid.uuid4().hex}")
    payload = template.format(m=marker)
    proc = run(sshd, ["printf", "%s", payload], timeout=30)
    assert proc.stdout == payload
    assert not marker.exists(), f"the remote shell ran injected syntax: {payload!r}"


def test_cwd_with_shell_characters_is_entered_literally(sshd: Remote, tmp_path: Path) -> None:
    # A directory name cannot hold '/', so the marker is relative: the login shell starts in $HOME.
    name = f"pwned-{uuid.uuid4().hex}"
    odd = tmp_path / f"it's a dir; $(touch {name}) `touch {name}`"
    odd.mkdir()
    assert run(sshd, ["pwd"], timeout=30, cwd=str(odd)).stdout.strip() == str(odd)
    assert not (Path(pwd.getpwuid(os.getuid()).pw_dir) / name).exists()
    assert not (odd / name).exists()


def test_missing_cwd_raises(sshd: Remote, tmp_path: Path) -> None:
    with pytest.raises(RemoteError):
        run(sshd, ["true"], timeout=30, cwd=str(tmp_path / "absent"))


def test_timeout_raises_remote_timeout(sshd: Remote) -> None:
    with pytest.raises(RemoteTimeout, match="ran past"):
        run(sshd, ["sleep", "10"], timeout=1.5)


def test_tilde_resolves_to_remote_home(sshd: Remote) -> None:
    remote = sshd.replace()  # a fresh Remote, so its home is looked up here
    home = pwd.getpwuid(os.getuid()).pw_dir.rstrip("/") or "/"
    assert resolve_path(remote, "~") == home
    assert resolve_path(remote, "~/.cache/x") == home + "/.cache/x"
    assert resolve_path(remote, "/abs/path") == "/abs/path"
    with pytest.raises(ValueError, match="~user"):
        resolve_path(remote, "~root/x")


# --- put -----------------------------------------------------------------------------------------

def test_put_copies_a_tree_byte_equal(sshd: Remote, tmp_path: Path) -> None:
    src = tmp_path / "artifacts"
    (src / "sub").mkdir(parents=True)
    (src / "student.onnx").write_bytes(os.urandom(4096))
    (src / "sub" / "config.json").write_text('{"batch": 1}\n')
    (src / "sub" / "runner.py").write_text("print('hi')\n")
    (src / "sub" / "runner.py").chmod(0o755)
    remote_dir = f"{sshd.workdir}/{uuid.uuid4().hex}/deep"  # does not exist yet: put creates it

    put(sshd, [src], remote_dir, timeout=60)

    back = Path(remote_dir) / "artifacts"  # the "device" is this machine
    want = sorted(p.relative_to(src) for p in src.rglob("*"))
    assert sorted(p.relative_to(back) for p in back.rglob("*")) == want
    for rel in want:
        if (src / rel).is_file():
            assert (back / rel).read_bytes() == (src / rel).read_bytes(), rel
    assert os.access(back / "sub" / "runner.py", os.X_OK)


def test_put_single_file(sshd: Remote, tmp_path: Path) -> None:
    f = tmp_path / "result.json"
    f.write_text('{"latency_ms": 3.2}')
    remote_dir = f"{sshd.workdir}/{uuid.uuid4().hex}"
    put(sshd, [f], remote_dir, timeout=60)
    assert (Path(remote_dir) / "result.json").read_text() == '{"latency_ms": 3.2}'


def test_put_symlink_keeps_its_own_name(sshd: Remote, tmp_path: Path) -> None:
    (tmp_path / "model-3f2a.onnx").write_bytes(b"onnx")
    (tmp_path / "student.onnx").symlink_to(tmp_path / "model-3f2a.onnx")
    remote_dir = f"{sshd.workdir}/{uuid.uuid4().hex}"
    put(sshd, [tmp_path / "student.onnx"], remote_dir, timeout=60)
    assert (Path(remote_dir) / "student.onnx").read_bytes() == b"onnx"


def test_scp_rejects_remote_paths_with_shell_characters(sshd: Remote, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="characters scp may reinterpret"):
        put(sshd, [tmp_path], "/tmp/a; touch /tmp/pwned", timeout=60)


# --- host keys and connection failures -------------------------------------------------------------

def test_wrong_host_key_is_refused_with_fix(sshd: Remote, tmp_path: Path) -> None:
    impostor = tmp_path / "impostor"
    keygen(impostor)
    key_type, key_b64 = impostor.with_suffix(".pub").read_text().split()[:2]
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[127.0.0.1]:{sshd.port} {key_type} {key_b64}\n")
    marker = Path(f"/tmp/pwned-{uuid.uuid4().hex}")

    with pytest.raises(HostKeyError) as info:
        run(sshd.replace(known_hosts=wrong), ["touch", str(marker)], timeout=30)
    assert "differs" in str(info.value)
    assert f"ssh-keyscan -p {sshd.port} 127.0.0.1 >> {wrong}" in str(info.value)
    assert not marker.exists(), "the command ran despite the wrong host key"


def test_unknown_host_is_refused_not_accepted(sshd: Remote, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(HostKeyError, match="ssh-keyscan"):
        run(sshd.replace(known_hosts=empty), ["true"], timeout=30)
    assert empty.read_text() == "", "ssh added the unknown key: verification is not strict"


def test_scp_verifies_host_keys_too(sshd: Remote, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    # scp alone (put would fail first in its ssh mkdir): scp's own connection checks the key too
    with pytest.raises(HostKeyError):
        _scp(sshd.replace(known_hosts=empty), [str(empty), f"127.0.0.1:{sshd.workdir}/x"], timeout=30)


def test_known_hosts_path_with_spaces_works(sshd: Remote, tmp_path: Path) -> None:
    spaced = tmp_path / "my keys" / "known hosts"
    spaced.parent.mkdir()
    spaced.write_bytes(Path(sshd.known_hosts or "").read_bytes())
    assert run(sshd.replace(known_hosts=spaced), ["echo", "ok"], timeout=30).stdout == "ok\n"


def test_wrong_client_key_is_refused(sshd: Remote, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger"
    keygen(stranger)
    with pytest.raises(SSHConnectError, match="refused our key"):
        run(sshd.replace(identity_file=stranger), ["true"], timeout=30)


def test_closed_port_raises_connect_error(sshd: Remote) -> None:
    with socket.socket() as s:  # bind, then close: nothing listens there afterwards
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SSHConnectError, match="Could not connect"):
        run(sshd.replace(port=port), ["true"], timeout=30)

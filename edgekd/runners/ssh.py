"""A device reached over SSH with the system ``ssh`` binary: run commands, stream a bundle in.

Host keys are always verified (``StrictHostKeyChecking=yes``, never ``accept-new``) and
``BatchMode=yes`` forbids password prompts, so a deploy either runs unattended against a known
device or stops with a clear error. Copies stream a tar over ssh's stdin (no scp/sftp needed on the
device, only ``tar``). Nothing secret is logged: commands and results name the key *file* at most,
never its contents.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from edgekd.errors import EdgekdError

HOST_KEY_MARKERS = ("Host key verification failed", "No ED25519 host key is known", "No RSA host key is known", "No ECDSA host key is known",
                    "host key is known for", "REMOTE HOST IDENTIFICATION HAS CHANGED")
AUTH_MARKERS = ("Permission denied",)
CONNECT_MARKERS = ("Connection refused", "Connection timed out", "No route to host", "Could not resolve hostname", "Network is unreachable")


@dataclass
class SshDevice:
    """``user@host`` plus how to reach it; ``python`` is the device's interpreter for the runtime."""

    host: str
    port: int = 22
    identity: Path | None = None
    known_hosts: Path | None = None
    python: str = "python3"
    connect_timeout: int = 10
    extra_options: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.host or self.host.startswith("-") or any(c.isspace() for c in self.host):
            raise EdgekdError(f"bad --host '{self.host}'", "write user@device, e.g. jetson@192.168.1.20")
        if self.identity is not None and not Path(self.identity).is_file():
            raise EdgekdError(f"SSH key not found: {self.identity}", "pass --identity PATH to a private key file")
        if self.known_hosts is not None and not Path(self.known_hosts).is_file():
            raise EdgekdError(f"known_hosts file not found: {self.known_hosts}", self.add_key_hint())

    @property
    def hostname(self) -> str:
        return self.host.rsplit("@", 1)[-1]

    def describe(self) -> str:
        return f"{self.host}:{self.port}"

    def options(self) -> list[str]:
        """ssh options that hold for every call: strict host keys, no prompts."""
        opts = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", f"ConnectTimeout={self.connect_timeout}", "-o", "LogLevel=ERROR", "-p", str(self.port)]
        if self.known_hosts is not None:
            opts += ["-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null"]
        if self.identity is not None:
            opts += ["-i", str(self.identity), "-o", "IdentitiesOnly=yes"]
        return opts + list(self.extra_options)

    def add_key_hint(self) -> str:
        kh = self.known_hosts or Path("~/.ssh/known_hosts")
        return (f"add the device's host key: ssh-keyscan -p {self.port} {self.hostname} >> {kh}, then check its fingerprint "
                f"(ssh-keygen -lf {kh}) against `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` run on the device itself")

    def run(self, command: str, stdin: bytes | None = None, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        """Run a shell command on the device; ssh-level failures become clear EdgekdErrors."""
        argv = ["ssh", *self.options(), self.host, command]
        try:
            proc = subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout)
        except FileNotFoundError as exc:
            raise EdgekdError("the ssh client is not installed", "apt-get install openssh-client") from exc
        except subprocess.TimeoutExpired as exc:
            raise EdgekdError(f"command on {self.describe()} did not finish in {timeout:.0f} s", "check the device, or raise the timeout") from exc
        if proc.returncode == 255:
            self._raise_ssh_error(proc.stderr.decode(errors="replace"))
        if check and proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).decode(errors="replace").strip().splitlines()[-5:]
            raise EdgekdError(f"on {self.describe()}: `{command}` failed with exit {proc.returncode}: {' | '.join(tail)}", "run it by hand over ssh to see the full output")
        return proc

    def _raise_ssh_error(self, stderr: str) -> None:
        first = next((ln.strip() for ln in stderr.splitlines() if ln.strip()), "ssh failed")
        if any(m in stderr for m in HOST_KEY_MARKERS):
            changed = "CHANGED" in stderr
            raise EdgekdError(f"host key of {self.describe()} is {'different from the one in known_hosts' if changed else 'unknown'}; refusing to connect", self.add_key_hint())
        if any(m in stderr for m in AUTH_MARKERS):
            raise EdgekdError(f"{self.describe()} refused the login ({first})", "pass --identity with a key listed in the device's ~/.ssh/authorized_keys")
        if any(m in stderr for m in CONNECT_MARKERS):
            raise EdgekdError(f"cannot reach {self.describe()}: {first}", "check the address, --port, and that sshd runs on the device")
        raise EdgekdError(f"ssh to {self.describe()} failed: {first}", "run `ssh -v` by hand to see why")

    def check(self) -> str:
        """Connect once (host key + login) and return the device's ``uname -m``."""
        return self.run("uname -m", timeout=self.connect_timeout + 20).stdout.decode().strip()

    def upload_tar(self, tar_gz: bytes, remote_dir: str, strip_components: int = 0, timeout: float = 600) -> None:
        """Unpack a .tar.gz (bytes) into ``remote_dir`` on the device, replacing what was there."""
        d = shlex.quote(remote_dir)
        strip = f" --strip-components={int(strip_components)}" if strip_components else ""
        self.run(f"rm -rf {d} && mkdir -p {d} && tar -xzf - -C {d} --no-same-owner{strip}", stdin=tar_gz, timeout=timeout)

    def read_file(self, remote_path: str) -> bytes:
        return self.run(f"cat {shlex.quote(remote_path)}").stdout


def device_from_options(host: str, port: int = 22, identity: str | os.PathLike | None = None, known_hosts: str | os.PathLike | None = None,
                        python: str = "python3") -> SshDevice:
    return SshDevice(host, port, Path(identity) if identity else None, Path(known_hosts) if known_hosts else None, python)

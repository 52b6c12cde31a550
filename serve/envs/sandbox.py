"""Per-episode Linux sandboxes for the OS environment (bubblewrap inside a user namespace).

What an episode gets, and what it cannot do:

* **Root filesystem**: a fresh tmpfs of ``disk_mb`` (writes beyond it fail with ENOSPC; nothing is
  written to the host disk), holding a project-made ``/etc`` (Debian's default users and groups,
  the host's tool configuration: alternatives, PAM, login.defs, skel, ...; no host secrets), the
  host's ``/usr`` read-only (the tools: bash, coreutils, python3, useradd, su, find, awk, ...),
  its own ``/proc`` and a minimal ``/dev``. Nothing else of the host is visible.
* **Identity**: root inside a fresh user namespace whose uids 0..65535 map to an unprivileged
  host uid range chosen per episode, so "root" has no power over anything outside (no mknod,
  mount of host devices, ptrace of host processes, writes to /proc/sys); ``useradd``, ``chown``,
  ``su`` work inside.
* **Namespaces**: own PID (the host's processes are invisible; all processes die with the
  episode), network (loopback only: no connection can leave), IPC, UTS (hostname ``sandbox``).
* **Limits**: processes per episode (RLIMIT_NPROC on the mapped uid: fork bombs stop there),
  address space and CPU seconds per process, file size, open files; every agent command has a
  wall-clock timeout after which its process group is killed and the shell restarts.

Start-up is ~0.1 s (no image to pull): the template (``/etc``, executor, shim) is built once per
machine and user and cached in the temp directory, keyed by its content.
Requires ``bwrap`` (Debian: bubblewrap), user namespaces, and root (mapping a whole uid range
needs CAP_SETUID in the parent namespace; CI runs as root); ``SandboxUnavailable`` says why not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

log = logging.getLogger(__name__)

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/.sandbox/bin"
# Copied from the host's /etc into the template: tool configuration, no credentials or keys.
ETC_ALLOW = ("alternatives", "bash.bashrc", "profile", "profile.d", "skel", "login.defs",
             "default", "pam.d", "pam.conf", "security", "nsswitch.conf", "shells", "ld.so.cache",
             "ld.so.conf", "ld.so.conf.d", "localtime", "timezone", "debian_version", "os-release",
             "issue", "adduser.conf", "deluser.conf", "inputrc", "environment", "python3",
             "python3.11", "mime.types", "magic", "ethertypes", "protocols", "services")

SUDO_SHIM = r"""#!/bin/bash
# sudo inside the sandbox: root needs no elevation, and a setuid sudo cannot work in a user
# namespace. Runs the command (as -u USER via su); other users are refused like a bad password.
user=root
while [ $# -gt 0 ]; do
  case "$1" in
    -u) user="$2"; shift 2 ;;
    --) shift; break ;;
    -*) shift ;;
    *) break ;;
  esac
done
if [ "$(id -u)" != 0 ]; then echo "sudo: a password is required" >&2; exit 1; fi
[ $# -eq 0 ] && exec bash --login
if [ "$user" != root ]; then exec su -s /bin/bash "$user" -c "$(printf '%q ' "$@")"; fi
exec "$@"
"""


# Runs in a fresh interpreter: enter a new user namespace, wait for the parent to write the
# uid/gid maps (only a privileged parent can map a whole range), become root there, exec bwrap.
_HELPER = """
import ctypes, os, resource, sys
sync_w, go_r, nproc = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x10000000) != 0:
    sys.stderr.write("unshare(CLONE_NEWUSER) failed: errno %d\\n" % ctypes.get_errno())
    os._exit(97)
os.write(sync_w, b"u")
if os.read(go_r, 1) != b"g":
    os._exit(98)
os.setgid(0)
os.setgroups([])
os.setuid(0)
resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
os.close(sync_w)
os.close(go_r)
os.execv(sys.argv[4], sys.argv[4:])  # absolute path: no imports after setuid
"""


class SandboxUnavailable(RuntimeError):
    """The machine cannot run sandboxes (no bwrap, no user namespaces)."""


class SandboxBroken(RuntimeError):
    """A running sandbox stopped answering (its executor died or was killed)."""


@dataclass
class SandboxLimits:
    disk_mb: int = 128  # size of the root tmpfs
    memory_mb: int = 1024  # address space per process
    nproc: int = 256  # processes of the sandbox's root user
    cpu_s: int = 120  # CPU seconds per process
    fsize_mb: int = 128  # largest file
    nofile: int = 1024

    def rlimits(self) -> Dict[str, int]:
        mb = 1024 * 1024
        return {"RLIMIT_AS": self.memory_mb * mb, "RLIMIT_CPU": self.cpu_s,
                "RLIMIT_FSIZE": self.fsize_mb * mb, "RLIMIT_NOFILE": self.nofile}


def _passwd_files(etc: str) -> None:
    """Debian's default users and groups (base-passwd), with locked passwords."""
    users = _read_master("passwd") or ["root:x:0:0:root:/root:/bin/bash",
                                       "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin"]
    groups = _read_master("group") or ["root:x:0:", "sudo:x:27:", "nogroup:x:65534:"]
    users = [u.replace(":*:", ":x:", 1) for u in users]
    groups = [g.replace(":*:", ":x:", 1) for g in groups]
    files = {
        "passwd": users, "group": groups,
        "shadow": [f"{u.split(':')[0]}:*:19700:0:99999:7:::" for u in users],
        "gshadow": [f"{g.split(':')[0]}:*::" for g in groups],
        "subuid": [], "subgid": [], "hostname": ["sandbox"], "resolv.conf": [],
        "hosts": ["127.0.0.1\tlocalhost sandbox", "::1\tlocalhost ip6-localhost ip6-loopback"],
        "sudoers": ["root\tALL=(ALL:ALL) ALL", "%sudo\tALL=(ALL:ALL) ALL"],
    }
    for name, lines in files.items():
        with open(os.path.join(etc, name), "w") as f:
            f.write("".join(line + "\n" for line in lines))
    for name in ("shadow", "gshadow", "sudoers"):
        os.chmod(os.path.join(etc, name), 0o440 if name == "sudoers" else 0o640)
    os.symlink("../proc/self/mounts", os.path.join(etc, "mtab"))


def _read_master(kind: str) -> List[str]:
    try:
        with open(f"/usr/share/base-passwd/{kind}.master") as f:
            return [line.rstrip("\n") for line in f if line.strip()]
    except OSError:
        return []


def build_template(root: str) -> str:
    """The read-only part every sandbox starts from: /etc, the executor, the sudo shim."""
    etc = os.path.join(root, "etc")
    os.makedirs(etc)
    for name in ETC_ALLOW:
        src = os.path.join("/etc", name)
        dst = os.path.join(etc, name)
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        elif os.path.isdir(src):
            shutil.copytree(src, dst, symlinks=True, ignore_dangling_symlinks=True)
        elif os.path.isfile(src):
            shutil.copy(src, dst)
    _passwd_files(etc)
    os.makedirs(os.path.join(etc, "profile.d"), exist_ok=True)
    with open(os.path.join(etc, "profile.d", "zz-sandbox.sh"), "w") as f:
        f.write('PATH="$PATH:/.sandbox/bin"\n')  # login shells reset PATH; keep the sudo shim
    shutil.copy(os.path.join(os.path.dirname(__file__), "sandbox_executor.py"),
                os.path.join(root, "executor.py"))
    os.makedirs(os.path.join(root, "bin"))
    shim = os.path.join(root, "bin", "sudo")
    with open(shim, "w") as f:
        f.write(SUDO_SHIM)
    os.chmod(shim, 0o755)
    # Everything world-readable: the sandbox's root is a mapped uid, not the files' owner. The
    # executor restores the modes of the secret-looking files after copying (SECRET_MODES).
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames:
            os.chmod(os.path.join(dirpath, n), 0o755)
        for n in filenames:
            p = os.path.join(dirpath, n)
            if not os.path.islink(p):
                os.chmod(p, os.stat(p).st_mode | 0o444)
    os.chmod(root, 0o755)
    return root


def sandbox_python() -> Optional[str]:
    """The interpreter the executor runs with: it must live under /usr (the only host tree the
    sandbox sees); Debian's /usr/bin/python3 or, in python:3.x images, /usr/local/bin/python3."""
    for cand in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(cand):
            return cand
    return None


_template_lock = threading.Lock()
_template: Optional[str] = None


def _template_key() -> str:
    """Changes when the executor, the shim or the host's copied /etc entries change."""
    h = hashlib.sha1()
    with open(os.path.join(os.path.dirname(__file__), "sandbox_executor.py"), "rb") as f:
        h.update(f.read())
    h.update(SUDO_SHIM.encode())
    for name in ETC_ALLOW + ("../usr/share/base-passwd/passwd.master", "../usr/share/base-passwd/group.master"):
        try:
            st = os.lstat(os.path.join("/etc", name))
            h.update(f"{name}:{st.st_mtime_ns}:{st.st_size};".encode())
        except OSError:
            h.update(f"{name}:-;".encode())
    return h.hexdigest()[:16]


def _trusted(path: str) -> bool:
    st = os.lstat(path)
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022 and not os.path.islink(path)


def template_dir() -> str:
    """The template, built once per machine and user into the temp directory and kept there as a
    cache (~1 MB; a process killed without cleanup leaves nothing new behind)."""
    global _template
    with _template_lock:
        if _template is None:
            if not shutil.which("bwrap"):
                raise SandboxUnavailable("bubblewrap is not installed (apt-get install bubblewrap)")
            if not sandbox_python():
                raise SandboxUnavailable("a python3 under /usr (/usr/bin or /usr/local/bin) is "
                                         "needed inside the sandbox")
            final = os.path.join(tempfile.gettempdir(), f"agt-sandbox-{os.geteuid()}-{_template_key()}")
            if os.path.exists(final) and not _trusted(final):  # someone else's dir: don't use it
                final = os.path.join(tempfile.mkdtemp(prefix="agt-sandbox-private-"), "root")
            if not os.path.isfile(os.path.join(final, "executor.py")):
                tmp = tempfile.mkdtemp(prefix="agt-sandbox-build-")
                build_template(os.path.join(tmp, "root"))
                try:
                    os.rename(os.path.join(tmp, "root"), final)  # atomic; a concurrent build may win
                except OSError:
                    pass
                shutil.rmtree(tmp, ignore_errors=True)
            _template = final
        return _template


def _bwrap_argv(template: str, limits: SandboxLimits) -> List[str]:
    argv = [shutil.which("bwrap") or "/usr/bin/bwrap", "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-net",
            "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try", "--hostname", "sandbox",
            "--size", str(limits.disk_mb * 1024 * 1024), "--tmpfs", "/",
            "--ro-bind", "/usr", "/usr"]
    for top in ("bin", "sbin", "lib", "lib64", "lib32", "libx32"):
        host = "/" + top
        if os.path.islink(host):
            argv += ["--symlink", os.readlink(host), host]
        elif os.path.isdir(host):
            argv += ["--ro-bind", host, host]
    argv += ["--proc", "/proc", "--dev", "/dev", "--ro-bind", template, "/.sandbox",
             "--chdir", "/", "--clearenv", "--setenv", "PATH", PATH, "--setenv", "HOME", "/root",
             "--setenv", "USER", "root", "--setenv", "LANG", "C.UTF-8", "--setenv", "TERM", "dumb",
             "--setenv", "AGT_LIMITS", json.dumps(limits.rlimits()),
             sandbox_python() or "/usr/bin/python3", "-I", "-S", "/.sandbox/executor.py"]
    return argv


class Sandbox:
    """One running sandbox. Not thread-safe: one episode drives it."""

    def __init__(self, limits: Optional[SandboxLimits] = None, start_timeout: float = 20.0) -> None:
        self.limits = limits or SandboxLimits()
        argv = _bwrap_argv(template_dir(), self.limits)
        uid_base = (1 << 20) + random.randrange(60000) * 65536  # per-episode unprivileged range
        self._stderr = tempfile.TemporaryFile()
        in_r, self._in = os.pipe()
        self._out, out_w = os.pipe()
        sync_r, sync_w = os.pipe()  # child -> parent: "user namespace created"
        go_r, go_w = os.pipe()  # parent -> child: "uid map written"
        # A fresh helper process (not os.fork: forking a process that runs gRPC/Ray threads can
        # leave the child multi-threaded, and unshare(CLONE_NEWUSER) then fails with EINVAL).
        try:
            proc = subprocess.Popen(
                [sys.executable, "-S", "-c", _HELPER, str(sync_w), str(go_r), str(self.limits.nproc), *argv],
                stdin=in_r, stdout=out_w, stderr=self._stderr, pass_fds=(sync_w, go_r), close_fds=True)
        except OSError as exc:
            raise SandboxUnavailable(f"cannot start the sandbox helper: {exc}") from None
        pid, self.proc = proc.pid, proc
        self.pid, self._buf = pid, b""
        for fd in (in_r, out_w, sync_w, go_r):
            os.close(fd)
        try:
            ready, _, _ = select.select([sync_r], [], [], start_timeout)
            if not ready or os.read(sync_r, 1) != b"u":
                try:
                    proc.wait(timeout=1.0)  # let the helper finish writing its error
                except subprocess.TimeoutExpired:
                    pass
                raise SandboxUnavailable(f"cannot create a user namespace: {self._stderr_text()}")
            try:
                for name in ("uid_map", "gid_map"):
                    with open(f"/proc/{pid}/{name}", "w") as f:
                        f.write(f"0 {uid_base} 65536\n")
            except OSError as exc:
                raise SandboxUnavailable(f"cannot map uids into the sandbox (needs root): {exc}") from None
            os.write(go_w, b"g")
            try:
                hello = self._reply(start_timeout)
            except SandboxBroken:
                time.sleep(0.3)  # let the child finish writing its error
                raise SandboxUnavailable(f"sandbox did not start: {self._stderr_text()}") from None
            if not hello.get("ready"):
                raise SandboxUnavailable(f"sandbox did not start: {hello}")
        except BaseException:
            self.close()
            raise
        finally:
            os.close(sync_r)
            os.close(go_w)

    def _stderr_text(self) -> str:
        try:
            self._stderr.seek(0)
            return self._stderr.read(4000).decode("utf-8", "replace").strip() or "(no message)"
        except (OSError, ValueError):
            return "(no message)"

    def _reply(self, timeout: float) -> Dict[str, Any]:
        deadline = time.monotonic() + timeout
        buf = self._buf
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._out], [], [], max(0.0, left))
            chunk = os.read(self._out, 1 << 20) if ready else b""
            if not chunk:
                raise SandboxBroken(f"the sandbox stopped answering: {self._stderr_text()}")
            buf += chunk
        line, _, self._buf = buf.partition(b"\n")
        return json.loads(line)

    def _call(self, req: Dict[str, Any], timeout: float) -> Dict[str, Any]:
        if self.pid is None:
            raise SandboxBroken("the sandbox is closed")
        try:
            os.write(self._in, (json.dumps(req) + "\n").encode())
        except OSError as exc:
            raise SandboxBroken(f"the sandbox is gone: {exc}") from None
        rep = self._reply(timeout + 10.0)
        if "error" in rep:
            raise SandboxBroken(f"sandbox executor error: {rep['error']}")
        return rep

    def shell(self, cmd: str, timeout: float = 10.0) -> Dict[str, Any]:
        """Run ``cmd`` in the persistent agent shell: {output, rc, timed_out[, restarted]}."""
        return self._call({"op": "shell", "cmd": cmd, "timeout": timeout}, timeout)

    def run(self, cmd: str, timeout: float = 30.0, args: Sequence[str] = (), lang: str = "bash") -> Dict[str, Any]:
        """Run an independent script (init, example, checker): {output, stderr, rc, timed_out}."""
        return self._call({"op": "run", "cmd": cmd, "timeout": timeout, "args": list(args),
                           "lang": lang}, timeout)

    def start(self, cmd: str) -> None:
        """Start a background process (the task's ``start`` program)."""
        self._call({"op": "start", "cmd": cmd}, 5.0)

    def alive(self) -> bool:
        return self.pid is not None and self.proc.poll() is None

    def close(self) -> None:
        """Stop every process of the sandbox and free its memory. Idempotent."""
        pid, self.pid = getattr(self, "pid", None), None
        for fd in ("_in", "_out"):
            f = getattr(self, fd, None)
            if f is not None:
                try:
                    os.close(f)
                except OSError:
                    pass
                setattr(self, fd, None)
        proc = getattr(self, "proc", None)
        if pid and proc is not None:
            try:
                proc.wait(timeout=2.0)  # the executor exits on stdin EOF; the namespace dies with it
            except subprocess.TimeoutExpired:
                proc.kill()  # bwrap; its PID namespace dies with it
                proc.wait()
        self._stderr.close()

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

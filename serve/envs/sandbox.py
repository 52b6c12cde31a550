"""Per-episode Linux sandboxes for the OS environment (bubblewrap inside a user namespace).

What an episode gets, and what it cannot do:

* **Root filesystem**: a fresh tmpfs of ``disk_mb`` (writes beyond it fail with ENOSPC; nothing is
  written to the host disk), holding a project-made ``/etc`` (Debian's default users and groups,
  the host's tool configuration: alternatives, PAM, login.defs, skel, ...; no host secrets), the
  host's ``/usr`` under a copy-on-write overlay (the tools: bash, coreutils, python3, useradd, su,
  find, awk, ...; new files anywhere in /usr land in a second tmpfs of ``disk_mb``; see
  sandbox_executor.py for what stays read-only), its own ``/proc`` and a minimal ``/dev``.
  Nothing else of the host is visible.
* **Identity**: root inside a fresh user namespace. Which host ids back the inside ids depends on
  the mode (serve/envs/sandbox_idmap.py): as root, uids 0..65535 map to an unprivileged host range
  chosen per episode; without root, the caller's uid plus its ``/etc/subuid`` range via
  ``newuidmap`` (rootless podman's way); failing both, a single uid (no other users inside).
  Either way "root" has no power over anything outside (no mknod, mount of host devices, ptrace
  of host processes, writes to /proc/sys); with more than one uid ``useradd``, ``chown``, ``su``
  work inside.
* **Namespaces**: own PID (the host's processes are invisible; all processes die with the
  episode), network (loopback only: no connection can leave), IPC, UTS (hostname ``sandbox``).
* **Limits**: processes per episode (RLIMIT_NPROC of the sandbox's root, counted per user
  namespace on kernels >= 5.14: fork bombs stop there), address space and CPU seconds per
  process, file size, open files; every agent command has a wall-clock timeout after which its
  process group is killed and the shell restarts.

Start-up is ~0.1 s (no image to pull): the template (``/etc``, executor, shim) is built once per
machine and user and cached in the temp directory, keyed by its content.
Requires ``bwrap`` (Debian: bubblewrap) and user namespaces (``SandboxUnavailable`` says why not);
root, or ``newuidmap``/``newgidmap`` with a /etc/subuid range, for more than one uid inside.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import select
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

from serve.envs import sandbox_idmap as idmap

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


def _unreadable(folder: str, names: List[str]) -> List[str]:
    """copytree filter: what this (maybe unprivileged) user cannot read is left out."""
    return [n for n in names if not os.path.islink(os.path.join(folder, n))
            and not os.access(os.path.join(folder, n), os.R_OK)]


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
            shutil.copytree(src, dst, symlinks=True, ignore_dangling_symlinks=True,
                            ignore=_unreadable)
        elif os.path.isfile(src) and os.access(src, os.R_OK):
            shutil.copy(src, dst)
    _passwd_files(etc)
    os.makedirs(os.path.join(etc, "profile.d"), exist_ok=True)
    with open(os.path.join(etc, "profile.d", "zz-sandbox.sh"), "w") as f:
        f.write('PATH="$PATH:/.sandbox/bin"\n')  # login shells reset PATH; keep the sudo shim
    shutil.copy(os.path.join(os.path.dirname(__file__), "sandbox_executor.py"),
                os.path.join(root, "executor.py"))
    with open(os.path.join(root, "hidden.json"), "w") as f:
        json.dump(unreadable_dirs("/usr"), f)
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


def unreadable_dirs(top: str) -> List[str]:
    """Directories under ``top`` that other users cannot list or enter (e.g. polkit's 0700
    rules.d): inside, host files belong to an unmapped user, so the sandbox's root is "other"
    there. The sandbox covers them with empty directories."""
    out: List[str] = []
    for dirpath, dirnames, _ in os.walk(top, onerror=lambda e: None):
        for name in list(dirnames):
            path = os.path.join(dirpath, name)
            try:
                mode = os.lstat(path).st_mode
            except OSError:
                continue
            if mode & 0o005 != 0o005:
                out.append(path)
                dirnames.remove(name)
    return out


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
    # dpkg's status changes with every package install: /usr's unreadable directories are
    # listed again then.
    for name in ETC_ALLOW + ("../usr/share/base-passwd/passwd.master", "../usr/share/base-passwd/group.master",
                             "../var/lib/dpkg/status"):
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


def _bwrap_argv(template: str, limits: SandboxLimits, writable: Sequence[str] = (),
                workdir: str = "/") -> List[str]:
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
    try:
        with open(os.path.join(template, "hidden.json")) as f:
            hidden = json.load(f)
    except (OSError, ValueError):
        hidden = []
    config = {"limits": limits.rlimits(), "usr_mb": limits.disk_mb, "writable": list(writable),
              "hidden": hidden, "workdir": workdir}
    # Working directory "/" like AgentBench's containers (the ubuntu image sets no WORKDIR).
    argv += ["--proc", "/proc", "--dev", "/dev", "--ro-bind", template, "/.sandbox",
             "--chdir", "/", "--clearenv", "--setenv", "PATH", PATH, "--setenv", "HOME", "/root",
             "--setenv", "USER", "root", "--setenv", "LANG", "C.UTF-8", "--setenv", "TERM", "dumb",
             "--setenv", "AGT_CONFIG", json.dumps(config),
             sandbox_python() or "/usr/bin/python3", "-I", "-S", "/.sandbox/executor.py"]
    return argv


class Sandbox:
    """One running sandbox. Not thread-safe: one episode drives it.

    ``uid_mode``: auto | range | subid | single (serve/envs/sandbox_idmap.py). ``writable``:
    files under /usr that must be changeable inside (copied into the overlay's upper layer,
    since host files appear owned by an unmapped user there). ``workdir``: the working
    directory of the shell and of ``run`` (must exist in a fresh sandbox: ``/``, ``/root``)."""

    def __init__(self, limits: Optional[SandboxLimits] = None, start_timeout: float = 20.0,
                 uid_mode: str = "auto", writable: Sequence[str] = (), workdir: str = "/") -> None:
        self.limits = limits or SandboxLimits()
        self.pid: Optional[int] = None
        self._in = self._out = None
        self._stderr = tempfile.TemporaryFile()
        try:
            self.id_plan = idmap.resolve(uid_mode)
        except ValueError as exc:
            self._stderr.close()
            raise SandboxUnavailable(str(exc)) from None
        argv = _bwrap_argv(template_dir(), self.limits, writable, workdir)
        in_r, self._in = os.pipe()
        self._out, out_w = os.pipe()
        try:
            try:
                proc = idmap.spawn(self.id_plan, argv, nproc=self.limits.nproc, stdin=in_r,
                                   stdout=out_w, stderr=self._stderr)
            finally:
                os.close(in_r)
                os.close(out_w)
        except idmap.IdMapError as exc:
            self.close()
            raise SandboxUnavailable(str(exc)) from None
        except (OSError, RuntimeError) as exc:
            detail = self._stderr_text()
            self.close()
            raise SandboxUnavailable(f"{exc}: {detail}") from None
        self.proc, self.pid, self._buf = proc, proc.pid, b""
        try:
            try:
                hello = self._reply(start_timeout)
            except SandboxBroken:
                time.sleep(0.3)  # let the child finish writing its error
                why = self._stderr_text()
                if "Can't mount proc" in why:  # the kernel refuses a new procfs under a masked one
                    why += (" (this container's /proc is masked: run it with procMount: Unmasked "
                            "or privileged; see docs/environments.md, OS sandbox in containers)")
                raise SandboxUnavailable(f"sandbox did not start: {why}") from None
            if not hello.get("ready"):
                raise SandboxUnavailable(f"sandbox did not start: {hello}")
            self.usr = str(hello.get("usr", ""))  # "overlay" or why /usr stayed read-only
        except BaseException:
            self.close()
            raise

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

    def run(self, cmd: str, timeout: float = 30.0, args: Sequence[str] = (), lang: str = "bash",
            merge: bool = False) -> Dict[str, Any]:
        """Run an independent script (init, example, checker) like ``docker exec``: ``bash -c
        cmd -- args`` or ``python3 -c cmd args``, cwd /, until the process exits (background
        children live on). {output, stderr, rc, timed_out}; ``merge``: stderr into output."""
        return self._call({"op": "run", "cmd": cmd, "timeout": timeout, "args": list(args),
                           "lang": lang, "merge": merge}, timeout)

    def start(self, cmd: str, timeout: float = 10.0) -> Dict[str, Any]:
        """Run the task's ``start`` code in the agent's shell, as AgentBench types it into its
        interactive shell (``var=3``, ``cd``, ``su - jack`` and ``prog &`` all persist)."""
        return self.shell(cmd, timeout=timeout)

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

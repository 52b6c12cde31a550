"""Runs INSIDE the OS sandbox (with the sandbox's own /usr/bin/python3; stdlib only).

Protocol: one JSON object per line on stdin, one JSON reply per line on stdout.

* ``{"op": "shell", "cmd": str, "timeout": s}``: run in the agent's persistent login shell
  (cwd, variables and ``su`` persist between commands, as in AgentBench's interactive shell,
  which is started before the task's init scripts run). A command that outlives ``timeout`` is
  killed with the shell's whole process group and the shell restarts.
* ``{"op": "run", "cmd": str, "timeout": s, "args": [...], "lang": "bash"|"python",
  "merge": bool}``: an independent process like AgentBench's ``docker exec`` (init scripts,
  check scripts, the example): ``bash -c cmd -- args`` / ``python3 -c cmd args``, cwd ``/``
  (the config's ``workdir``),
  stdin /dev/null, done when the process exits (background children it started live on).

stdin EOF means the episode is over: the sandbox's processes die with the PID namespace.

Start-up (``prepare_root``): the root tmpfs gets /etc from the template, the usual empty
directories, root's dot-files, and ``/usr`` becomes an overlay: the host's /usr read-only
below, a tmpfs above. Host files appear owned by an unmapped user (nobody) inside, so the
directories two levels below /usr are pre-made in the upper layer (owned by the sandbox's root:
new files can go anywhere there, e.g. /usr/local/bin) and the files named in ``writable`` are
copied up (so ``chmod u+s /usr/bin/find`` works); other host files stay unchangeable. Kernels
without overlay mounts in user namespaces (< 5.11) keep /usr read-only (reported in the hello).
"""

import ctypes
import json
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import time

MAX_OUTPUT = 64 * 1024  # bytes kept per command; more is read and dropped
CONFIG = json.loads(os.environ.pop("AGT_CONFIG", "{}"))
LIMITS = CONFIG.get("limits", {})
# AgentBench's containers run everything in the image's working directory: "/" for its ubuntu
# images (the 2025 AgentBench sets /root)
CWD = CONFIG.get("workdir", "/")
MNT_DETACH = 2
MS_BIND = 4096
# 0500 in procfs, owned by the host's (unmapped) root: unreadable inside, unlike in a container
PROC_HIDDEN = ["/proc/tty/driver"]


def _limits() -> None:
    """Per-process limits for everything the agent runs (applied before exec)."""
    for name, value in LIMITS.items():
        res = getattr(resource, name)
        resource.setrlimit(res, (value, value))


def _read(fd: int, deadline: float, stop: bytes = b"") -> tuple:
    """Read until ``stop`` appears, EOF, or the deadline. Returns (data, finished, stop_seen)."""
    buf, kept = bytearray(), 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return bytes(buf), False, False
        ready, _, _ = select.select([fd], [], [], min(left, 0.5))
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return bytes(buf), True, False
        if kept < MAX_OUTPUT + 4096:
            buf += chunk
            kept += len(chunk)
        elif stop:  # keep only a tail large enough to contain the sentinel
            buf = buf[: MAX_OUTPUT] + buf[-4096:] + chunk
        if stop and stop in buf:
            return bytes(buf), True, True


class Shell:
    def __init__(self) -> None:
        self.proc = None
        self.n = 0

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["/bin/bash", "--login"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, cwd=CWD, start_new_session=True, preexec_fn=_limits)

    def kill(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
            self.proc = None

    def run(self, cmd: str, timeout: float) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.kill()
            self.start()
        self.n += 1
        token = "__AGT_DONE_%d_%d__" % (os.getpid(), self.n)
        script = "%s\n__agt_rc=$?; printf '\\n%s %%s\\n' \"$__agt_rc\"\n" % (cmd, token)
        try:
            self.proc.stdin.write(script.encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            self.kill()
            return {"output": "", "rc": None, "timed_out": False, "restarted": True}
        data, finished, seen = _read(self.proc.stdout.fileno(), time.monotonic() + timeout,
                                     ("\n" + token + " ").encode())
        if seen:
            head, _, tail = data.partition(("\n" + token + " ").encode())
            rc = tail.split(b"\n", 1)[0].strip()
            return {"output": head[:MAX_OUTPUT].decode("utf-8", "replace"),
                    "rc": int(rc) if rc.isdigit() else None, "timed_out": False}
        # Timed out, or the shell exited (e.g. `exit`): kill its group, start afresh next time.
        self.kill()
        return {"output": data[:MAX_OUTPUT].decode("utf-8", "replace"), "rc": None,
                "timed_out": not finished, "restarted": True}


def _collect(proc: subprocess.Popen, fds: list, timeout: float) -> tuple:
    """Read ``fds`` until ``proc`` exits (then drain what is already there) or the timeout."""
    bufs = {fd: bytearray() for fd in fds}
    open_fds = list(fds)
    deadline = time.monotonic() + timeout
    exited_at = None
    while open_fds:
        now = time.monotonic()
        if exited_at is None and proc.poll() is not None:
            exited_at = now
        if exited_at is not None and now - exited_at > 0.05:
            break  # a background child may hold the pipe open; like docker exec, stop here
        if exited_at is None and now >= deadline:
            return bufs, False
        wait = 0.02 if exited_at is not None else min(0.2, max(0.0, deadline - now))
        ready, _, _ = select.select(open_fds, [], [], wait)
        for fd in ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                open_fds.remove(fd)
            elif len(bufs[fd]) < MAX_OUTPUT:
                bufs[fd] += chunk
    return bufs, True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except OSError:
        return False


def _pids() -> frozenset:
    return frozenset(n for n in os.listdir("/proc") if n.isdigit())


def _settle(quiet: float = 0.3, limit: float = 3.0) -> None:
    """Wait until the set of processes has not changed for ``quiet`` seconds (at most
    ``limit``): background jobs that a script started (``sudo -u x sleep 1000 &``) are then
    running, as they are by the time AgentBench's next docker exec returns."""
    end = time.monotonic() + limit
    last, since = _pids(), time.monotonic()
    while time.monotonic() < end:
        time.sleep(0.05)
        now = _pids()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return


def run_independent(cmd: str, timeout: float, args: list, lang: str, merge: bool) -> dict:
    argv = ["python3", "-c", cmd, *args] if lang == "python" else ["bash", "-c", cmd]
    if lang != "python" and args:
        argv += ["--", *args]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if merge else subprocess.PIPE, cwd=CWD,
                            start_new_session=True, preexec_fn=_limits)
    fds = [proc.stdout.fileno()] + ([] if merge else [proc.stderr.fileno()])
    bufs, finished = _collect(proc, fds, timeout)
    if not finished:
        os.killpg(proc.pid, signal.SIGKILL)
    rc = proc.wait()
    if finished and _group_alive(proc.pid):
        _settle()  # it left background processes (init's `cmd &`): let them finish starting
    proc.stdout.close()
    if proc.stderr is not None:
        proc.stderr.close()
    out = bytes(bufs[fds[0]][:MAX_OUTPUT]).decode("utf-8", "replace")
    err = "" if merge else bytes(bufs[fds[1]][:MAX_OUTPUT]).decode("utf-8", "replace")
    return {"output": out, "stderr": err, "rc": rc if finished else None,
            "timed_out": not finished}


def _mount(source: str, target: str, fstype: str, data: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(source.encode(), target.encode(), fstype.encode(), 0, data.encode()) != 0:
        raise OSError(ctypes.get_errno(), "mount %s on %s: %s" % (fstype, target,
                                                                 os.strerror(ctypes.get_errno())))


def _copy_meta(src: str, dst: str) -> None:
    st = os.stat(src)
    os.chmod(dst, st.st_mode & 0o7777)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


def _bind(src: str, target: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(src.encode(), target.encode(), None, MS_BIND, None) != 0:
        raise OSError(ctypes.get_errno(), "bind %s: %s" % (target, os.strerror(ctypes.get_errno())))


def _overlay(work: str, writable: list) -> None:
    upper, scratch = work + "/upper", work + "/work"
    os.mkdir(upper)
    os.mkdir(scratch)
    for top in sorted(os.listdir("/usr")):
        path = "/usr/" + top
        if os.path.isdir(path) and not os.path.islink(path):
            os.mkdir(upper + "/" + top)
            for sub in sorted(os.listdir(path)):
                p2 = path + "/" + sub
                if os.path.isdir(p2) and not os.path.islink(p2):
                    os.mkdir(upper + "/" + top + "/" + sub)
                    _copy_meta(p2, upper + "/" + top + "/" + sub)
            _copy_meta(path, upper + "/" + top)
    _copy_meta("/usr", upper)
    for path in writable:
        real = os.path.realpath(path)
        if not real.startswith("/usr/") or not os.path.isfile(real):
            continue
        rel = real[len("/usr/"):]
        parts = rel.split("/")
        for i in range(1, len(parts)):  # parent directories, with the host's modes
            d = upper + "/" + "/".join(parts[:i])
            if not os.path.isdir(d):
                os.mkdir(d)
                _copy_meta("/usr/" + "/".join(parts[:i]), d)
        shutil.copyfile(real, upper + "/" + rel)
        _copy_meta(real, upper + "/" + rel)
    _mount("overlay", "/usr", "overlay", "lowerdir=/usr,upperdir=%s,workdir=%s" % (upper, scratch))


def prepare_mounts(size_mb: int, writable: list, hidden: list) -> str:
    """Copy-on-write /usr (module docstring) and empty directories over the host directories
    the sandbox's root may not read (which AgentBench's real root could: ``find /`` would
    print "Permission denied" there). Returns "overlay" or why /usr stayed read-only."""
    work = "/.agt-usr"
    status = "overlay"
    try:
        os.mkdir(work)
        _mount("tmpfs", work, "tmpfs", "size=%dm,mode=755" % max(1, size_mb))
        try:
            _overlay(work, writable)
        except OSError as exc:
            status = "read-only (%s)" % (exc,)
        for i, path in enumerate(hidden):
            if os.path.isdir(path) and not os.access(path, os.R_OK | os.X_OK):
                empty = "%s/empty%d" % (work, i)
                os.mkdir(empty, 0o700)
                try:
                    _bind(empty, path)
                except OSError:
                    pass  # the agent sees "Permission denied" there; nothing worse
    except OSError as exc:
        status = "read-only (%s)" % (exc,)
    finally:
        # The overlay and the binds keep the tmpfs alive; detaching hides it from the agent.
        libc = ctypes.CDLL(None, use_errno=True)
        libc.umount2(work.encode(), MNT_DETACH)
        try:
            os.rmdir(work)
        except OSError:
            pass
    return status


def prepare_root() -> str:
    """Populate the fresh root filesystem (a size-limited tmpfs) from the read-only template."""
    shutil.copytree("/.sandbox/etc", "/etc", symlinks=True, dirs_exist_ok=True)
    for d in ("root", "home", "tmp", "var/tmp", "var/log", "var/mail", "var/spool/mail",
              "var/lib", "var/cache", "run/lock", "opt", "srv", "mnt", "media"):
        os.makedirs("/" + d, exist_ok=True)
    for d in ("/tmp", "/var/tmp", "/run/lock"):
        os.chmod(d, 0o1777)
    for path, mode in (("/etc/shadow", 0o640), ("/etc/gshadow", 0o640), ("/etc/sudoers", 0o440),
                       ("/etc/security/opasswd", 0o600)):
        if os.path.exists(path):
            os.chmod(path, mode)
    # root's dot-files as in Debian/Ubuntu images (base-files), else /etc/skel's
    for name in ("bashrc", "profile"):
        for src in ("/usr/share/base-files/dot." + name, "/etc/skel/." + name):
            if os.path.isfile(src):
                shutil.copyfile(src, "/root/." + name)
                break
    os.chmod("/root", 0o700)
    # the login records every Debian/Ubuntu image has (empty), so /var/log is not bare
    for name, mode in (("wtmp", 0o664), ("btmp", 0o660), ("lastlog", 0o664), ("faillog", 0o644)):
        with open("/var/log/" + name, "w"):
            pass
        os.chmod("/var/log/" + name, mode)
    return prepare_mounts(int(CONFIG.get("usr_mb", 128)), list(CONFIG.get("writable", [])),
                          list(CONFIG.get("hidden", [])) + PROC_HIDDEN)


def main() -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    usr = prepare_root()
    shell = Shell()
    shell.start()  # before any init script, as AgentBench opens its shell with the container
    shell.run("true", 30.0)  # and waits for its prompt: the login files are read by now
    out = sys.stdout
    out.write(json.dumps({"ready": True, "usr": usr}) + "\n")
    out.flush()
    for line in sys.stdin:
        try:
            req = json.loads(line)
            op = req.get("op")
            if op == "shell":
                rep = shell.run(req["cmd"], float(req.get("timeout", 10)))
            elif op == "run":
                rep = run_independent(req["cmd"], float(req.get("timeout", 30)),
                                      [str(a) for a in req.get("args", [])],
                                      req.get("lang", "bash"), bool(req.get("merge")))
            else:
                rep = {"error": "unknown op %r" % (op,)}
        except Exception as exc:  # noqa: BLE001 — reported to the host, which ends the episode
            rep = {"error": "%s: %s" % (type(exc).__name__, exc)}
        out.write(json.dumps(rep) + "\n")
        out.flush()
    shell.kill()


if __name__ == "__main__":
    main()

"""Runs INSIDE the OS sandbox (with the sandbox's own /usr/bin/python3; stdlib only).

Protocol: one JSON object per line on stdin, one JSON reply per line on stdout.

* ``{"op": "shell", "cmd": str, "timeout": s}``: run in the agent's persistent login shell
  (cwd, variables and ``su`` persist between commands, as in AgentBench's interactive shell).
  A command that outlives ``timeout`` is killed with the shell's whole process group and the
  shell restarts.
* ``{"op": "run", "cmd": str, "timeout": s, "args": [...], "lang": "bash"|"python"}``: an
  independent process (init scripts, evaluation code); stdin is /dev/null.
* ``{"op": "start", "cmd": str}``: a background process in its own session (task ``start``).

stdin EOF means the episode is over: the sandbox's processes die with the PID namespace.
"""

import json
import os
import resource
import select
import signal
import subprocess
import sys
import time

MAX_OUTPUT = 64 * 1024  # bytes kept per command; more is read and dropped
LIMITS = json.loads(os.environ.pop("AGT_LIMITS", "{}"))


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
            stderr=subprocess.STDOUT, cwd="/root", start_new_session=True, preexec_fn=_limits)

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


def run_independent(cmd: str, timeout: float, args: list, lang: str) -> dict:
    argv = ["python3", "-c", cmd, *args] if lang == "python" else ["bash", "-c", cmd, "--", *args]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd="/root", start_new_session=True,
                            preexec_fn=_limits)
    data, finished, _ = _read(proc.stdout.fileno(), time.monotonic() + timeout)
    if not finished:
        os.killpg(proc.pid, signal.SIGKILL)
    try:
        rc = proc.wait(timeout=max(0.1, timeout))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
    err = proc.stderr.read(MAX_OUTPUT) if finished else b""
    return {"output": data[:MAX_OUTPUT].decode("utf-8", "replace"),
            "stderr": err.decode("utf-8", "replace"), "rc": rc if finished else None,
            "timed_out": not finished}


def prepare_root() -> None:
    """Populate the fresh root filesystem (a size-limited tmpfs) from the read-only template."""
    import shutil

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
    os.chmod("/root", 0o700)


def main() -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    prepare_root()
    shell = Shell()
    out = sys.stdout
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        try:
            req = json.loads(line)
            op = req.get("op")
            if op == "shell":
                rep = shell.run(req["cmd"], float(req.get("timeout", 10)))
            elif op == "run":
                rep = run_independent(req["cmd"], float(req.get("timeout", 30)),
                                      [str(a) for a in req.get("args", [])], req.get("lang", "bash"))
            elif op == "start":
                subprocess.Popen(["bash", "-c", req["cmd"]], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 cwd="/root", start_new_session=True, preexec_fn=_limits)
                rep = {"ok": True}
            else:
                rep = {"error": "unknown op %r" % (op,)}
        except Exception as exc:  # noqa: BLE001 — reported to the host, which ends the episode
            rep = {"error": "%s: %s" % (type(exc).__name__, exc)}
        out.write(json.dumps(rep) + "\n")
        out.flush()
    shell.kill()


if __name__ == "__main__":
    main()

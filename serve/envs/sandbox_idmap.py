"""How an OS sandbox's user namespace maps uids and gids to the host (serve/envs/sandbox.py).

Three modes, chosen by :func:`resolve` (``uid_mode`` option; ``auto`` picks the first that works):

* ``range`` (the process is root): inside uids/gids 0..65535 map to a fresh unprivileged host
  range per sandbox (``0 <base> 65536``, base random above 2^20), written straight to
  ``/proc/PID/{uid,gid}_map`` (needs CAP_SETUID/CAP_SETGID in the parent namespace, and those
  host ids mapped there: not so for root in a user-namespaced container, which gets ``single``).
* ``subid`` (not root; the rootless-podman way): inside 0 is the caller's own uid and inside
  1..N its subordinate range from ``/etc/subuid`` / ``/etc/subgid`` (N <= 65535), written by the
  setuid helpers ``newuidmap``/``newgidmap`` (Debian package ``uidmap``).
* ``single`` (fallback): only inside 0 is mapped (to the caller's uid, or to one random
  unprivileged uid when root), with ``setgroups`` denied — what any unprivileged process may do.
  The sandbox still has its own root filesystem, no network and the limits, but nothing there can
  become another user: ``useradd`` cannot give a home to a new uid, ``chown``/``chgrp`` to other
  ids, ``su``/``runuser``/``sudo -u`` fail. The OS environment skips the tasks that need that.

Both multi-uid modes need kernel >= 5.14 for per-sandbox process limits: RLIMIT_NPROC is then
counted per user namespace, so sandboxes sharing host uids do not share the limit.
"""

from __future__ import annotations

import functools
import logging
import os
import pwd
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

log = logging.getLogger(__name__)

MODES = ("auto", "range", "subid", "single")
SPAN = 65536  # inside ids 0..65535, as a container image expects (nobody = 65534)
Triplet = Tuple[int, int, int]  # (inside, outside, count): one line of a uid_map


class IdMapError(RuntimeError):
    """The namespace's id maps could not be written (the message says why and the fix)."""


@dataclass(frozen=True)
class IdPlan:
    """A mapping mode plus what it needs; ``maps()`` gives the lines for one sandbox."""

    mode: str  # range | subid | single
    note: str  # why this mode, for logs and skip reasons
    subuid: Optional[Tuple[int, int]] = None  # (first host id, count) for subid
    subgid: Optional[Tuple[int, int]] = None

    @property
    def multi_uid(self) -> bool:
        """Whether users other than root can exist inside (useradd, chown, su work)."""
        return self.mode != "single"

    def maps(self) -> Tuple[List[Triplet], List[Triplet]]:
        """(uid map, gid map) for one new sandbox."""
        if self.mode == "subid":
            assert self.subuid and self.subgid  # set by resolve() for this mode
            return ([(0, os.geteuid(), 1), (1, self.subuid[0], min(self.subuid[1], SPAN - 1))],
                    [(0, os.getegid(), 1), (1, self.subgid[0], min(self.subgid[1], SPAN - 1))])
        if os.geteuid() == 0:
            # Root picks an unused-looking unprivileged range per sandbox, so "root" inside owns
            # nothing on the host; a single-mode sandbox gets just the first id of such a range.
            base = (1 << 20) + random.randrange(60000) * SPAN
            count = SPAN if self.mode == "range" else 1
            return [(0, base, count)], [(0, base, count)]
        return [(0, os.geteuid(), 1)], [(0, os.getegid(), 1)]


def _user_keys() -> Tuple[str, ...]:
    uid = os.geteuid()
    try:
        return (pwd.getpwuid(uid).pw_name, str(uid))
    except KeyError:
        return (str(uid),)


def read_subids(path: str, keys: Sequence[str]) -> Optional[Tuple[int, int]]:
    """The largest range of ``/etc/subuid``-style file ``path`` owned by one of ``keys``
    (user name or numeric uid); None when there is none."""
    best: Optional[Tuple[int, int]] = None
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                parts = line.strip().split(":")
                if len(parts) != 3 or parts[0] not in keys:
                    continue
                try:
                    start, count = int(parts[1]), int(parts[2])
                except ValueError:
                    continue
                if count > 0 and (best is None or count > best[1]):
                    best = (start, count)
    except OSError:
        return None
    return best


def newidmap_tool(name: str) -> Optional[str]:
    """Path of ``newuidmap``/``newgidmap``: on PATH, else Debian's /usr/bin."""
    return shutil.which(name) or (f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None)


def static_plan(mode: str = "auto") -> IdPlan:
    """The mode that ``mode`` asks for on this machine, judged without starting anything."""
    if mode not in MODES:
        raise ValueError(f"uid_mode must be one of {', '.join(MODES)}; got {mode!r}")
    root = os.geteuid() == 0
    if mode == "single":
        return IdPlan("single", "uid_mode=single was asked for: one uid inside the sandbox")
    if root and mode in ("auto", "range"):
        return IdPlan("range", "running as root: a fresh 65536-id host range per sandbox")
    if mode == "range":
        raise ValueError("uid_mode=range needs root (CAP_SETUID in the host namespace); "
                         "use uid_mode=subid (newuidmap + /etc/subuid) or auto")
    keys = _user_keys()
    missing = [t for t in ("newuidmap", "newgidmap") if not newidmap_tool(t)]
    subuid, subgid = read_subids("/etc/subuid", keys), read_subids("/etc/subgid", keys)
    why = []
    if missing:
        why.append(f"{' and '.join(missing)} not installed (Debian/Ubuntu package uidmap)")
    if subuid is None:
        why.append(f"no /etc/subuid range for user {keys[0]}")
    if subgid is None:
        why.append(f"no /etc/subgid range for user {keys[0]}")
    if not why:
        return IdPlan("subid", f"rootless: uid {os.geteuid()} plus /etc/subuid range "
                               f"{subuid[0]}+{subuid[1]} via newuidmap", subuid, subgid)
    reason = "; ".join(why)
    if mode == "subid":
        raise ValueError(f"uid_mode=subid cannot work here: {reason}")
    return IdPlan("single", f"only one uid can be mapped without root: {reason}")


def apply(pid: int, plan: IdPlan, maps: Tuple[List[Triplet], List[Triplet]]) -> None:
    """Write the id maps of process ``pid`` (which has just unshared its user namespace)."""
    uids, gids = maps
    if plan.mode == "subid":
        for tool, triplets in (("newuidmap", uids), ("newgidmap", gids)):
            argv = [newidmap_tool(tool) or tool, str(pid)] + [str(v) for t in triplets for v in t]
            try:
                res = subprocess.run(argv, capture_output=True, text=True, timeout=20)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise IdMapError(f"{tool} failed: {exc}") from None
            if res.returncode != 0:
                raise IdMapError(f"{tool} failed (exit {res.returncode}): "
                                 f"{(res.stderr or res.stdout).strip() or 'no message'}; it must be "
                                 "setuid root (or have cap_setuid/cap_setgid) and the pod must "
                                 "allow privilege escalation")
        return
    try:
        if plan.mode == "single":  # required before an unprivileged gid_map; keeps su honest
            with open(f"/proc/{pid}/setgroups", "w") as f:
                f.write("deny")
        for name, triplets in (("uid_map", uids), ("gid_map", gids)):
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write("".join(f"{a} {b} {c}\n" for a, b, c in triplets))
    except OSError as exc:
        raise IdMapError(f"cannot write the sandbox's id maps ({plan.mode} mode): {exc}") from None


# The same helper the sandbox uses (sandbox.py), here only to try a mapping: enter a user
# namespace, wait for the map, become root inside, exec the given program.
HELPER = """
import ctypes, os, resource, sys
sync_w, go_r, nproc, groups = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x10000000) != 0:
    sys.stderr.write("unshare(CLONE_NEWUSER) failed: errno %d\\n" % ctypes.get_errno())
    os._exit(97)
os.write(sync_w, b"u")
if os.read(go_r, 1) != b"g":
    os._exit(98)
os.setgid(0)
if groups == "1":
    os.setgroups([])
os.setuid(0)
if nproc > 0:
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
os.close(sync_w)
os.close(go_r)
os.execv(sys.argv[5], sys.argv[5:])  # absolute path: no imports after setuid
"""


def spawn(plan: IdPlan, argv: Sequence[str], nproc: int = 0, **popen: object) -> subprocess.Popen:
    """Start ``argv`` as root of a new user namespace mapped by ``plan``; IdMapError if the map
    cannot be written, OSError/RuntimeError (with the helper's message) if the namespace
    cannot be made. ``popen`` goes to subprocess.Popen (stdin/stdout/stderr)."""
    sync_r, sync_w = os.pipe()
    go_r, go_w = os.pipe()
    groups = "0" if plan.mode == "single" else "1"
    # A fresh interpreter, not os.fork: forking a process that runs gRPC/Ray threads can leave
    # the child multi-threaded, and unshare(CLONE_NEWUSER) then fails with EINVAL.
    try:
        proc = subprocess.Popen([sys.executable, "-S", "-c", HELPER, str(sync_w), str(go_r),
                                 str(nproc), groups, *argv], pass_fds=(sync_w, go_r),
                                close_fds=True, **popen)  # type: ignore[call-overload]
    finally:
        os.close(sync_w)
        os.close(go_r)
    try:
        import select

        ready, _, _ = select.select([sync_r], [], [], 20.0)
        if not ready or os.read(sync_r, 1) != b"u":
            try:
                proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise RuntimeError("cannot create a user namespace (is kernel.unprivileged_userns_clone"
                               " / user.max_user_namespaces enabled, and does seccomp/AppArmor "
                               "allow unshare?)")
        try:
            apply(proc.pid, plan, plan.maps())
        except IdMapError:
            proc.kill()
            proc.wait()
            raise
        os.write(go_w, b"g")
    finally:
        os.close(sync_r)
        os.close(go_w)
    return proc


@functools.lru_cache(maxsize=None)
def resolve(mode: str = "auto") -> IdPlan:
    """The plan sandboxes use for ``mode`` (cached per process). ``auto`` without root tries
    the subid mapping once for real and falls back to ``single`` (logging why) if it fails."""
    plan = static_plan(mode)
    if plan.mode in ("subid", "range") and mode == "auto":
        # Try it once: a setuid newuidmap may be blocked (no_new_privs, dropped capabilities),
        # and root inside a user-namespaced container owns only the ids that container maps.
        try:
            proc = spawn(plan, ["/bin/true"], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            _, err = proc.communicate(timeout=20)
            if proc.returncode != 0:
                raise IdMapError((err or b"").decode("utf-8", "replace").strip() or
                                 f"exit {proc.returncode}")
        except IdMapError as exc:
            plan = IdPlan("single", f"the {plan.mode} mapping failed here ({exc})")
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            # no user namespace at all: sandboxes will say so; keep the plan
            log.warning("OS sandbox: cannot try the %s mapping: %s", plan.mode, exc)
    if plan.mode == "single":
        log.warning("OS sandbox: single-uid mode (%s); tasks that create users, change owners or "
                    "switch users cannot run", plan.note)
    else:
        log.info("OS sandbox: %s mode (%s)", plan.mode, plan.note)
    return plan

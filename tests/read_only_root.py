"""Run an entry point as in its pod: the root filesystem read-only, only the manifest's volumes writable.

    python tests/read_only_root.py [--writable DIR ...] MODULE:FUNCTION [ARGS...]

FUNCTION is called with ARGS (as the console scripts call main) and its return value is the exit status.
The tests run as root, which ignores permission bits, and tempfile falls back from an unusable $TMPDIR to /tmp,
/var/tmp and the working directory, so permissions cannot make a directory unusable here. Instead, an audit hook
(PEP 578) refuses every write, create, rename or delete outside the --writable directories with EROFS, as a
read-only mount does; reads are untouched, and /dev and /proc behave as in a container. With $TMPDIR pointing at a
path that does not exist, tempfile.gettempdir() then fails exactly as in the deployed pod; this is checked first.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys
import tempfile
from typing import Any

EXIT_NOT_READ_ONLY = 97
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# Audit events that change the filesystem, and which of their arguments are paths.
_CHANGES = {
    "os.mkdir": (0,),
    "os.rename": (0, 1),
    "os.remove": (0,),
    "os.rmdir": (0,),
    "os.symlink": (1,),
    "os.link": (1,),
    "os.chmod": (0,),
    "os.chown": (0,),
    "os.truncate": (0,),
    "os.utime": (0,),
    "os.mkfifo": (0,),
    "os.mknod": (0,),
}


def _allowed(path: Any, writable: tuple[str, ...]) -> bool:
    if isinstance(path, int):  # an open file descriptor: its opening was checked
        return True
    try:
        absolute = os.path.abspath(os.fsdecode(path))
    except TypeError:
        return True
    return any(absolute == root or absolute.startswith(root + os.sep) for root in writable)


def install(writable: list[str]) -> None:
    """Refuse every filesystem change outside `writable` (and /dev, /proc) with EROFS, from now on."""
    roots = tuple(os.path.abspath(path) for path in [*writable, "/dev", "/proc"])

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "open":
            path, mode, flags = args
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITE_FLAGS)
            paths: tuple[Any, ...] = (path,) if writes and path is not None else ()
        elif event in _CHANGES:
            paths = tuple(args[i] for i in _CHANGES[event] if i < len(args))
        else:
            return
        for path in paths:
            if not _allowed(path, roots):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

    sys.addaudithook(hook)


def check_tmpdir_unusable() -> str | None:
    """None if tempfile cannot create anything (as on the pod), else why the emulation is not effective."""
    tempfile.tempdir = None
    try:
        tempfile.gettempdir()
    except FileNotFoundError:
        pass
    else:
        return f"tempfile.gettempdir() found a usable directory ({tempfile.gettempdir()})"
    finally:
        tempfile.tempdir = None
    try:
        with open(os.path.join(os.getcwd(), ".read-only-probe"), "w"):
            pass
    except OSError as exc:
        if exc.errno == errno.EROFS:
            return None
    return "the working directory is writable"


def official_loader(argv: list[str]) -> int:
    """The official client's kubeconfig loader on the file argv[0]: what the controller used before (a self-test)."""
    from kubernetes.config import new_client_from_config

    new_client_from_config(argv[0], persist_config=False)
    return 0


def main(argv: list[str]) -> int:
    writable: list[str] = []
    while argv and argv[0] == "--writable":
        writable.append(argv[1])
        argv = argv[2:]
    target, *args = argv
    install(writable)
    problem = check_tmpdir_unusable()
    if problem:
        print(f"read_only_root: not read-only: {problem}", file=sys.stderr)
        return EXIT_NOT_READ_ONLY
    module_name, function_name = target.split(":")
    sys.argv = [module_name, *args]
    return getattr(importlib.import_module(module_name), function_name)(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Making ``accelerate launch --cpu --num_processes N script.py`` start N processes.

accelerate's multi-CPU launch path needs ``mpirun``; without it, ``accelerate launch --num_processes 2 --cpu`` starts
ONE process (its "simple launcher") and the run silently uses a single process. A script that calls
:func:`relaunch_for_cpu_processes` first thing in its ``main`` detects that situation and re-runs itself under
``torch.distributed.run`` (torchrun) with N processes, which then talk over gloo on the CPU::

    from hf_cifd.launch import relaunch_for_cpu_processes

    def main():
        code = relaunch_for_cpu_processes()
        if code is not None:      # the N workers ran (or failed): this launcher process is done
            sys.exit(code)
        ...                       # a worker (or a plain single process): train as usual

How N is found: the simple launcher exports ``ACCELERATE_USE_CPU=True`` and starts the script as its direct child, so
the parent's command line (``/proc/<ppid>/cmdline``) is the ``accelerate launch ...`` command. Its options before this
script's path are searched for ``--num_processes`` (``--num_processes 2``, ``--num_processes=2``, ``--num-processes``
and argparse abbreviations); a command line that does not name this script is not trusted. A script already started by torchrun (``WORLD_SIZE``
set, e.g. ``accelerate launch --multi_gpu`` or ``torchrun``) is never relaunched.

Fallback: anything unexpected (no ``/proc`` -- i.e. not Linux --, a parent that is not ``accelerate launch``, a
process count taken from an accelerate config file instead of the command line, a parse error) returns None and the
script runs as it was started (one process).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys

logger = logging.getLogger(__name__)

__all__ = ["relaunch_for_cpu_processes", "requested_cpu_processes"]


def _truthy(value: str | None) -> bool:
    return str(value or "").strip().lower() in ("1", "true", "yes", "on")


def _parent_cmdline() -> list[str] | None:
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            return [a for a in f.read().decode(errors="replace").split("\0") if a != ""]
    except OSError:
        return None


def _launch_args(parent: list[str]) -> list[str] | None:
    """The arguments after ``launch`` in ``accelerate launch ...`` / ``python -m accelerate.commands.launch ...`` /
    ``python -m accelerate.commands.accelerate_cli launch ...``; None when the command is none of these."""
    for i, arg in enumerate(parent):
        if arg == "launch" and i > 0 and ("accelerate" in os.path.basename(parent[i - 1]) or
                                          parent[i - 1].endswith("accelerate_cli")):
            return parent[i + 1:]
        if arg == "accelerate.commands.launch" and i > 0 and parent[i - 1] == "-m":
            return parent[i + 1:]
    return None


def _same_script(named: str, script: str) -> bool:
    try:
        return os.path.samefile(named, script)
    except OSError:
        return os.path.abspath(named) == os.path.abspath(script)


def _num_processes(options: list[str]) -> int | None:
    """The value of ``--num_processes`` (``--num-processes``, ``=`` form, argparse abbreviations down to ``--num_p``)
    among accelerate's own options; the last one wins, as with argparse."""
    n = None
    for i, opt in enumerate(options):
        name, eq, value = opt.partition("=")
        name = name.replace("-", "_")
        if len(name) >= len("__num_p") and "__num_processes".startswith(name):
            value = value if eq else (options[i + 1] if i + 1 < len(options) else "")
            try:
                n = int(value)
            except ValueError:
                return None
    return n


def requested_cpu_processes(script: str | None = None) -> int:
    """N of the ``accelerate launch --cpu --num_processes N <script>`` that started this single process, else 1.

    ``script`` defaults to ``sys.argv[0]``; only the launcher options before it are read (a ``--num_processes`` of
    the script's own arguments does not count). Returns 1 whenever this process is already one of several
    (``WORLD_SIZE`` set), was not started by accelerate's CPU simple launcher, or the launcher's command line cannot
    be read. (It deliberately avoids importing accelerate: that costs seconds in a process that only relaunches.)
    """
    if "WORLD_SIZE" in os.environ or not _truthy(os.environ.get("ACCELERATE_USE_CPU")):
        return 1
    parent = _parent_cmdline()
    args = _launch_args(parent) if parent else None
    if not args:
        return 1
    script = script or sys.argv[0]
    position = next((i for i, a in enumerate(args) if not a.startswith("-") and _same_script(a, script)), None)
    if position is None:
        return 1
    n = _num_processes(args[:position])
    return n if n is not None and n > 1 else 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def relaunch_for_cpu_processes(argv: list[str] | None = None, *, threads_per_process: int | None = None) -> int | None:
    """Re-runs this script under torchrun with the N CPU processes ``accelerate launch --cpu`` was asked for.

    Returns the exit code of the N-process run (the caller should ``sys.exit`` with it), or None when no relaunch is
    needed or possible (one process requested, already distributed, not launched that way, not Linux): the caller
    then simply continues in this process.

    ``argv``: the script's arguments (default ``sys.argv[1:]``). The workers get ``OMP_NUM_THREADS`` =
    ``threads_per_process`` (default: the CPU count divided by N, at least 1), so that N processes on a small
    machine do not oversubscribe its cores. A script run as a module (``python -m pkg.mod``) is relaunched with
    ``-m pkg.mod``.
    """
    n = requested_cpu_processes()
    if n <= 1:
        return None
    import __main__

    spec = getattr(__main__, "__spec__", None)
    target = ["-m", spec.name] if spec is not None and getattr(spec, "name", None) else [os.path.abspath(sys.argv[0])]
    threads = threads_per_process or max(1, (os.cpu_count() or 1) // n)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}",
           f"--master_port={_free_port()}", *target, *(sys.argv[1:] if argv is None else argv)]
    logger.info("accelerate launch --cpu started 1 process for --num_processes %d: relaunching with torchrun (gloo)", n)
    print(f"[hf_cifd.launch] starting {n} CPU processes with torchrun (accelerate's --cpu launcher starts only one)",
          file=sys.stderr, flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.call(cmd, env=env)

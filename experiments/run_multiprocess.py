"""Run a script as several processes of one JAX job (``fljax.distributed``).

On one machine it starts ``--processes`` local processes (each with ``--devices`` CPU devices,
gloo collectives, a free coordinator port) and prints each one's output, process 0's first;
on a cluster it is not needed: start the script itself with the cluster's launcher
(``srun``, ``mpirun``, a TPU pod slice's ``--worker=all``) and let
:func:`fljax.distributed.initialize` detect the job (see ``docs/distributed.md``).

The script calls ``distributed.initialize()`` before any other JAX work, then builds its mesh,
round and cohorts with :mod:`fljax.distributed`.

Command::

    .venv/bin/python experiments/run_multiprocess.py --processes 2 --devices 1 -- \\
        experiments/bench_multiprocess.py --worker --cohort 4 --examples 64
"""

from __future__ import annotations

import argparse
import sys

from fljax import distributed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2, help="local processes to start")
    parser.add_argument("--devices", type=int, default=1, help="CPU devices per process")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before every process is killed")
    parser.add_argument("script", nargs=argparse.REMAINDER, help="-- script.py [its arguments]")
    args = parser.parse_args(argv)
    script = args.script[1:] if args.script[:1] == ["--"] else args.script
    if not script:
        parser.error("give the script to run after --")
    done = distributed.launch_local(
        script, args.processes, local_device_count=args.devices, timeout=args.timeout
    )
    for i, p in enumerate(done):
        print(f"--- process {i} (exit {p.returncode})", flush=True)
        sys.stdout.write(p.stdout)
        sys.stderr.write(p.stderr if p.returncode else "")
    return max((abs(p.returncode) for p in done), default=0)


if __name__ == "__main__":
    sys.exit(main())

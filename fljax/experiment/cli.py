"""The trainer's command line (experiments/run.py is a thin wrapper around main()).

Usage::

    python experiments/run.py --config heart_disease [--set a.b=value ...] [--out DIR]
                              [--resume | --overwrite] [--no-progress]
                              [--processes N [--devices-per-process K] | --distributed]

``--config`` is a config name (a file of ``experiments/configs/``) or a path to a Python file
defining ``get_config() -> fljax.experiment.Config``. ``--set`` overrides are type-checked
against the config types. A bad config, override or value, or an output folder that cannot be
used, ends the process with exit code 2 and one line on stderr, before anything is trained;
other errors are bugs and keep their traceback.

Several processes (``docs/distributed.md``): ``--processes N`` starts N local processes of one
``jax.distributed`` job on this machine (a test of the multi-host program); under a cluster's
launcher (``srun``, ``mpirun``, a TPU pod slice), start the command in every process with
``--distributed``. Each round is then sharded over every device of every process, and only
process 0 writes the output folder (which must be shared between hosts).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import pathlib
import sys

import jax

from fljax import distributed
from fljax.experiment import config as cfg
from fljax.experiment import trainer
from fljax.experiment.config import Config, ConfigError


def resolve(name: str, configs_dir: pathlib.Path | None) -> pathlib.Path:
    """The config file of ``name``: a path, or ``configs_dir/<name>.py``."""
    path = pathlib.Path(name)
    if path.is_file():
        return path
    if configs_dir is not None and (configs_dir / f"{name}.py").is_file():
        return configs_dir / f"{name}.py"
    known = f"; configs: {', '.join(names(configs_dir))}" if configs_dir is not None else ""
    raise cfg.bad(
        "--config",
        name,
        f"no such file or config name{known}; expected a Python file that defines get_config()",
    )


def load_config(
    path: str | pathlib.Path, overrides: list[str] = (), configs_dir: pathlib.Path | None = None
) -> Config:
    """The :class:`Config` of a config file (``get_config()``) with ``--set key=value`` overrides,
    validated; ``ConfigError`` on any bad input. ``get_config()`` may also return a dict of the
    same structure (checked like an override)."""
    path = resolve(str(path), configs_dir)
    spec = importlib.util.spec_from_file_location(f"fljax_config_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise cfg.bad(
            "--config", str(path), "cannot be imported; expected a Python file that defines get_config()"
        )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise cfg.bad(
            "--config", str(path), "defines no get_config(); expected a function returning a Config"
        )
    config = module.get_config()
    if isinstance(config, dict):
        config = cfg.from_dict(Config, config)
    if not isinstance(config, Config):
        raise cfg.bad(
            "--config", str(path), f"get_config() returned a {type(config).__name__}; expected a Config"
        )
    config = cfg.apply_overrides(config, list(overrides))
    cfg.validate(config)
    return config


def names(configs_dir: pathlib.Path | None) -> list[str]:
    """The config names in ``configs_dir`` (files defining ``get_config``)."""
    if configs_dir is None or not configs_dir.is_dir():
        return []
    return sorted(p.stem for p in configs_dir.glob("*.py") if "def get_config" in p.read_text())


def summaries(configs_dir: pathlib.Path | None) -> str:
    """One line per config: its name and the first line of its docstring."""
    lines = []
    for name in names(configs_dir):
        text = (configs_dir / f"{name}.py").read_text()
        try:
            doc = ast.get_docstring(ast.parse(text)) or ""
        except SyntaxError:
            doc = ""
        lines.append(f"  {name:<24} {doc.splitlines()[0] if doc else ''}")
    return "\n".join(lines)


def one_device_per_core() -> int:
    """Start jax with one CPU device per core unless a count was chosen or jax has started.

    The trainer's ``devices="auto"`` then spreads each round's clients over them
    (:func:`fljax.experiment.trainer.round_devices`). Returns jax's CPU device count setting
    (-1: jax's own default, one device)."""
    chosen = "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
    if not chosen and jax.config.jax_num_cpu_devices == -1:
        try:
            jax.config.update("jax_num_cpu_devices", os.cpu_count() or 1)
        except RuntimeError:  # jax already runs (e.g. in a notebook): keep its devices
            pass
    return jax.config.jax_num_cpu_devices


def _add_job_options(parser: argparse.ArgumentParser) -> None:
    """``--processes``, ``--devices-per-process``, ``--distributed`` (read before jax starts)."""
    parser.add_argument(
        "--processes",
        type=int,
        metavar="N",
        help="run as N local processes of one jax.distributed job (docs/distributed.md)",
    )
    parser.add_argument(
        "--devices-per-process", type=int, metavar="K", help="with --processes: CPU devices each"
    )
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="join the jax.distributed job a cluster's launcher started (srun, mpirun, TPU pod)",
    )


def _job_args(argv):
    """``(job options, the other arguments)``: the job options are read before jax starts."""
    pre = argparse.ArgumentParser(add_help=False)
    _add_job_options(pre)
    return pre.parse_known_args(list(sys.argv[1:] if argv is None else argv))


def launch(argv, processes: int, devices: int | None, configs_dir, runs_dir) -> dict:
    """``--processes N``: this command line as N local processes of one jax.distributed job
    (:func:`fljax.distributed.launch_local`, ``--distributed`` added), each with ``devices`` CPU
    devices (default: the cores shared out); prints their output, process 0's first. Returns
    ``{"processes": [exit codes]}``; exits with the first non-zero code."""
    if processes < 1:
        _fail(f"error: --processes must be >= 1, got {processes} (see --help)")
    if devices is None:
        devices = max(1, (os.cpu_count() or 1) // processes)
    if devices < 1:
        _fail(f"error: --devices-per-process must be >= 1, got {devices} (see --help)")
    code = (
        "import pathlib, sys\n"
        "from fljax.experiment.cli import main\n"
        f"main(sys.argv[1:], configs_dir={_path(configs_dir)}, runs_dir={_path(runs_dir)})\n"
    )
    flags = " ".join(  # the device count is --devices-per-process's, not an inherited one
        f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f
    )
    done = distributed.launch_local(
        ["-c", code, *argv, "--distributed"], processes, local_device_count=devices, env={"XLA_FLAGS": flags}
    )
    for i, p in enumerate(done):
        if processes > 1:
            print(f"--- process {i} of {processes} (exit {p.returncode})", flush=True)
        sys.stdout.write(p.stdout)
        sys.stderr.write(p.stderr)
    codes = [p.returncode for p in done]
    failed = next((c for c in codes if c), 0)
    if failed:
        raise SystemExit(failed if failed > 0 else 1)
    return {"processes": codes}


def _path(p) -> str:
    return "None" if p is None else f"pathlib.Path({str(pathlib.Path(p).resolve())!r})"


def main(argv=None, *, configs_dir: pathlib.Path | None = None, runs_dir: pathlib.Path | None = None) -> dict:
    """The command line; returns the run's summary. Exit code 2 and one line on stderr for a
    bad config, override, argument or output folder. Starts jax with one CPU device per core
    (:func:`one_device_per_core`), or joins a ``jax.distributed`` job (``--distributed``), or
    starts one on this machine (``--processes N``: :func:`launch`)."""
    job, rest = _job_args(argv)
    if job.processes is not None:
        if job.distributed:
            _fail(
                "error: --processes starts the job's processes itself; --distributed is for a cluster's launcher"
            )
        return launch(rest, job.processes, job.devices_per_process, configs_dir, runs_dir)
    if job.distributed:
        try:
            distributed.initialize()  # from JAX_* variables or the cluster's environment
        except ValueError as e:
            _fail("error: --distributed: " + " ".join(str(e).splitlines()))
    else:
        one_device_per_core()
    argv = rest
    try:
        return _main(argv, configs_dir, runs_dir)
    except ConfigError as e:
        _fail("config error: " + " ".join(str(e).splitlines()))
    except trainer.RunFolderError as e:
        _fail("error: " + " ".join(str(e).splitlines()))


def _fail(message: str):
    print(f"fljax: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def _main(argv, configs_dir, runs_dir) -> dict:
    listing = summaries(configs_dir)
    parser = argparse.ArgumentParser(
        prog="run.py",
        description=__doc__.split("\n\n")[0]
        + (f"\n\nconfigs (in {configs_dir}):\n{listing}" if listing else ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Each config file's docstring gives its command, hardware, runtime and measured result.",
    )
    # One line for bad arguments too (argparse would print the usage first); --help has it.
    parser.error = lambda message: _fail(f"error: {message} (see --help)")
    parser.add_argument("--config", required=True, help="a config name (listed above) or a config file")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. rounds=5"
    )
    parser.add_argument("--out", default=None, help="output folder (default runs/<config name>)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its newest readable checkpoint (the config must match)",
    )
    mode.add_argument(
        "--overwrite", action="store_true", help="delete the results of an earlier run in --out first"
    )
    parser.add_argument("--no-progress", action="store_true")
    _add_job_options(parser)  # read by main() before jax starts; listed here for --help
    args = parser.parse_args(argv)
    config = load_config(args.config, args.set, configs_dir)
    out = pathlib.Path(args.out) if args.out else (runs_dir or pathlib.Path("runs")) / config.name
    return trainer.run(
        config, out, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress
    )

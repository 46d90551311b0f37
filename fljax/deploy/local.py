"""One command starts a whole deployment on this machine: SuperLink, N SuperNodes, TLS, a run.

``python -m fljax.deploy.local --config heart_disease --nodes 4 [--secure secagg|he] --out DIR``

1. loads the config and its data exactly as the trainer does, and writes each client's shard
   (:func:`shards`: the client's rows padded as the simulation's cohort pads them, and its
   held-out rows when the data has a per-client test split) to
   ``DIR/deploy/shards/client_<i>.npz``;
2. generates a CA and a server certificate for ``127.0.0.1``/``localhost``
   (:mod:`fljax.deploy.certs`);
3. starts ``flower-superlink`` with TLS on a free port, and for each client a node runtime
   (``python -m fljax.deploy.node``, its shard, a Unix socket) and a ``flower-supernode``
   (``--root-certificates``, ``--node-config 'client-id=<i> socket="..."'``), each in its own
   process group;
4. submits the app (``flwr run``; its ``pyproject.toml`` is written under ``DIR/deploy/app``)
   with the config's path and the output folder in its run config, and waits for it;
5. stops every process it started (also on an error or Ctrl-C), and returns ``summary.json``.

Nothing is downloaded (runtime dependency installation is disabled, as are Flower's update
check and telemetry); every address is ``127.0.0.1``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings

import numpy as np

from fljax import random as fl_random
from fljax.base import ClientData
from fljax.data import FederatedData
from fljax.deploy import certs as certs_lib
from fljax.deploy import node as node_lib
from fljax.deploy import server
from fljax.experiment import config as cfg
from fljax.experiment import data as data_lib

APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fljax-deploy"
version = "1.0.0"
description = "fljax federated training on Flower"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fljax"

[tool.flwr.app.components]
serverapp = "fljax_flower_app:server"
clientapp = "fljax_flower_app:client"

[tool.flwr.app.config]
config-json = ""
out = ""
num-clients = 0
num-classes = 0
secure = "none"
timeout = 60.0
wait-nodes = 120.0
max-message-bytes = {max_bytes}
he-poly-modulus-degree = 8192
"""


def _env(flwr_home: pathlib.Path) -> dict:
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        JAX_PLATFORMS=env.get("JAX_PLATFORMS", "cpu"),
        # Flower starts its helpers (flower-superexec, flwr-serverapp, flwr-clientapp) by name.
        PATH=os.pathsep.join([str(pathlib.Path(sys.executable).parent), env.get("PATH", "")]),
    )
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def num_examples(config: cfg.Config, train_data: FederatedData) -> int:
    """The padded examples per client of the trainer's cohorts (``train``: 4 batches' multiple)."""
    multiple = 4 * config.client.batch_size
    return -(-int(train_data.sizes.max()) // multiple) * multiple


def load_train_data(config: cfg.Config) -> tuple[FederatedData, int]:
    """The training population and class count, loaded as ``trainer.run_once`` loads them."""
    seed = config.data.seed if getattr(config.data, "seed", None) is not None else config.seed
    data = data_lib.load(config.data, fl_random.stream(fl_random.run_key(seed), "data"))
    return data.train, data.num_classes


def load_data(config: cfg.Config) -> data_lib.Prepared:
    """The experiment's data (training population, held-out splits), as ``trainer.run_once`` loads it."""
    seed = config.data.seed if getattr(config.data, "seed", None) is not None else config.seed
    return data_lib.load(config.data, fl_random.stream(fl_random.run_key(seed), "data"))


def shards(config: cfg.Config, train_data: FederatedData) -> list[ClientData]:
    """Each client's data as the simulation's cohort holds it (same padding, same subset key)."""
    n = num_examples(config, train_data)
    key = fl_random.stream(fl_random.run_key(config.seed), "data")
    out = []
    for c in range(train_data.num_clients):
        cohort = train_data.cohort([c], num_examples=n, key=key)
        out.append(ClientData(*(np.asarray(a[0]) for a in cohort.data)))
    return out


@dataclasses.dataclass
class Deployment:
    """The processes of a local deployment (see the module docstring); :meth:`stop` ends them."""

    workdir: pathlib.Path
    port: int
    env: dict
    superlink: subprocess.Popen | None = None
    nodes: dict = dataclasses.field(default_factory=dict)  # client id -> its process group's leader
    logs: list = dataclasses.field(default_factory=list)

    def _start(self, name: str, argv: list[str]) -> subprocess.Popen:
        """Start ``argv`` in a session (and process group) of its own, output to ``logs/<name>.log``."""
        log = open(self.workdir / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
        self.logs.append(log)
        with warnings.catch_warnings():  # jax warns on fork; the child execs at once
            warnings.simplefilter("ignore", RuntimeWarning)
            return subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
                cwd=self.workdir,
            )

    def start_superlink(self) -> None:
        c = certs_lib.Certificates(
            *(self.workdir / "certs" / f for f in ("ca.pem", "server.pem", "server.key"))
        )
        self.superlink = self._start(
            "superlink",
            [
                _bin("flower-superlink"),
                "--ssl-certfile",
                str(c.server_cert),
                "--ssl-keyfile",
                str(c.server_key),
                "--ssl-ca-certfile",
                str(c.ca_cert),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--disable-runtime-dependency-installation",
            ],
        )

    def start_node(self, client_id: int, *, fault: str | None = None) -> None:
        """Start client ``client_id``'s runtime and SuperNode (again, after a kill: a restart)."""
        sock = self.workdir / "sockets" / f"client_{client_id}.sock"
        sock.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "fljax.deploy.node", "--config", str(self.workdir / "config.json")]
        argv += ["--shard", str(self.workdir / "shards" / f"client_{client_id}.npz"), "--socket", str(sock)]
        if fault:
            argv += ["--fault", fault]
        supernode = [
            _bin("flower-supernode"),
            "--superlink",
            f"127.0.0.1:{self.port}",
            "--root-certificates",
            str(self.workdir / "certs" / "ca.pem"),
            "--node-config",
            f'client-id={client_id} socket="{sock}"',
            "--port",
            str(free_port()),
        ]
        # One process group per node (runtime, SuperNode, its ClientApps): a crash kills all of it.
        script = f"{shlex.join(argv)} & exec {shlex.join(supernode)}"
        self.nodes[client_id] = self._start(f"node_{client_id}", ["/bin/sh", "-c", script])

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Wait until the SuperLink accepts connections and every node runtime listens."""
        deadline = time.monotonic() + timeout
        while True:
            if self.superlink is not None and self.superlink.poll() is not None:
                raise RuntimeError(f"the SuperLink exited; see {self.workdir}/logs/superlink.log")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the SuperLink does not listen on port {self.port}") from None
                time.sleep(0.2)
        for c, runtime in self.nodes.items():
            sock = self.workdir / "sockets" / f"client_{c}.sock"
            while not sock.exists():
                if runtime.poll() is not None:
                    raise RuntimeError(
                        f"node runtime of client {c} exited; see {self.workdir}/logs/node_{c}.log"
                    )
                if time.monotonic() > deadline:
                    raise TimeoutError(f"node runtime of client {c} not ready after {timeout:g}s")
                time.sleep(0.2)

    def kill_node(self, client_id: int) -> None:
        """Kill client ``client_id``'s SuperNode and runtime (SIGKILL, as a crash)."""
        p = self.nodes.pop(client_id, None)
        if p is not None:
            _kill(p, signal.SIGKILL)
            p.wait()

    def submit(self, run_config: dict, *, timeout: float = 600.0) -> subprocess.CompletedProcess:
        """``flwr run`` the app with ``run_config``, streaming its logs until it ends."""
        items = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        argv = [_bin("flwr"), "run", str(self.workdir / "app"), "local", "--stream", "--run-config", items]
        return subprocess.run(
            argv, env=self.env, capture_output=True, text=True, timeout=timeout, cwd=self.workdir, check=False
        )

    def stop(self) -> None:
        """Stop every process this deployment started (SIGTERM, then SIGKILL)."""
        procs = list(self.nodes.values())
        if self.superlink is not None:
            procs.append(self.superlink)
        for p in procs:
            _kill(p, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill(p, signal.SIGKILL)
                p.wait()
        self.nodes.clear()
        self.superlink = None
        for log in self.logs:
            log.close()
        self.logs.clear()


def live_processes(pgid: int) -> list[int]:
    """Pids of the processes of group ``pgid`` that still run (zombies, dead but not yet reaped
    by their parent, do not count). Linux (``/proc``)."""
    pids = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def _bin(name: str) -> str:
    path = pathlib.Path(sys.executable).with_name(name)
    return str(path) if path.exists() else name


def _kill(p: subprocess.Popen, sig) -> None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, sig)  # the process and whatever it started (its own session)
        except ProcessLookupError:
            pass


def prepare(config: cfg.Config, workdir, *, max_message_bytes: int = 64 * 2**20) -> tuple[Deployment, dict]:
    """Write shards, certificates, the app and the Flower connection under ``workdir``.

    Returns the :class:`Deployment` (nothing started) and facts for the run config
    (``num-clients``, ``num-classes``, ``config-json``).
    """
    workdir = pathlib.Path(workdir).resolve()
    for d in ("logs", "sockets", "shards", "app", "flwr_home"):
        (workdir / d).mkdir(parents=True, exist_ok=True)
    os.chmod(workdir / "sockets", 0o700)
    prepared = load_data(config)
    train_data, num_classes = prepared.train, prepared.num_classes
    for c, data in enumerate(shards(config, train_data)):
        test = None if prepared.test is None else prepared.test.client(c)
        node_lib.write_shard(workdir / "shards" / f"client_{c}.npz", data, c, num_classes, test=test)
    (workdir / "config.json").write_text(json.dumps(cfg.to_dict(config)))
    certs = certs_lib.generate(workdir / "certs")
    shutil.copyfile(
        pathlib.Path(__file__).with_name("flower_app.py"), workdir / "app" / "fljax_flower_app.py"
    )
    (workdir / "app" / "pyproject.toml").write_text(APP_PYPROJECT.format(max_bytes=int(max_message_bytes)))
    port = free_port()
    (workdir / "flwr_home" / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{certs.ca_cert}"\n'
    )
    facts = {
        "num-clients": train_data.num_clients,
        "num-classes": num_classes,
        "config-json": str(workdir / "config.json"),
    }
    return Deployment(workdir, port, _env(workdir / "flwr_home")), facts


def run(
    config: cfg.Config,
    out,
    *,
    nodes: int | None = None,
    max_message_bytes: int = 64 * 2**20,
    faults: dict[int, str] | None = None,
) -> dict:
    """Run ``config`` on a local deployment (module docstring); returns ``summary.json``.

    ``config.deploy`` (default ``Deploy()``: plaintext updates) picks the secure sum and the
    server's timeout per message round; with a secure sum and no ``config.secagg``, the
    encoding is ``SecAgg()``. ``experiments/run.py --set deploy='{"secure": "secagg"}'``
    gets here through :func:`fljax.experiment.trainer.run`.

    Args:
      config: the experiment (the same config a simulation runs).
      out: output folder: the trainer's files, plus ``deploy/`` (certificates, shards, logs).
      nodes: number of SuperNodes; must equal the population's clients (default: that number).
      max_message_bytes: the server's limit on one reply.
      faults: ``{client id: fault}`` for failure tests (:class:`fljax.deploy.node.Node`).
    """
    settings = config.deploy or cfg.Deploy()
    secure = None if settings.secure == "none" else settings.secure
    if secure is not None and config.secagg is None:
        config = dataclasses.replace(config, secagg=cfg.SecAgg())
    server.server_config(config, secure)  # refuse what cannot be deployed before starting anything
    out = pathlib.Path(out).resolve()
    deployment, facts = prepare(config, out / "deploy", max_message_bytes=max_message_bytes)
    if nodes is not None and nodes != facts["num-clients"]:
        raise ValueError(
            f"--nodes {nodes}: the population of {config.name!r} has {facts['num-clients']} clients, one node each"
        )
    try:
        deployment.start_superlink()
        for c in range(facts["num-clients"]):
            deployment.start_node(c, fault=(faults or {}).get(c))
        deployment.wait_ready()
        result = deployment.submit(
            facts
            | {
                "out": str(out),
                "secure": settings.secure,
                "timeout": float(settings.timeout),
                "max-message-bytes": int(max_message_bytes),
            },
            # generous: every message round of every round may wait out its timeout
            timeout=600.0 + config.rounds * 6 * float(settings.timeout),
        )
        (out / "deploy" / "logs" / "flwr_run.log").write_text(result.stdout + result.stderr)
    finally:
        deployment.stop()
    summary = out / "summary.json"
    if not summary.exists():
        raise RuntimeError(f"the deployed run wrote no summary; see {out / 'deploy' / 'logs'}")
    return json.loads(summary.read_text())


def main(argv=None) -> dict:
    """Command line: ``python -m fljax.deploy.local --config NAME --nodes N [--secure M] --out DIR``."""
    from fljax.experiment import cli

    p = argparse.ArgumentParser(prog="python -m fljax.deploy.local", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="config name (experiments/configs) or path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--nodes", type=int, default=None, help="SuperNodes (= the population's clients)")
    p.add_argument("--secure", choices=("none", "secagg", "he"), default="none")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per message round")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    configs = pathlib.Path.cwd() / "experiments" / "configs"
    config = cli.load_config(args.config, args.set, configs_dir=configs if configs.is_dir() else None)
    config = dataclasses.replace(config, deploy=cfg.Deploy(secure=args.secure, timeout=args.timeout))
    summary = run(config, args.out, nodes=args.nodes)
    print(json.dumps({"final": summary["final"], "dropped": summary["deployment"]["dropped"]}, indent=1))
    return summary


if __name__ == "__main__":
    main()

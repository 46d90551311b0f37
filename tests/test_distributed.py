"""Multi-process rounds (``fljax.distributed``): 2 and 4 local CPU processes against one process.

Each test starts the processes with :func:`fljax.distributed.launch_local` (gloo CPU
collectives), every process running this file as a script (``_worker``): it gathers its own
slots of one fixed cohort and runs two rounds of FedAvg, DP-FedAvg (seeded noise: a
reproducible simulation) and FedAvg over the simulated secure sum on a mesh of 4 devices in
all (2 processes x 2 devices, 4 processes x 1 device). The single-process reference runs the
same rounds in one process holding 4 CPU devices (``simulation.client_mesh()``, the cohort
gathered whole), each device training the same clients in the same chunks.

Equal to what:

* secure aggregation: bit for bit (the clients' updates are the same computations, the
  encoding is elementwise, the masked sum is an integer sum modulo ``2**bits``);
* plain and DP: up to float reassociation. The only difference is the order in which the
  4 devices' partial sums are added (an all-reduce across processes instead of within one);
  one addition of float32 values rounds by at most ``2**-24`` relative, the server update is a
  sum of 4 partials, and a second round carries the first's difference through local SGD.
  ``rtol=1e-5, atol=1e-6`` (about 80 ulps on parameters of order 0.1-1) covers that with
  room while any real error (a client counted twice or missing, noise drawn twice or from
  another key: at least 1e-3 here) fails it. The DP noise (std ``0.05 / 8`` per
  coordinate) comes from the same key in every process and is added once to the summed
  total, so it cancels out of the comparison.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import pathlib
import sys

import numpy as np

COHORT = [3, 0, 7, 5, -1, 1, 6, 2]  # 8 slots (one padding), 2 per device on 4 devices
NUM_DEVICES = 4
ROUNDS = 2
CHECKPOINT_STEP = ROUNDS
# Every process of the jobs and of the reference: XLA's LLVM optimisation off halves compile
# time (a codegen setting, the same everywhere, so the comparisons are unaffected).
ENV = {"XLA_FLAGS": "--xla_backend_optimization_level=0"}
TIMEOUT = 300  # seconds; the file takes ~30 s on 2 idle cores


def _setup():
    """Population, initial params and the three algorithms (same in every process)."""
    import jax
    import optax

    from fljax import aggregators, base, client, models, privacy, secagg
    from fljax.algorithms import fedavg
    from fljax.data import FederatedData

    rng = np.random.default_rng(0)
    sizes = [5, 7, 3, 9, 4, 6, 8, 2, 5, 6]
    data = FederatedData.from_clients(
        [(rng.normal(size=(n, 6)).astype(np.float32), rng.integers(0, 3, n).astype(np.int32)) for n in sizes],
        num_classes=3,
    )
    model = models.MLP(hidden=(8,), num_classes=3)
    update = client.local_sgd(model, optax.sgd(0.1), batch_size=4, num_epochs=1)
    dp_cfg = privacy.DPConfig(clip_norm=0.05, noise_multiplier=1.0, population_size=10, cohort_size=8)
    sa_cfg = secagg.SecAggConfig(max_weight=16.0)  # example counts up to 9 as weights
    algos = {
        "plain": fedavg.fedavg(update),
        "dp": fedavg.fedavg(update, aggregator=privacy.dp(dp_cfg)),
        "secagg": fedavg.fedavg(update, aggregator=aggregators.mean(secagg.secure_sum(sa_cfg))),
    }
    params = models.init_params(model, (6,), jax.random.key(0))
    return data, params, algos, base.Performance(chunk_size=None)


def _record(state, metrics) -> dict:
    import jax

    return {
        "params": [np.asarray(x).tolist() for x in jax.tree.leaves(state.params)],
        "metrics": {k: float(v) for k, v in metrics.items()},
    }


def _worker(out_dir: str) -> None:
    """One process of the job (run as a script by the tests)."""
    from fljax import distributed

    distributed.initialize()
    import jax

    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_numpy_rank_promotion", "raise")
    from fljax import checkpoint, random

    data, params, algos, perf = _setup()
    mesh = distributed.client_mesh()
    gathered = []

    class Recorded:  # the population, recording which clients this process reads
        def cohort(self, ids, **kwargs):
            gathered.extend(int(i) for i in ids)
            return data.cohort(ids, **kwargs)

    cohort = distributed.gather_cohort(Recorded(), COHORT, mesh=mesh)
    run_key = random.run_key(seed=0)
    results, out = {}, pathlib.Path(out_dir)
    for name, algo in algos.items():
        step = distributed.jit_round(algo, mesh, perf)
        state = algo.init(params)
        for r in range(ROUNDS):
            state, metrics = step(state, cohort, random.round_key(run_key, r))
            if distributed.is_writer():
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(
                        json.dumps({"algo": name, "round": r + 1} | _record(state, metrics)["metrics"]) + "\n"
                    )
        results[name] = _record(*distributed.to_host((state, metrics)))
        if name == "plain" and "--checkpoint" in sys.argv:  # every process calls it; orbax writes once
            checkpoint.save(out / "checkpoints", CHECKPOINT_STEP, state, {"round": ROUNDS})
    slots = distributed.process_clients(len(COHORT), mesh)
    own = random.secret_key()  # drawn in each process, then process 0's everywhere
    shared = distributed.broadcast_key(own)
    print(
        "RESULT "
        + json.dumps(
            {
                "process": jax.process_index(),
                "processes": jax.process_count(),
                "devices": jax.device_count(),
                "slots": [slots.start, slots.stop],
                "gathered": gathered,
                "shard_ids": sorted(int(i) for s in cohort.client_ids.addressable_shards for i in s.data),
                "results": results,
                "secret": [jax.random.key_data(k).tolist() for k in (own, shared)],
            }
        ),
        flush=True,
    )


def _reference_worker() -> None:
    """The same rounds in one process holding the 4 devices (the plain single-process round)."""
    import jax

    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_numpy_rank_promotion", "raise")
    from fljax import random, simulation

    data, params, algos, perf = _setup()
    mesh = simulation.client_mesh()
    cohort = data.cohort(COHORT)
    run_key = random.run_key(seed=0)
    results = {}
    for name, algo in algos.items():
        step = jax.jit(algo.with_performance(dataclasses.replace(perf, mesh=mesh)).update)
        state = algo.init(params)
        for r in range(ROUNDS):
            state, metrics = step(state, cohort, random.round_key(run_key, r))
        results[name] = _record(state, metrics)
    print("RESULT " + json.dumps({"devices": jax.device_count(), "results": results}), flush=True)


def _gloo_available() -> bool:
    from jax._src.lib import _jax

    return hasattr(_jax, "make_gloo_tcp_collectives")


def _results(done) -> list[dict]:
    outs = []
    for p in done:
        assert p.returncode == 0, p.stderr[-3000:]
        lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
        assert len(lines) == 1, p.stdout[-2000:]
        outs.append(json.loads(lines[0][len("RESULT ") :]))
    return outs


_REFERENCE: dict = {}


def _run(num_processes: int, tmp_path, *extra) -> tuple[list[dict], dict]:
    """Each process's RESULT, and the reference's (run alongside the first job, then cached)."""
    from fljax import distributed

    launch = functools.partial(distributed.launch_local, env=ENV, timeout=TIMEOUT)
    argv = [__file__, "--worker", str(tmp_path), *extra]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        job = pool.submit(launch, argv, num_processes, local_device_count=NUM_DEVICES // num_processes)
        if not _REFERENCE:
            (ref,) = _results(launch([__file__, "--reference"], 1, local_device_count=NUM_DEVICES))
            assert ref["devices"] == NUM_DEVICES
            _REFERENCE.update(ref["results"])
        return _results(job.result()), _REFERENCE


def _check(outs: list[dict], ref: dict, num_processes: int) -> None:
    from tests import helpers

    assert [o["process"] for o in outs] == list(range(num_processes))
    assert all(o["processes"] == num_processes and o["devices"] == NUM_DEVICES for o in outs)
    # each process gathered exactly its own block of slots, the blocks tile the cohort
    per = len(COHORT) // num_processes
    for i, o in enumerate(outs):
        assert o["slots"] == [i * per, (i + 1) * per]
        assert o["gathered"] == COHORT[i * per : (i + 1) * per]
        assert o["shard_ids"] == sorted(COHORT[i * per : (i + 1) * per])
    # every process holds the same (replicated) result, bit for bit
    for o in outs[1:]:
        assert o["results"] == outs[0]["results"]
    # a secret key each process drew differently, then process 0's in every process
    assert len({str(o["secret"][0]) for o in outs}) == num_processes
    assert all(o["secret"][1] == outs[0]["secret"][0] for o in outs)
    got = outs[0]["results"]
    helpers.assert_trees_equal(got["secagg"]["params"], ref["secagg"]["params"])
    assert got["secagg"]["metrics"] == ref["secagg"]["metrics"]
    for name in ("plain", "dp"):
        helpers.assert_trees_close(got[name]["params"], ref[name]["params"], rtol=1e-5, atol=1e-6)
        for k, v in ref[name]["metrics"].items():
            np.testing.assert_allclose(got[name]["metrics"][k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    # the round did something: the three variants differ from the initial model and each other
    assert not np.allclose(got["plain"]["params"][0], got["dp"]["params"][0])
    assert ref["dp"]["metrics"]["num_clipped"] > 0 and ref["plain"]["metrics"]["num_clients"] == 7


def test_two_processes_two_devices_each(tmp_path):
    if not _gloo_available():
        import pytest

        pytest.skip("this jaxlib has no gloo CPU collectives")
    outs, ref = _run(2, tmp_path, "--checkpoint")
    _check(outs, ref, 2)
    # metrics written once (by process 0), the checkpoint once and readable
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(x["algo"], x["round"]) for x in lines] == [
        (a, r) for a in ("plain", "dp", "secagg") for r in (1, 2)
    ]
    import jax

    from fljax import checkpoint

    _, params, algos, _ = _setup()
    restored, extra = checkpoint.restore(
        tmp_path / "checkpoints", CHECKPOINT_STEP, algos["plain"].init(params)
    )
    assert checkpoint.steps(tmp_path / "checkpoints") == [CHECKPOINT_STEP] and extra == {"round": ROUNDS}
    assert int(restored.round) == ROUNDS
    got = [np.asarray(x).tolist() for x in jax.tree.leaves(restored.params)]
    assert got == outs[0]["results"]["plain"]["params"]


def test_four_processes_one_device_each(tmp_path):
    if not _gloo_available():
        import pytest

        pytest.skip("this jaxlib has no gloo CPU collectives")
    _check(*_run(4, tmp_path), 4)


def test_bad_inputs_name_the_problem():
    import pytest

    from fljax import distributed

    data, _, algos, _ = _setup()
    mesh = distributed.client_mesh()  # this process's 4 devices
    with pytest.raises(ValueError, match="does not divide over 4 devices"):
        distributed.process_clients(6, mesh)
    with pytest.raises(ValueError, match="no axis 'rows'"):
        distributed.process_clients(8, mesh, axis="rows")
    with pytest.raises(ValueError, match="client_mask must be"):
        distributed.gather_cohort(data, COHORT, mesh=mesh, client_mask=[True])
    step = distributed.jit_round(algos["plain"], mesh)
    with pytest.raises(ValueError, match="gather_cohort"):  # a host cohort, not the sharded one
        step(None, data.cohort(COHORT), None)
    with pytest.raises(ValueError, match="process_id must lie in"):
        distributed.initialize(num_processes=2, process_id=2)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(sys.argv[2])
elif __name__ == "__main__" and sys.argv[1:2] == ["--reference"]:
    _reference_worker()

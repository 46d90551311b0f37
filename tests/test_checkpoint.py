"""Checkpoints: atomic saves, the newest k kept, damage detected, fallback to the previous one."""

import shutil

import jax.numpy as jnp
import pytest
from orbax.checkpoint.path import atomicity

from fljax import checkpoint
from tests import helpers

STATE = {"w": jnp.sin(jnp.arange(2000.0)), "b": jnp.ones((2, 3), jnp.int32)}

# Reading a damaged checkpoint can leave a tensorstore future whose callback fires after orbax has
# closed its asyncio loop ("Event loop is closed" in a finaliser) or a coroutine never awaited;
# both are timing-dependent orbax teardown, not results: fljax's own warnings stay errors here.
pytestmark = [
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning"),
]


def _saved(directory, rounds):
    for r in rounds:
        checkpoint.save(directory, r, _plus(STATE, r), {"round": r})
    return directory


def _plus(tree, r):
    return {"w": tree["w"] + r, "b": tree["b"] * r}


def test_round_trip_keeps_the_newest_three(tmp_path):
    _saved(tmp_path, [1, 2, 3, 4])
    assert checkpoint.steps(tmp_path) == [2, 3, 4] and checkpoint.latest_step(tmp_path) == 4
    state, extra = checkpoint.restore(tmp_path, 3, STATE)
    helpers.assert_trees_equal(state, _plus(STATE, 3))
    assert extra == {"round": 3}
    with pytest.raises(FileExistsError):
        checkpoint.save(tmp_path, 4, STATE)
    assert checkpoint.delete_after(tmp_path, 2) == [3, 4] and checkpoint.steps(tmp_path) == [2]
    assert checkpoint.latest_step(tmp_path / "missing") is None


class Died(Exception):
    pass


def test_an_interrupted_save_leaves_no_checkpoint_and_blocks_nothing(tmp_path, monkeypatch):
    _saved(tmp_path, [2])

    async def dies(self):  # the process "dies" after writing everything, before the commit
        raise Died

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", dies)
    with pytest.raises(Died):
        checkpoint.save(tmp_path, 4, STATE)
    monkeypatch.undo()
    assert any(".orbax-checkpoint-tmp" in p.name for p in tmp_path.iterdir())
    assert checkpoint.latest_step(tmp_path) == 2
    assert checkpoint.restore_latest(tmp_path, STATE)[0] == 2
    _saved(tmp_path, [4])
    assert checkpoint.steps(tmp_path) == [2, 4]


def _flip_a_byte(step_dir):
    """Flips a byte in the middle of the checkpoint's largest file, its array data: orbax reads
    it back without an error, as wrong numbers."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
    biggest = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    biggest.write_bytes(bytes(data))


DAMAGE = {
    "a flipped data byte": _flip_a_byte,  # caught by the digest only
    "a garbage manifest": lambda d: (d / "state" / "manifest.ocdbt").write_bytes(b"garbage"),
    "no state": lambda d: shutil.rmtree(d / "state"),
    "unreadable extra": lambda d: (d / "extra" / "metadata").write_text("{not json"),
    "an empty folder": lambda d: [shutil.rmtree(d), d.mkdir()],
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
    _saved(tmp_path, [2, 4])
    DAMAGE[damage](tmp_path / "round_000004")
    error = checkpoint.CorruptCheckpointError if damage == "a flipped data byte" else Exception
    with pytest.raises(error):
        checkpoint.restore(tmp_path, 4, STATE)
    with pytest.warns(checkpoint.CheckpointFallbackWarning, match="round 4 .*falling back to round 2") as w:
        step, state, extra = checkpoint.restore_latest(tmp_path, STATE)
    ours = [x for x in w if issubclass(x.category, checkpoint.CheckpointFallbackWarning)]
    assert len(ours) == 1 and "\n" not in str(ours[0].message)  # (orbax may add its own, see above)
    assert (step, extra) == (2, {"round": 2})
    helpers.assert_trees_equal(state, _plus(STATE, 2))
    messages = []
    assert checkpoint.restore_latest(tmp_path, STATE, on_unreadable=messages.append)[0] == 2
    assert len(messages) == 1
    assert checkpoint.restore_latest(tmp_path, STATE, max_step=3)[0] == 2  # no warning: 4 not tried


def test_nothing_readable_gives_none(tmp_path):
    assert checkpoint.restore_latest(tmp_path, STATE) is None
    _saved(tmp_path, [2])
    _flip_a_byte(tmp_path / "round_000002")
    with pytest.warns(checkpoint.CheckpointFallbackWarning, match="no older checkpoint"):
        assert checkpoint.restore_latest(tmp_path, STATE) is None


def test_checkpoints_of_earlier_fljax_versions_are_still_read(tmp_path):
    import json

    import orbax.checkpoint as ocp

    path = tmp_path / "round_000002"  # the layout fljax wrote before the digest
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path / "state", _plus(STATE, 2))
        ckpt.wait_until_finished()
    (path / "extra.json").write_text(json.dumps({"round": 2}))
    assert checkpoint.latest_step(tmp_path) == 2
    state, extra = checkpoint.restore(tmp_path, 2, STATE)
    helpers.assert_trees_equal(state, _plus(STATE, 2))
    assert extra == {"round": 2}

"""Reference models of the FL papers: parameter counts from their formulas, shapes, training, vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fljax import losses, models
from tests import helpers

_KEY = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)  # an abstract key: shapes only


def _count(model, input_shape) -> int:
    """Parameter count from shapes alone (no compute)."""
    return models.num_params(jax.eval_shape(lambda key: models.init_params(model, input_shape, key), _KEY))


def _conv(k, cin, cout):
    return k * k * cin * cout + cout


def _dense(nin, nout):
    return nin * nout + nout


def _lstm(nin, h):
    # Four gates: input kernel (no bias), recurrent kernel and bias.
    return 4 * (nin * h + h * h + h)


def test_mcmahan_cnn_parameter_count():
    # 28 -> 14 -> 7 after two SAME convolutions and two 2x2 pools.
    expected = _conv(5, 1, 32) + _conv(5, 32, 64) + _dense(7 * 7 * 64, 512) + _dense(512, 10)
    assert expected == 1_663_370  # the count McMahan et al. 2017 report
    assert _count(models.McMahanCNN(), (28, 28, 1)) == expected


def test_emnist_cnn_parameter_count():
    # 28 -> 26 -> 24 after two VALID 3x3 convolutions, 12 after the pool.
    expected = _conv(3, 1, 32) + _conv(3, 32, 64) + _dense(12 * 12 * 64, 128) + _dense(128, 62)
    assert expected == 1_206_590
    assert _count(models.EMNISTCNN(), (28, 28, 1)) == expected


def test_char_lstm_parameter_count():
    vocab = 90  # fljax.data.datasets.shakespeare.VOCAB_SIZE
    expected = vocab * 8 + _lstm(8, 256) + _lstm(256, 256) + _dense(256, vocab)
    assert expected == 820_522
    assert _count(models.CharLSTM(vocab), (80,)) == expected


def test_mlp_2nn_parameter_count():
    expected = _dense(784, 200) + _dense(200, 200) + _dense(200, 10)
    assert expected == 199_210
    assert _count(models.MLP(hidden=(200, 200), num_classes=10), (784,)) == expected


@pytest.mark.parametrize("model,num_classes", [(models.McMahanCNN(), 10), (models.EMNISTCNN(), 62)])
def test_cnn_output_shape(model, num_classes):
    x = jax.ShapeDtypeStruct((3, 28, 28, 1), jnp.float32)
    out = jax.eval_shape(lambda key, x: model.apply(models.init_params(model, (28, 28, 1), key), x), _KEY, x)
    assert out.shape == (3, num_classes) and out.dtype == jnp.float32


@pytest.mark.parametrize("model", [models.McMahanCNN(), models.EMNISTCNN()], ids=["mcmahan", "emnist"])
def test_cnn_conv_settings_change_no_params_and_no_values(model):
    # Small 8x8 images keep this fast; SAME (McMahan) and VALID (EMNIST) padding both covered.
    xla, matmul = model.clone(conv_impl="xla"), model.clone(conv_impl="matmul")
    shapes = lambda m: jax.eval_shape(lambda key: models.init_params(m, (8, 8, 1), key), _KEY)
    assert shapes(xla) == shapes(matmul)
    params = jax.jit(lambda key: models.init_params(xla, (8, 8, 1), key))(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    helpers.assert_trees_close(
        jax.jit(matmul.apply)(params, x), jax.jit(xla.apply)(params, x), rtol=1e-4, atol=1e-5
    )


# One small CharLSTM shared by the tests below, so its init and apply compile once.
VOCAB = 5
TIME = 8
LSTM = models.CharLSTM(VOCAB, embed_dim=4, lstm_sizes=(16, 16))
lstm_init = jax.jit(lambda key: models.init_params(LSTM, (TIME,), key))  # float zeros, cast to tokens
lstm_apply = jax.jit(LSTM.apply)


def test_char_lstm_shapes_and_integer_cast():
    params = lstm_init(jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, TIME), 0, VOCAB, jnp.int32)
    logits = lstm_apply(params, tokens)
    assert logits.shape == (2, TIME, VOCAB) and logits.dtype == jnp.float32
    helpers.assert_trees_equal(logits, lstm_apply(params, tokens.astype(jnp.float32)))


def test_char_lstm_is_causal():
    params = lstm_init(jax.random.key(0))
    tokens = jnp.array(
        [[1, 2, 3, 4, 0, 1, 2, 3], [1, 2, 3, 4, 3, 3, 3, 3]], jnp.int32
    )  # differ from position 4
    out = lstm_apply(params, tokens)
    helpers.assert_trees_equal(out[0, :4], out[1, :4])  # earlier positions see nothing of later tokens
    assert not np.allclose(out[0, 4:], out[1, 4:])


def test_char_lstm_sgd_lowers_next_character_loss():
    seq = jnp.asarray(np.tile(np.array([1, 2, 3, 4], np.int32), 3)[: TIME + 1])  # "abcdabcda"
    x, y = seq[None, :-1], seq[None, 1:]  # next-character targets, as in shakespeare.tokenize
    opt = optax.sgd(1.0)

    def loss(params):
        # [batch, time, vocab] logits with [batch, time] integer labels.
        return jnp.mean(losses.softmax_cross_entropy(LSTM.apply(params, x), y))

    @jax.jit
    def step(params, opt_state):
        value, grad = jax.value_and_grad(loss)(params)
        updates, opt_state = opt.update(grad, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    params = lstm_init(jax.random.key(0))
    opt_state = opt.init(params)
    params, opt_state, first = step(params, opt_state)
    for _ in range(60):
        params, opt_state, last = step(params, opt_state)
    assert float(last) < 0.5 * float(first)


def test_vmap_over_clients_equals_a_loop():
    per_client = [lstm_init(key) for key in jax.random.split(jax.random.key(0), 3)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *per_client)  # [clients, ...] leaves
    # [clients, batch, time] tokens.
    tokens = jax.random.randint(jax.random.key(1), (3, 2, TIME), 0, VOCAB, jnp.int32)
    out = jax.jit(jax.vmap(LSTM.apply))(stacked, tokens)
    assert out.shape == (3, 2, TIME, VOCAB)
    for c, params in enumerate(per_client):
        helpers.assert_trees_close(out[c], lstm_apply(params, tokens[c]), rtol=1e-5, atol=1e-6)

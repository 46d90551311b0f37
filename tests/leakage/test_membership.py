"""Membership inference: attack statistics, ROC read-outs and vmapped shadow federations.

The attack tests share ONE set of 9 tiny-MLP federations (32 clients of 3 examples, labels from
a linear teacher with 30% flipped, 10 local epochs: members are memorised) trained in one vmap.
"""

import jax
import numpy as np
import optax
import pytest

from fljax import client, models
from fljax import random as fl_random
from fljax.algorithms import fedavg
from fljax.data import FederatedData
from fljax.leakage import membership, shadows

NUM_FEATURES, NUM_CLASSES = 8, 4
NUM_MODELS, NUM_CLIENTS, PER_CLIENT = 9, 32, 3


def _teacher_data(num_clients: int, per_client: int, seed: int) -> FederatedData:
    """Labels from a fixed linear teacher, 30% replaced by random ones (hard, memorised examples)."""
    rng = np.random.default_rng(seed)
    w = np.random.default_rng(123).normal(size=(NUM_FEATURES, NUM_CLASSES))
    clients = []
    for _ in range(num_clients):
        x = rng.normal(size=(per_client, NUM_FEATURES)).astype(np.float32)
        flip = rng.random(per_client) < 0.3
        y = np.where(flip, rng.integers(0, NUM_CLASSES, per_client), np.argmax(x @ w, axis=1))
        clients.append((x, y.astype(np.int32)))
    return FederatedData.from_clients(clients, num_classes=NUM_CLASSES)


MODEL = models.MLP(hidden=(32,), num_classes=NUM_CLASSES)


def _init(key):
    return models.init_params(MODEL, (NUM_FEATURES,), key)


def _algorithm(num_epochs: int = 10):
    update = client.local_sgd(MODEL, optax.sgd(0.2, momentum=0.9), batch_size=4, num_epochs=num_epochs)
    return fedavg.fedavg(update)


@pytest.fixture(scope="module")
def trained():
    data = _teacher_data(NUM_CLIENTS, PER_CLIENT, seed=0)
    key = jax.random.key(0)
    in_mask = shadows.membership_masks(NUM_MODELS, NUM_CLIENTS, fl_random.stream(key, "data"))
    state, _ = shadows.train_models(
        _algorithm(), _init, data.cohort(range(NUM_CLIENTS)), in_mask, 10, fl_random.stream(key, "loop")
    )
    held_out = _teacher_data(200, PER_CLIENT, seed=1)  # never in any cohort
    x = np.concatenate([data.x, held_out.x])
    y = np.concatenate([data.y, held_out.y])
    phi, loss = shadows.model_statistics(MODEL.apply, state.params, x, y)
    return data, held_out, in_mask, phi, loss


def test_attacks_detect_members_of_an_overfit_federation(trained):
    data, _, in_mask, phi, loss = trained
    n = data.y.shape[0]
    pooled = membership.leave_one_out(phi[:, :n], loss[:, :n], in_mask, data.offsets, global_variance=True)
    for level in ("example", "client"):
        for attack, (scores, labels) in pooled[level].items():
            m = membership.attack_metrics(scores, labels)
            se = membership.auc_null_standard_error(m["num_members"], m["num_nonmembers"])
            # example-level labels come in clusters of 3 (one client), so the design effect is
            # at most 3: 0.5 + 3 * sqrt(3) * se is still a conservative bound for chance.
            assert m["auc"] > 0.5 + 3 * np.sqrt(3) * se, (level, attack, m)
            assert m["balanced_accuracy"] > 0.6, (level, attack, m)


def test_lira_beats_the_loss_attack_on_hard_examples(trained):
    # With 30% random labels, a non-member's loss depends mostly on whether its label is
    # flipped; LiRA's per-example calibration removes that, so it ranks better overall and
    # much better at low FPR (the paper's point). Measured margins are ~0.07 AUC and ~3x TPR.
    data, _, in_mask, phi, loss = trained
    n = data.y.shape[0]
    pooled = membership.leave_one_out(phi[:, :n], loss[:, :n], in_mask, data.offsets, global_variance=True)
    lira = membership.attack_metrics(*pooled["example"]["lira_online"], fprs=(0.05,))
    base = membership.attack_metrics(*pooled["example"]["loss"], fprs=(0.05,))
    assert lira["auc"] > base["auc"] + 0.02, (lira, base)
    assert lira["tpr_at_fpr_0.05"] > 1.5 * base["tpr_at_fpr_0.05"], (lira, base)


def test_auc_is_chance_for_examples_no_model_trained_on(trained):
    # Held-out examples get "member" labels from fresh coins that nothing else depends on, so the
    # scores are independent of the labels and the AUC is 0.5 in expectation with the
    # Mann-Whitney null standard error; 4 standard errors leave a 6e-5 false-alarm rate.
    data, held_out, in_mask, phi, loss = trained
    n = data.y.shape[0]
    owner = membership.example_clients(held_out.offsets)
    rng = np.random.default_rng(7)
    example_in = np.concatenate(
        [in_mask[:, membership.example_clients(data.offsets)], np.zeros_like(phi[:, n:], bool)], 1
    )
    pooled = {a: ([], [], [], []) for a in ("loss", "lira_online", "lira_offline")}
    for t in range(NUM_MODELS):
        others = np.arange(NUM_MODELS) != t
        scores = {
            "loss": membership.loss_scores(loss[t, n:]),
            "lira_online": membership.lira_scores(phi[t], phi[others], example_in[others])[n:],
            "lira_offline": membership.lira_scores(phi[t], phi[others], example_in[others], online=False)[n:],
        }
        example_claim = rng.random(owner.shape[0]) < 0.5
        client_claim = rng.random(held_out.num_clients) < 0.5
        for a, s in scores.items():
            pooled[a][0].append(s)
            pooled[a][1].append(example_claim)
            pooled[a][2].append(membership.client_scores(s, owner, held_out.num_clients))
            pooled[a][3].append(client_claim)
    for a, (s, y, cs, cy) in pooled.items():
        for scores, labels in ((s, y), (cs, cy)):
            scores, labels = np.concatenate(scores), np.concatenate(labels)
            m = membership.attack_metrics(scores, labels)
            se = membership.auc_null_standard_error(m["num_members"], m["num_nonmembers"])
            assert abs(m["auc"] - 0.5) < 4 * se, (a, m, se)


def test_lira_matches_the_gaussian_likelihood_ratio():
    # Shadow statistics drawn from known per-example Gaussians: with many shadows the fitted
    # online score is the true log likelihood ratio. From ~2000 draws per side a std is off by
    # ~1.6% (sd 1/sqrt(2n)), so a squared z-score by ~3% (up to ~3 sd over 50 examples: 10%).
    rng = np.random.default_rng(0)
    n, s = 50, 4000
    mu_in, mu_out = rng.normal(2.0, 1.0, n), rng.normal(-1.0, 1.0, n)
    sd_in, sd_out = rng.uniform(0.5, 1.5, n), rng.uniform(0.5, 1.5, n)
    shadow_in = rng.random((s, n)) < 0.5
    phi = np.where(shadow_in, rng.normal(mu_in, sd_in, (s, n)), rng.normal(mu_out, sd_out, (s, n)))
    target = rng.normal(0.5, 1.0, n)
    exact = (
        -0.5 * ((target - mu_in) / sd_in) ** 2
        - np.log(sd_in)
        + 0.5 * ((target - mu_out) / sd_out) ** 2
        + np.log(sd_out)
    )
    online = membership.lira_scores(target, phi, shadow_in)
    assert np.all(np.abs(online - exact) <= 0.2 + 0.1 * np.abs(exact)), np.abs(online - exact).max()
    offline = membership.lira_scores(target, phi, shadow_in, online=False)
    z = (target - mu_out) / sd_out
    assert np.all(np.abs(offline - z) <= 0.1 + 0.05 * np.abs(z)), np.abs(offline - z).max()
    # the global variance pools one std per side: exact when every example has the same stds
    phi = np.where(shadow_in, rng.normal(mu_in, 0.8, (s, n)), rng.normal(mu_out, 1.2, (s, n)))
    exact = -0.5 * ((target - mu_in) / 0.8) ** 2 + 0.5 * ((target - mu_out) / 1.2) ** 2 + np.log(1.2 / 0.8)
    pooled = membership.lira_scores(target, phi, shadow_in, global_variance=True)
    assert np.all(np.abs(pooled - exact) <= 0.2 + 0.05 * np.abs(exact)), np.abs(pooled - exact).max()


def test_lira_fills_in_examples_without_in_or_out_shadows():
    phi = np.array([[3.0, 5.0, 0.0], [3.2, 5.2, 0.2], [0.0, 2.0, 0.1], [0.2, 2.2, 0.3]])
    shadow_in = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 0], [0, 0, 0]], bool)
    s = membership.lira_scores(np.array([3.1, 5.1, 3.1]), phi, shadow_in, global_variance=True)
    assert np.all(np.isfinite(s))
    assert s[2] > 0  # example 2 has no IN shadow: its IN mean is its OUT mean plus the average offset


def test_tpr_at_fpr_on_hand_made_scores():
    y = np.array([1, 1, 1, 0, 0, 0])
    separated = np.array([6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    for f in (0.0, 0.001, 0.01, 0.5):
        assert membership.tpr_at_fpr(separated, y, f) == 1.0
    assert membership.best_balanced_accuracy(separated, y) == 1.0
    assert membership.tpr_at_fpr(-separated, y, 0.5) == 0.0
    assert membership.tpr_at_fpr(-separated, y, 1.0) == 1.0
    # ROC vertices (0,0) (0,1/2) (1/2,1/2) (1/2,1) (1,1): linear between vertices
    s, y2 = np.array([4.0, 3.0, 2.0, 1.0]), np.array([1, 0, 1, 0])
    assert membership.tpr_at_fpr(s, y2, 0.25) == 0.5
    assert membership.tpr_at_fpr(s, y2, 0.5) == 1.0
    # all scores tied: the randomised threshold gives TPR = FPR
    assert membership.tpr_at_fpr(np.zeros(10), np.arange(10) % 2, 0.3) == pytest.approx(0.3)
    # against a brute-force count: at FPR k / n_neg (no ties), the best threshold lets through
    # k non-members, so TPR is the fraction of members above the (k+1)-th highest non-member
    rng = np.random.default_rng(0)
    scores, labels = rng.normal(size=300) + np.repeat([0.0, 1.0], 150), np.repeat([0, 1], 150)
    neg = np.sort(scores[labels == 0])[::-1]
    for k in (1, 3, 30):
        brute = np.mean(scores[labels == 1] > neg[k])  # the top of the vertical step at FPR k/n
        assert membership.tpr_at_fpr(scores, labels, k / 150) == pytest.approx(brute)
    m = membership.attack_metrics(scores, labels)
    assert m["auc"] == pytest.approx(np.mean(scores[labels == 1][:, None] > neg[None, :]))


def test_vmapped_shadows_equal_shadows_trained_one_by_one():
    data = _teacher_data(5, 3, seed=3)
    in_mask = np.array([[True, False, True, True, False], [False, True, True, False, True]])
    algo = _algorithm(num_epochs=2)
    key = jax.random.key(4)
    state, metrics = shadows.train_models(algo, _init, data.cohort(range(5)), in_mask, 2, key)
    update = jax.jit(algo.update)
    for m in range(2):
        run = jax.random.fold_in(key, m)
        one = algo.init(_init(fl_random.stream(run, "init")))
        cohort = data.cohort(range(5), client_mask=in_mask[m])
        for r in range(2):
            one, round_metrics = update(one, cohort, fl_random.round_key(run, r))
        assert int(round_metrics["num_clients"]) == in_mask[m].sum() == int(metrics["num_clients"][m, -1])
        for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(state.params), strict=True):
            np.testing.assert_allclose(np.asarray(b[m]), np.asarray(a), rtol=1e-5, atol=1e-6)


def test_logit_confidence_is_the_log_odds_of_the_true_label():
    logits = np.random.default_rng(0).normal(size=(20, 5)).astype(np.float32) * 3
    labels = np.arange(20) % 5
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    py = p[np.arange(20), labels]
    np.testing.assert_allclose(
        shadows.logit_confidence(logits, labels), np.log(py / (1 - py)), rtol=1e-4, atol=1e-4
    )
    # stays finite where p_y rounds to 1 in float32
    assert np.isfinite(shadows.logit_confidence(np.array([[60.0, 0.0]]), np.array([0]))).all()


def test_input_validation():
    with pytest.raises(ValueError, match="binary"):
        membership.attack_metrics(np.zeros(3), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="3 membership labels for 2 scores"):
        membership.roc_curve(np.zeros(2), np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="members and non-members"):
        membership.tpr_at_fpr(np.zeros(2), np.array([1, 1]), 0.01)
    with pytest.raises(ValueError, match="fpr must be in"):
        membership.tpr_at_fpr(np.zeros(2), np.array([0, 1]), 1.5)
    with pytest.raises(ValueError, match="shadow_phi must be"):
        membership.lira_scores(np.zeros(3), np.zeros((4, 2)), np.zeros((4, 2), bool))
    with pytest.raises(ValueError, match="shadow_in must have"):
        membership.lira_scores(np.zeros(3), np.zeros((4, 3)), np.zeros((4, 2), bool))
    with pytest.raises(ValueError, match="binary"):
        membership.lira_scores(np.zeros(2), np.zeros((2, 2)), np.full((2, 2), 2))
    with pytest.raises(ValueError, match="no example has an OUT shadow"):
        membership.lira_scores(np.zeros(2), np.zeros((2, 2)), np.ones((2, 2), bool))
    with pytest.raises(ValueError, match="NaN"):
        membership.attack_metrics(np.array([0.0, np.nan]), np.array([0, 1]))
    with pytest.raises(ValueError, match="example_client must be"):
        membership.client_scores(np.zeros(3), np.zeros(2, int), 1)
    data = _teacher_data(3, 2, seed=0)
    with pytest.raises(ValueError, match="in_mask must be \\[num_models, clients=3\\]"):
        shadows.train_models(
            _algorithm(), _init, data.cohort(range(3)), np.ones((2, 4), bool), 1, jax.random.key(0)
        )
    with pytest.raises(ValueError, match="in_mask must be bool"):
        shadows.train_models(
            _algorithm(), _init, data.cohort(range(3)), np.ones((2, 3)), 1, jax.random.key(0)
        )
    with pytest.raises(ValueError, match="participation"):
        shadows.train_models(
            _algorithm(),
            _init,
            data.cohort(range(3)),
            np.ones((2, 3), bool),
            1,
            jax.random.key(0),
            participation=0,
        )
    with pytest.raises(ValueError, match="phi and loss must be"):
        membership.leave_one_out(np.zeros((2, 5)), np.zeros((2, 5)), np.ones((2, 3), bool), data.offsets)

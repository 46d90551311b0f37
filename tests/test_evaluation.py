import jax.numpy as jnp
import numpy as np
import pytest

from fljax import evaluation, losses
from fljax.data import FederatedData
from tests import helpers


def _reference(params, x, y):
    logits = helpers.model().apply(params, jnp.asarray(x))
    return float(jnp.mean(losses.accuracy(logits, jnp.asarray(y)))), float(
        jnp.mean(losses.softmax_cross_entropy(logits, jnp.asarray(y)))
    )


def test_central_evaluation_matches_direct_computation_with_partial_batch():
    pop = helpers.population([37])
    x, y = pop.pooled()
    params = helpers.params()
    res = evaluation.evaluate(helpers.model(), params, x, y, batch_size=8)
    acc, loss = _reference(params, x, y)
    assert res["num_examples"] == 37
    np.testing.assert_allclose(res["accuracy"], acc, rtol=1e-6)
    np.testing.assert_allclose(res["loss"], loss, rtol=1e-5)


def test_federated_evaluation_per_client_and_percentiles():
    pop = helpers.population([5, 12, 3])
    params = helpers.params()
    res = evaluation.federated_evaluate(helpers.model(), params, pop)
    for c in range(3):
        acc, _ = _reference(params, *pop.client(c))
        np.testing.assert_allclose(res["per_client_accuracy"][c], acc, rtol=1e-6)
    assert res["accuracy_p10"] <= res["accuracy_p50"] <= res["accuracy_p90"]
    np.testing.assert_allclose(res["mean_accuracy"], np.mean(res["per_client_accuracy"]), rtol=1e-6)
    x, y = pop.pooled()
    np.testing.assert_allclose(res["weighted_accuracy"], _reference(params, x, y)[0], rtol=1e-6)


# ---- classification metrics on the host: AUC, average precision, balanced accuracy, ECE ----------


def _brute_force_auc(scores, labels):
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


def _trapezoid_auc(scores, labels):
    # ROC points at every distinct threshold (ties enter together), integrated by trapezoids.
    thresholds = np.unique(scores)[::-1]
    tpr = [0.0] + [np.mean(scores[labels == 1] >= t) for t in thresholds]
    fpr = [0.0] + [np.mean(scores[labels == 0] >= t) for t in thresholds]
    return float(sum((fpr[i + 1] - fpr[i]) * (tpr[i + 1] + tpr[i]) / 2 for i in range(len(thresholds))))


def _brute_force_average_precision(scores, labels):
    # Mean over positives of the precision among examples scoring at least as high.
    pos = scores[labels == 1]
    return float(np.mean([np.sum(labels[scores >= s]) / np.sum(scores >= s) for s in pos]))


def test_auc_of_perfect_reversed_and_constant_rankings():
    labels = np.array([0, 0, 0, 1, 1, 0, 1])
    scores = labels + np.linspace(0, 0.5, 7)
    assert evaluation.roc_auc(scores, labels) == 1.0
    assert evaluation.roc_auc(-scores, labels) == 0.0
    assert evaluation.roc_auc(np.full(7, 0.3), labels) == 0.5
    assert evaluation.average_precision(scores, labels) == 1.0
    assert evaluation.average_precision(np.full(7, 0.3), labels) == pytest.approx(3 / 7)


@pytest.mark.parametrize("seed", range(5))
def test_auc_and_average_precision_equal_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 200))
    labels = (rng.random(n) < rng.uniform(0.05, 0.6)).astype(np.int32)
    labels[:2] = [0, 1]
    scores = rng.integers(0, 8, n).astype(np.float64) + 0.5 * labels * rng.random(n)  # many ties
    auc = evaluation.roc_auc(scores, labels)
    assert auc == pytest.approx(_brute_force_auc(scores, labels), abs=1e-12)
    assert auc == pytest.approx(_trapezoid_auc(scores, labels), abs=1e-12)
    ap = evaluation.average_precision(scores, labels)
    assert ap == pytest.approx(_brute_force_average_precision(scores, labels), abs=1e-12)
    # rankings only: any increasing transform leaves both unchanged
    assert evaluation.roc_auc(np.exp(scores / 3), labels) == pytest.approx(auc, abs=1e-15)
    assert evaluation.average_precision(np.exp(scores / 3), labels) == pytest.approx(ap, abs=1e-15)


def test_auc_matches_scipy_mann_whitney():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.normal(size=300) + labels, 1)
    u = stats.mannwhitneyu(scores[labels == 1], scores[labels == 0]).statistic
    expected = u / (np.sum(labels == 1) * np.sum(labels == 0))
    assert evaluation.roc_auc(scores, labels) == pytest.approx(expected, abs=1e-12)


def test_undefined_metrics_are_nan():
    assert np.isnan(evaluation.roc_auc(np.array([0.1, 0.9]), np.array([1, 1])))
    assert np.isnan(evaluation.roc_auc(np.array([0.1, 0.9]), np.array([0, 0])))
    assert np.isnan(evaluation.average_precision(np.array([0.1, 0.9]), np.array([0, 0])))
    assert evaluation.average_precision(np.array([0.1, 0.9]), np.array([1, 1])) == 1.0
    recall = evaluation.per_class_recall(np.array([0, 1]), np.array([0, 0]), 3)
    assert recall[0] == 0.5 and np.isnan(recall[1:]).all()


def test_metric_input_errors():
    with pytest.raises(ValueError, match="labels must lie"):
        evaluation.roc_auc(np.array([0.1, 0.9]), np.array([0, 2]))
    with pytest.raises(ValueError, match="NaN"):
        evaluation.roc_auc(np.array([np.nan, 0.9]), np.array([0, 1]))
    with pytest.raises(ValueError, match="scores must be"):
        evaluation.roc_auc(np.zeros(3), np.array([0, 1]))
    with pytest.raises(ValueError, match="unknown metric"):
        evaluation.classification_metrics(np.zeros((2, 2)), np.array([0, 1]), metrics=("f1",))
    with pytest.raises(TypeError, match="sequence of names"):
        evaluation.evaluate(
            helpers.model(), helpers.params(), np.zeros((2, 6), np.float32), np.zeros(2), metrics="auc"
        )
    with pytest.raises(ValueError, match="num_bins"):
        evaluation.expected_calibration_error(np.full(2, 0.5), np.array([0, 1]), num_bins=0)


def test_multiclass_auc_is_macro_one_vs_rest_over_classes_present():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 120)  # class 3 absent
    logits = rng.normal(size=(120, 4)) + np.eye(4)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    per_class = [evaluation.roc_auc(probs[:, k], (labels == k).astype(int)) for k in range(3)]
    assert evaluation.roc_auc(probs, labels) == pytest.approx(np.mean(per_class), abs=1e-12)
    # log-probabilities rank like probabilities
    assert evaluation.roc_auc(np.log(probs), labels) == pytest.approx(np.mean(per_class), abs=1e-12)
    m = evaluation.classification_metrics(logits, labels, metrics=("auc",))
    assert m["auc"] == pytest.approx(np.mean(per_class), abs=1e-9)


def _majority_predictor(num_classes):
    # apply(params, x): the same logits for every example, favouring class 0.
    return lambda params, x: jnp.broadcast_to(params, (x.shape[0], num_classes))


def test_majority_class_predictor_on_5_percent_positives():
    y = np.zeros(1000, np.int32)
    y[::20] = 1  # 5% positives
    x = np.zeros((1000, 3), np.float32)
    res = evaluation.evaluate(
        _majority_predictor(2),
        jnp.array([1.0, -1.0]),
        x,
        y,
        batch_size=128,
        metrics=evaluation.CLASSIFICATION_METRICS,
    )
    assert res["accuracy"] == pytest.approx(0.95)
    assert res["balanced_accuracy"] == 0.5
    assert res["per_class_recall"] == [1.0, 0.0]
    assert res["auc"] == 0.5
    assert res["average_precision"] == pytest.approx(0.05)


def test_majority_predictor_balanced_accuracy_is_one_over_num_classes():
    rng = np.random.default_rng(0)
    y = rng.choice(4, size=500, p=[0.7, 0.1, 0.1, 0.1]).astype(np.int32)
    logits = np.tile(np.array([2.0, 0.0, 0.0, 0.0]), (500, 1))
    m = evaluation.classification_metrics(logits, y)
    assert m["balanced_accuracy"] == 0.25
    assert m["auc"] == 0.5
    assert np.mean(np.argmax(logits, 1) == y) == pytest.approx(np.mean(y == 0))


def test_one_logit_and_two_logit_outputs_agree():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 200)
    logit = rng.normal(size=200) + labels
    one = evaluation.classification_metrics(logit[:, None], labels)
    two = evaluation.classification_metrics(np.stack([np.zeros(200), logit], 1), labels)
    assert one.keys() == two.keys()
    for k in one:
        np.testing.assert_allclose(one[k], two[k], rtol=1e-12, atol=1e-12)


def test_ece_near_zero_when_calibrated_and_larger_when_overconfident():
    rng = np.random.default_rng(0)
    p = rng.random(200_000)
    y = (rng.random(200_000) < p).astype(np.int32)
    calibrated = evaluation.expected_calibration_error(p, y)
    logit = np.log(p) - np.log1p(-p)
    overconfident = evaluation.expected_calibration_error(1 / (1 + np.exp(-3 * logit)), y)
    assert calibrated < 0.01
    assert overconfident > 0.1
    # binary [examples] form equals the two-column form
    two = evaluation.expected_calibration_error(np.stack([1 - p, p], 1), y)
    assert two == pytest.approx(calibrated, abs=1e-12)


def test_ece_of_always_right_confident_predictor_is_zero():
    y = np.array([0, 1, 2, 1])
    assert evaluation.expected_calibration_error(np.eye(3)[y], y) == 0.0


def test_central_metrics_do_not_depend_on_batch_size():
    pop = helpers.population([37])
    x, y = pop.pooled()
    params = helpers.params()
    a = evaluation.evaluate(
        helpers.model(), params, x, y, batch_size=8, metrics=evaluation.CLASSIFICATION_METRICS
    )
    b = evaluation.evaluate(
        helpers.model(), params, x, y, batch_size=64, metrics=evaluation.CLASSIFICATION_METRICS
    )
    logits = np.asarray(helpers.model().apply(params, jnp.asarray(x)))
    direct = evaluation.classification_metrics(logits, y)
    for k, v in direct.items():
        np.testing.assert_allclose(a[k], v, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b[k], v, rtol=1e-5, atol=1e-6)
    plain = evaluation.evaluate(helpers.model(), params, x, y, batch_size=8)
    assert set(plain) == {"loss", "accuracy", "num_examples"}
    assert plain["accuracy"] == a["accuracy"] and plain["loss"] == a["loss"]


def test_federated_metrics_per_client_pooled_and_summaries():
    pop = helpers.population([40, 25, 0, 30])
    params = helpers.params()
    model = helpers.model()
    plain = evaluation.federated_evaluate(model, params, pop)
    res = evaluation.federated_evaluate(model, params, pop, metrics=evaluation.CLASSIFICATION_METRICS)
    # existing keys and values unchanged
    assert set(plain) == {
        "per_client_accuracy",
        "per_client_loss",
        "mean_accuracy",
        "weighted_accuracy",
        "accuracy_p10",
        "accuracy_p50",
        "accuracy_p90",
    }
    for k, v in plain.items():
        np.testing.assert_array_equal(res[k], v)
    assert res["per_client_num_examples"] == [40, 25, 0, 30]
    for c in (0, 1, 3):
        x, y = pop.client(c)
        direct = evaluation.classification_metrics(np.asarray(model.apply(params, jnp.asarray(x))), y)
        for name in ("auc", "average_precision", "balanced_accuracy", "ece"):
            np.testing.assert_allclose(res[f"per_client_{name}"][c], direct[name], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            res["per_client_per_class_recall"][c], direct["per_class_recall"], atol=1e-6
        )
    x, y = pop.pooled()
    central = evaluation.evaluate(model, params, x, y, metrics=evaluation.CLASSIFICATION_METRICS)
    for name in evaluation.CLASSIFICATION_METRICS:
        np.testing.assert_allclose(res[f"{name}_pooled"], central[name], rtol=1e-5, atol=1e-6)
    for name in ("auc", "average_precision", "balanced_accuracy", "ece"):
        per = np.array(res[f"per_client_{name}"])
        assert np.isnan(per[2])  # the client without data
        assert res[f"{name}_num_clients"] == 3
        np.testing.assert_allclose(res[f"{name}_mean_over_clients"], np.nanmean(per), rtol=1e-12)
        assert (
            res[f"{name}_p10_over_clients"]
            <= res[f"{name}_p50_over_clients"]
            <= res[f"{name}_p90_over_clients"]
        )
    recall_table = np.array(res["per_client_per_class_recall"])
    np.testing.assert_allclose(res["per_class_recall_mean_over_clients"], np.nanmean(recall_table, axis=0))


def test_federated_auc_of_a_one_class_client_is_nan_and_skipped():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 2)).astype(np.float32)
    y = np.array([0] * 10 + [0, 1] * 10, np.int32)  # client 0: negatives only
    pop = FederatedData.from_partition(x, y, [np.arange(10), np.arange(10, 30)], num_classes=2)
    model = lambda params, x: x @ params
    res = evaluation.federated_evaluate(model, jnp.eye(2), pop, metrics=("auc", "balanced_accuracy"))
    assert np.isnan(res["per_client_auc"][0]) and not np.isnan(res["per_client_auc"][1])
    assert res["auc_num_clients"] == 1
    assert res["auc_mean_over_clients"] == res["per_client_auc"][1]
    assert res["balanced_accuracy_num_clients"] == 2
    rows = evaluation.per_client_table(res, ["A", "B"])
    assert [r["client"] for r in rows] == ["A", "B"]
    assert rows[1]["auc"] == res["per_client_auc"][1] and rows[0]["num_examples"] == 10


def test_client_parts_computed_one_client_at_a_time_combine_to_the_federated_result():
    # What a deployment does: each client evaluates on its own data, the server combines.
    pop = helpers.population([40, 25, 0, 30])
    params, model = helpers.params(), helpers.model()
    metrics = evaluation.CLASSIFICATION_METRICS
    whole = evaluation.federated_evaluate(model, params, pop, metrics=metrics)
    parts = [
        evaluation.client_parts(
            model,
            params,
            FederatedData.from_clients([pop.client(c)], num_classes=pop.num_classes, allow_empty=True),
            metrics=metrics,
        )
        for c in range(pop.num_clients)
    ]
    names = ["loss_sum", "correct", "count"] + [f"per_client_{m}" for m in metrics]
    combined = evaluation.combine_client_parts(
        {k: np.concatenate([p[k] for p in parts]) for k in names}, metrics=metrics
    )
    assert set(combined) == {k for k in whole if not k.endswith("_pooled")}
    for k, v in combined.items():
        if k == "per_client_loss":  # one client's loss sum vs the vmapped cohort's: float32 ulps
            np.testing.assert_allclose(v, whole[k], rtol=1e-6)
        else:  # counts are exact; per-client metrics come from the same outputs
            np.testing.assert_allclose(v, whole[k], rtol=1e-6, atol=1e-7)
    assert combined["weighted_accuracy"] == whole["weighted_accuracy"]
    assert combined["per_client_num_examples"] == [40, 25, 0, 30]

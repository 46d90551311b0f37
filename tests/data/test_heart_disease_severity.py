"""The heart-disease loader's 5-level severity target: classes, per-site counts, stratified split."""

import jax
import numpy as np
import pytest

from fljax.data.datasets import heart_disease
from fljax.experiment import config, data


def _counts(population, c: int, num_classes: int) -> np.ndarray:
    return np.bincount(population.client(c)[1], minlength=num_classes)


@pytest.mark.parametrize("seed", [0, 3])
def test_severity_has_5_classes_with_each_sites_counts(seed):
    d = heart_disease.load(target="severity", seed=seed)
    assert d.train.num_classes == d.test.num_classes == 5
    assert d.train.client_names == tuple(heart_disease.SITE_NAMES[s] for s in heart_disease.SITES)
    frame = heart_disease.read_csv()
    for c, site in enumerate(heart_disease.SITES):
        in_file = np.bincount(frame.loc[frame["site"] == site, "target"].to_numpy(np.int64), minlength=5)
        np.testing.assert_array_equal(in_file, heart_disease.SEVERITY_COUNTS[site])
        test = _counts(d.test, c, 5)
        np.testing.assert_array_equal(_counts(d.train, c, 5) + test, in_file)  # every patient once
        # stratified by level: each level's held-out share is the quarter, rounded
        np.testing.assert_array_equal(test, np.round(0.25 * in_file).astype(int))
    # the documented oddities: Hungary codes 0/1 only, Switzerland has 8 healthy of 123
    assert heart_disease.SEVERITY_COUNTS["hungarian"][2:] == (0, 0, 0)
    assert heart_disease.SEVERITY_COUNTS["switzerland"][0] == 8


def test_severity_and_disease_agree_on_who_is_ill():
    disease, severity = heart_disease.load(), heart_disease.load(target="severity")
    assert disease.train.num_classes == 2
    for c, site in enumerate(heart_disease.SITES):
        ill = sum(heart_disease.SEVERITY_COUNTS[site][1:])
        got = [_counts(p, c, 2)[1] for p in (disease.train, disease.test)]
        assert sum(got) == ill
        got = [_counts(p, c, 5)[1:].sum() for p in (severity.train, severity.test)]
        assert sum(got) == ill


def test_bad_target_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="target must be one of"):
        heart_disease.load(target="num")
    frame = heart_disease.read_csv()
    frame.loc[0, "target"] = 7
    frame.to_csv(tmp_path / "odd.csv", index=False)
    with pytest.raises(ValueError, match="num in 0-4"):
        heart_disease.load(path=tmp_path / "odd.csv", target="severity")
    heart_disease.load(path=tmp_path / "odd.csv")  # the binary target accepts any num > 0


def test_config_section_selects_the_target():
    prepared = data.load(config.HeartDisease(target="severity"), jax.random.key(0))
    assert prepared.num_classes == 5 and prepared.train.num_classes == 5
    assert config.HeartDisease().target == "disease"
    cfg = config.Config(data=config.HeartDisease())
    assert config.override(cfg, "data.target=severity").data.target == "severity"
    with pytest.raises(config.ConfigError, match="data.target"):
        config.override(cfg, "data.target=stage")

"""The predict run report (bertray.report) without Ray: PSI, the tally of written
predictions per problem type, the training distribution, alerts and the previous report."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest

from bertray import problem as P
from bertray import report as R


def test_psi_is_zero_for_equal_distributions_and_follows_its_formula():
    even = {"a": 0.5, "b": 0.5}
    assert R.psi(even, even) == 0.0
    assert R.psi({"a": 0.7, "b": 0.3}, even) == pytest.approx(0.2 * math.log(0.7 / 0.5) - 0.2 * math.log(0.3 / 0.5))
    # an empty bin is floored, not infinite; all rows in one class is a large shift
    assert 2.0 < R.psi({"a": 1.0}, even) < 10.0


def _single_batch(labels, scores):
    return pa.RecordBatch.from_pydict({"prediction": pa.array(labels), "score": pa.array(scores, pa.float32())})


def test_single_label_tally_counts_labels_scores_and_low_confidence():
    tally = R.OutputTally(P.SINGLE, 0.6)
    tally.add(_single_batch(["pos", "neg", "pos"], [0.9, 0.55, 0.7]))
    tally.add(_single_batch(["pos"], [0.99]))
    rep = R.build(tally, R.Limits(0.6), {"shares": {"pos": 0.5, "neg": 0.5}}, None, [])
    assert rep["rows"] == 4 and rep["distribution"] == {"pos": 0.75, "neg": 0.25}
    assert rep["mean_score"] == pytest.approx((0.9 + 0.55 + 0.7 + 0.99) / 4, rel=1e-6)
    assert rep["low_confidence"] == {"below": 0.6, "rows": 1, "share": 0.25}
    assert sum(rep["score_histogram"]["counts"]) == 4 and rep["score_histogram"]["counts"][-1] == 1  # 0.99
    assert rep["psi"]["training"] == pytest.approx(R.psi({"pos": 0.75, "neg": 0.25}, {"pos": 0.5, "neg": 0.5}))
    assert rep["psi"]["previous"] is None and rep["alerts"] == []


def test_multi_label_tally_counts_each_label_and_rows_with_none():
    batch = pa.RecordBatch.from_pydict({
        "prediction": pa.array([["joy", "love"], [], ["joy"]], pa.list_(pa.string())),
        "score": pa.array([[0.8, 0.6], [], [0.4]], pa.list_(pa.float32())),
    })
    tally = R.OutputTally(P.MULTI, 0.5)
    tally.add(batch)
    rep = R.build(tally, R.Limits(0.5), None, None, [])
    assert rep["distribution"] == {"joy": 0.5, "love": 0.25, R.NO_LABEL: 0.25}
    assert rep["label_row_shares"] == {"joy": pytest.approx(2 / 3), "love": pytest.approx(1 / 3)}
    # the empty row's best score is 0; the row whose best is 0.4 is under 0.5 too
    assert rep["low_confidence"]["rows"] == 2
    assert rep["mean_score"] == pytest.approx((0.8 + 0 + 0.4) / 3, rel=1e-6)


def test_regression_uses_the_training_deciles_and_reports_quantiles():
    labels = {float(v): 1 for v in range(100)}  # 0..99, one row each
    training = R.training_distribution(P.make(P.REGRESSION), P.LabelStats(rows=100, counts=labels))
    assert len(training["edges"]) == 9 and all(s == pytest.approx(0.1) for s in training["shares"].values())
    tally = R.OutputTally(P.REGRESSION, 0.5, training["edges"])
    tally.add(pa.RecordBatch.from_pydict({"prediction": pa.array(np.linspace(0, 99, 1000))}))
    rep = R.build(tally, R.Limits(), training, None, [])
    assert rep["psi"]["training"] < 0.01 and "low_confidence" not in rep
    assert rep["quantiles"]["p50"] == pytest.approx(49.5)
    shifted = R.OutputTally(P.REGRESSION, 0.5, training["edges"])
    shifted.add(pa.RecordBatch.from_pydict({"prediction": pa.array(np.full(50, 95.0))}))
    assert R.build(shifted, R.Limits(), training, None, [])["psi"]["training"] > 1.0


def test_training_distribution_of_classes_uses_the_label_map():
    problem = P.make(P.SINGLE, {"ham": 0, "spam": 1})
    dist = R.training_distribution(problem, P.LabelStats(rows=10, counts={"ham": 8, "spam": 2}))
    assert dist == {"problem_type": P.SINGLE, "rows": 10, "shares": {"ham": 0.8, "spam": 0.2}}
    multi = P.make(P.MULTI, {"joy": 0, "anger": 1})
    dist = R.training_distribution(multi, P.LabelStats(rows=4, empty=1, counts={"joy": 3, "anger": 1}))
    assert dist["shares"] == {"joy": 0.6, "anger": 0.2, R.NO_LABEL: 0.2}
    assert dist["label_row_shares"] == {"joy": 0.75, "anger": 0.25}


@pytest.mark.parametrize(("limits", "expected"), [
    (R.Limits(0.6, max_psi=0.5), ["PSI of the predictions against the training distribution is"]),
    (R.Limits(0.6, max_low_confidence=0.2), ["25.0% of rows (1 of 4) score below 0.6"]),
    (R.Limits(0.6, max_psi=5.0, max_low_confidence=0.5), []),
])
def test_alerts_name_the_figure_and_the_setting(limits, expected):
    tally = R.OutputTally(P.SINGLE, 0.6)
    tally.add(_single_batch(["pos", "pos", "pos", "pos"], [0.9, 0.55, 0.7, 0.99]))
    rep = R.build(tally, limits, {"shares": {"pos": 0.5, "neg": 0.5}}, None, [])
    assert len(rep["alerts"]) == len(expected)
    for alert, start in zip(rep["alerts"], expected, strict=True):
        assert alert.startswith(start) and "report.max_" in alert


def test_the_previous_report_is_compared_when_its_bins_match():
    tally = R.OutputTally(P.SINGLE, 0.5)
    tally.add(_single_batch(["pos", "neg"], [0.9, 0.9]))
    same = R.build(tally, R.Limits(), None, {"distribution": {"pos": 0.5, "neg": 0.5}}, [])
    assert same["psi"]["previous"] == 0.0
    notes = []
    other = R.build(tally, R.Limits(), None, {"distribution": {"ham": 1.0}}, notes)
    assert other["psi"]["previous"] is None and "bins differ" in notes[0]


def test_previous_path_fills_yesterday_and_points_into_a_directory():
    assert R.previous_path("/preds/{yesterday}", "2024-03-01") == "/preds/2024-02-29/_report.json"
    assert R.previous_path("s3://b/preds/{date}/", "2024-03-01") == "s3://b/preds/2024-03-01/_report.json"
    assert R.previous_path("/x/report-{yesterday}.json", "2024-01-01") == "/x/report-2023-12-31.json"


def test_an_unreadable_previous_report_is_an_error_naming_it():
    with pytest.raises(R.ReportError, match="/p/_report.json is not valid JSON"):
        R.parse_previous("{not json", "/p/_report.json")
    with pytest.raises(R.ReportError, match="not a bertray _report.json"):
        R.parse_previous(json.dumps({"rows": 3}), "/p/_report.json")


@pytest.mark.parametrize(("override", "message"), [
    ("report.max_psi=-0.1", "report.max_psi=-0.1: should be greater than 0"),
    ("report.low_confidence=1.5", "report.low_confidence=1.5: should be less than 1"),
    ("report.max_low_confidence=0", "report.max_low_confidence=0: should be greater than 0"),
    ("report.max_pis=0.2", "unknown key report.max_pis (did you mean report.max_psi?)"),
])
def test_bad_report_settings_are_config_errors(override, message):
    from pathlib import Path

    from bertray.config import ConfigError, PredictConfig
    from bertray.config_loader import load_config

    config = Path(__file__).resolve().parents[1] / "configs" / "predict.yaml"
    with pytest.raises(ConfigError) as e:
        load_config(config, [override], PredictConfig)
    assert message in str(e.value)


@pytest.mark.parametrize("problem_type", [P.SINGLE, P.MULTI, P.REGRESSION])
def test_an_empty_night_reports_zero_rows_and_plots(problem_type, tmp_path):
    tally = R.OutputTally(problem_type, 0.5, [1.0, 2.0] if problem_type == P.REGRESSION else [])
    rep = R.build(tally, R.Limits(0.5, max_psi=0.1, max_low_confidence=0.1), {"shares": {"a": 1.0}}, None, [])
    assert rep["rows"] == 0 and rep["psi"] == {"training": None, "previous": None} and rep["alerts"] == []
    R.plot(rep, {"shares": {"a": 1.0}}, None, str(tmp_path / "r.png"))
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    json.dumps(rep, allow_nan=False)  # strict JSON: no NaN for an empty night

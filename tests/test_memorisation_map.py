"""The memorisation map: its cells, the nearest-cell lookup, the demos' settings, and the shipped file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest

from ufm.core.canary import CanaryChoice
from ufm.measure.demos import ATYPICAL, TYPICAL, calibrated_rows, clinician_sentence, plan_demo, teaching_sentence
from ufm.core.experiment import ExperimentConfig
from ufm.core.features import glyph, text_feature
from ufm.measure.memorisation_map import (CLINICAL, MAP_FILE, TEACHING, MapCell, Setting, demo_setting, find_cell,
                                  load_cells, nearest_cell)
from ufm.measure.stats import wilson_interval

ROOT = Path(__file__).resolve().parents[1]


def cell(setting: Setting, placement: str, feature: str, detected: int, models: int = 10, count: int = 1,
         index: int | None = None) -> MapCell:
    low, high = wilson_interval(detected, models)
    return MapCell(setting.arch, setting.dataset, setting.train_size, setting.budget, setting.device, placement,
                   feature, count, models, detected, low, high, 1.0, 39.0, canary_index=index, mean_M=0.01, load=1.0)


def teaching_cells(s: Setting, top: int, bottom: int, models: int = 10) -> list[MapCell]:
    return [cell(s, "top", "glyph", top, models, index=7), cell(s, "bottom", "glyph", bottom, models, index=3),
            cell(s, "random", "glyph", 1, 3)]


def clinical_cells(s: Setting, ten: int) -> list[MapCell]:
    return [cell(s, "class", "name", 1, 10), cell(s, "class", "name", 4, 10, count=3),
            cell(s, "class", "name", ten, 10, count=10), cell(s, "random", "name", 9, 10, count=10)]


# ----------------------------------------------------------------------------------------- cells

def test_cell_round_trip_and_sentence():
    c = cell(TEACHING, "top", "glyph", 3, 10, index=245)
    assert MapCell.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert c.sentence() == "one canary was detected by the calibrated verdict in 3 of 10 models (95% interval 11%-60%)"
    assert cell(TEACHING, "random", "name", 8, 10, count=10).sentence().startswith("the feature on 10 images was")


def test_find_cell_is_exact_and_says_what_to_run():
    cells = teaching_cells(TEACHING, 10, 0)
    assert find_cell(cells, TEACHING, "top", "glyph").canary_index == 7
    with pytest.raises(LookupError, match="memorisation_map.py"):
        find_cell(cells, TEACHING, "top", "name")


def test_nearest_cell_exact_match_has_no_differences():
    cells = teaching_cells(TEACHING, 10, 0)
    cfg = TEACHING.config(glyph("A"), canary=CanaryChoice("random", (), count=1))
    near = nearest_cell(cfg, "cpu", cells)
    assert near.cell.placement == "random" and near.differences == ()
    assert near.text().startswith("In this setting one canary was detected by the calibrated verdict in 1 of 3 models")


def test_nearest_cell_names_every_difference():
    big = Setting("mlp", "mnist", 2000, "quick")
    cells = teaching_cells(TEACHING, 10, 0) + [cell(big, "random", "glyph", 2, 3)]
    cfg = ExperimentConfig(feature=text_feature("DOE", offset=(2, 2)), dataset="mnist", arch="cnn1", train_size=3000,
                           epochs=200, patience=10, canary=CanaryChoice("index", (5,)))
    near = nearest_cell(cfg, "cuda", cells)
    assert near.cell.train_size == 2000  # log-nearest to 3,000
    text = near.text()
    for phrase in ("architecture mlp", "quick budget", "measured on cpu", "the letter A", "2,000 training images (you chose 3,000)"):
        assert phrase in text


def test_nearest_cell_none_for_a_control_or_unmeasured_data():
    cells = teaching_cells(TEACHING, 10, 0)
    assert nearest_cell(TEACHING.config(glyph("A")), "cpu", cells) is None  # no canary: a clean control
    other = TEACHING.config(glyph("A"), canary=CanaryChoice("random", (), count=1), dataset="cifar10")
    assert nearest_cell(other, "cpu", cells) is None


def test_nearest_cell_prefers_the_same_canary_count():
    cells = clinical_cells(CLINICAL, 9)
    cfg = CLINICAL.config(text_feature("JOHN DOE", offset=(2, 2)), canary=CanaryChoice("class", (), count=10, label=1))
    near = nearest_cell(cfg, "cpu", cells).cell
    assert (near.count, near.placement) == (10, "class")
    mixed = cfg.replace(canary=CanaryChoice("random", (), count=10))
    assert nearest_cell(mixed, "cpu", cells).cell.placement == "random"


# ----------------------------------------------------------------------------------------- demo settings

def test_demo_setting_needs_the_criterion():
    assert demo_setting("teaching", "cpu", teaching_cells(TEACHING, 9, 3)).train == TEACHING
    with pytest.raises(LookupError):
        demo_setting("teaching", "cpu", teaching_cells(TEACHING, 8, 0))  # 8 of 10 atypical: below 9
    with pytest.raises(LookupError):
        demo_setting("teaching", "cpu", teaching_cells(TEACHING, 10, 4))  # typical detected too often
    with pytest.raises(LookupError):
        demo_setting("teaching", "cpu", teaching_cells(TEACHING, 9, 0, models=9))  # fewer than 10 seeds
    assert demo_setting("clinical", "cpu", clinical_cells(CLINICAL, 8)).train == CLINICAL
    with pytest.raises(LookupError):
        demo_setting("clinical", "cpu", clinical_cells(CLINICAL, 7))  # random-placement 9/10 does not count


def test_demo_setting_on_a_gpu_takes_the_largest_gpu_setting_that_meets_it():
    small, large = Setting("cnn1", "mnist", 500, "long", "cuda"), Setting("cnn1", "mnist", 2000, "long", "cuda")
    weak = Setting("cnn1", "mnist", 10000, "long", "cuda")
    cells = teaching_cells(TEACHING, 10, 0) + teaching_cells(small, 10, 1) + teaching_cells(large, 9, 2) \
        + teaching_cells(weak, 5, 0)
    choice = demo_setting("teaching", "cuda", cells)
    assert choice.train == large and choice.measured == large
    only_cpu = demo_setting("teaching", "cuda", teaching_cells(TEACHING, 10, 0) + teaching_cells(weak, 5, 0))
    assert only_cpu.train.device == "cuda" and only_cpu.measured == TEACHING and "run on the GPU" in only_cpu.why
    assert "meets the demo's criterion" in only_cpu.why
    gpu_ladder = Setting("cnn1", "chest-xray", 500, "quick", "cuda")
    no_ladder = demo_setting("clinical", "cuda", clinical_cells(CLINICAL, 10) + [cell(gpu_ladder, "random", "name", 7, count=10)])
    assert no_ladder.measured == CLINICAL and "do not have the demo's cells yet" in no_ladder.why
    assert demo_setting("clinical", "cuda", clinical_cells(CLINICAL, 10) + clinical_cells(gpu_ladder, 10)).train == gpu_ladder


# ----------------------------------------------------------------------------------------- sentences

def _runs(rows):
    return pd.DataFrame(rows, columns=["group", "status", "M", "verdict", "verdict_test"])


def test_calibrated_rows_hold_back_provisional_verdicts():
    plan = plan_demo("teaching")
    runs = _runs([[TYPICAL, "done", 0.001, "not_shown", "fast"], [ATYPICAL, "done", 0.01, "memorised", "reference"]])
    rows = calibrated_rows(runs, plan.rungs)
    assert [r["verdict"] for r in rows] == [None, "memorised"]
    assert teaching_sentence(rows).startswith("Waiting for the reference models")


def test_teaching_sentence_states_the_papers_finding_only_when_measured():
    rows = [{"label": TYPICAL, "verdict": "not_shown"}, {"label": ATYPICAL, "verdict": "memorised"}]
    s = teaching_sentence(rows)
    assert "memorised the letter A from the one atypical digit" in s and "not a guarantee" in s
    flipped = teaching_sentence([{"label": TYPICAL, "verdict": "memorised"}, {"label": ATYPICAL, "verdict": "not_shown"}])
    assert "against what the memorisation map measured" in flipped
    neither = teaching_sentence([{"label": TYPICAL, "verdict": "not_shown"}, {"label": ATYPICAL, "verdict": "not_shown"}])
    assert "Neither model" in neither


def test_clinician_sentence_says_what_was_detected_and_what_a_run_cannot_prove():
    none = clinician_sentence([{"k": 1, "verdict": "not_shown"}, {"k": 10, "verdict": "not_shown"}])
    assert "Not detected on any rung (up to 10 X-rays)" in none and "not a guarantee" in none
    some = clinician_sentence([{"k": 1, "verdict": "not_shown"}, {"k": 3, "verdict": "memorised"},
                               {"k": 10, "verdict": "memorised"}])
    assert "from 3 training X-rays (rungs detected: 3, 10 X-rays)" in some and "cannot prove" in some
    waiting = clinician_sentence([{"k": 1, "verdict": None}, {"k": 10, "verdict": "memorised"}])
    assert "Waiting for the reference models before 1 rung can be called" in waiting


# ----------------------------------------------------------------------------------------- the shipped map

def test_shipped_map_supports_both_demos_with_ten_seeds():
    cells = load_cells()
    teaching = plan_demo("teaching")
    typical, atypical = teaching.cells
    assert min(typical.models, atypical.models) >= 10
    assert atypical.rate >= 0.9 and typical.rate <= 0.3
    assert [r.canary.indices[0] for r in teaching.rungs] == [typical.canary_index, atypical.canary_index]
    clinical = plan_demo("clinical")
    assert [c.count for c in clinical.cells] == [1, 3, 10] and all(c.models >= 10 for c in clinical.cells)
    assert clinical.cells[-1].rate >= 0.8
    assert clinical.base.train_size == CLINICAL.train_size and clinical.feature.name == "text 'JOHN DOE'"
    assert all(c.device in ("cpu", "cuda") for c in cells)


def _script():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import memorisation_map as script
    finally:
        sys.path.pop(0)
    return script


def test_shipped_map_is_what_the_script_makes_of_the_raw_rows():
    script = _script()
    shipped = json.loads(MAP_FILE.read_text())
    rows = script.load_rows([ROOT / "benchmarks" / "results" / name for name in shipped["source"]])
    assert len(rows) == shipped["rows"]
    assert [c.to_dict() for c in script.summarise(rows)] == shipped["cells"]


def test_readme_and_markdown_tables_are_what_the_script_makes_of_the_raw_rows():
    """The table README shows, and its list of settings not measured (on CPU, the GPU rows no
    device has filled yet), are the ``table`` command's output from today's rows."""
    script = _script()
    cells = script.summarise(script.load_rows(sorted((ROOT / "benchmarks" / "results").glob("memorisation-map-*.jsonl"))))
    missing = script.not_measured(cells)
    assert all(s.device == "cuda" for s in missing)  # the CPU grid is complete
    assert {c.setting for c in cells}.isdisjoint(missing)
    made = script.markdown(cells) + script.not_measured_markdown(missing)
    assert made in (ROOT / "benchmarks" / "results" / "memorisation-map.md").read_text()
    assert made in (ROOT / "README.md").read_text()


def test_readme_quotes_the_demo_cells_rates():
    readme = (ROOT / "README.md").read_text()
    for plan in (plan_demo("teaching"), plan_demo("clinical")):
        for c in plan.cells:
            assert f"{c.detected} of {c.models}" in readme, c


def test_readme_quotes_the_demo_wall_times_as_measured():
    """Every timing in benchmarks/results/demo-times.jsonl is in README, quiet and beside a busy
    process, and every timed demo ended on the calibrated verdicts the map predicts."""
    readme = (ROOT / "README.md").read_text()
    rows = [json.loads(x) for x in (ROOT / "benchmarks" / "results" / "demo-times.jsonl").read_text().splitlines() if x]
    assert {(r["demo"], r["busy"]) for r in rows} == {(d, b) for d in ("teaching", "clinical") for b in (False, True)}
    for r in rows:
        assert f"{r['calibrated_s']:.0f} s" in readme, r
        assert r["memorised"] == ([False, True] if r["demo"] == "teaching" else [False, True, True]), r
    quiet = [r for r in rows if not r["busy"] and r["load_start"] < 1]
    assert quiet and all(r["calibrated_s"] <= 180 and r["first_result_s"] <= 60 for r in quiet)
    for r in quiet:
        assert f"{r['first_result_s']:.1f} s" in readme, r



def test_heat_map_marks_planned_settings_without_rows_as_not_measured():
    import numpy as np

    from ufm.reports.plots import memorisation_map_figure
    gpu = Setting("cnn1", "mnist", 10000, "long", "cuda")
    fig = memorisation_map_figure(teaching_cells(TEACHING, 10, 0), [gpu, TEACHING])  # TEACHING has rows: not marked
    heat = fig.data[0]
    labels = list(heat.y)
    assert labels.count("cuda cnn1 mnist 10,000 long: not measured") == 1 and "cpu mlp mnist 500 quick" in labels
    row = labels.index("cuda cnn1 mnist 10,000 long: not measured")
    assert np.isnan(np.asarray(heat.z, dtype=float)[row]).all()
    assert "10/10" in heat.text[labels.index("cpu mlp mnist 500 quick")]

"""Scaling studies: strategies that land on their FLOPs targets, star designs, the analysis of
populations (EDFs, good ranges, per-budget verdicts), held-out extrapolation in the report and
`scaling predict`."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from scaling import ScalingError, population, predict, report, scale, sweep
from scaling.results import SUMMARY


# ---- Strategies ----
@pytest.mark.parametrize("name", sorted(scale.STRATEGIES))
def test_a_strategy_shares_its_flop_factor_among_the_axes(name):
    """depth * width^2 * resolution^2 is the factor, for every strategy; compound scaling's
    factor 1.92^phi gives EfficientNet's alpha^phi, beta^phi, gamma^phi."""
    c = scale.STRATEGIES[name].coefficients(5.0)
    assert c.depth * c.width**2 * c.resolution**2 == pytest.approx(5.0)
    phi = 1.7
    factor = (scale.ALPHA * scale.BETA**2 * scale.GAMMA**2) ** phi
    expected = scale.compound_coefficients(phi)
    assert scale.STRATEGIES["compound"].coefficients(factor) == pytest.approx(expected)
    assert scale.STRATEGIES["dWr"].coefficients(10.0).width == pytest.approx(10 ** (0.8 / 2))


@pytest.mark.parametrize(
    "model, image_size, strategy",
    [("wrn16_1", 32, "d"), ("wrn16_1", 32, "compound"), ("wrn16_1", 32, "dWr"),
     ("vit_s4", 32, "dWr"), ("coatnet", 32, "compound")],
)  # fmt: skip
def test_strategies_land_on_the_closest_step_to_their_flops_target(model, image_size, strategy):
    """No factor near the solution builds a model closer to the target: the solver found the
    nearest step of the rounding rules; its settings are the strategy's multipliers."""
    from scaling import flops, models

    settings = dict(num_classes=10)
    if model == "coatnet":  # a small one: its tests' size
        settings |= dict(depths=(1, 1, 1, 1, 1), dims=(16, 16, 32, 32, 64), head_size=16,
                         small_images=True)  # fmt: skip
    resolution_dependent = models.family_of(model).resolution_dependent

    def macs(factor):
        s, size = scale.apply(model, scale.coefficients(strategy, factor), image_size, settings)
        built = models.abstract(model, image_size=size if resolution_dependent else None, **s)
        return flops.macs_and_activations(built, size)[0]

    target = 4 * macs(1.0)
    solution = scale.solve_for_flops(model, strategy, 2 * target, image_size, **settings)
    assert macs(solution.value) == solution.macs
    assert abs(solution.macs / target - 1) < 0.2
    nearby = [solution.value * f for f in np.geomspace(0.8, 1.25, 7)]
    assert min(abs(macs(v) - target) for v in nearby) >= abs(solution.macs - target)
    assert (solution.settings, solution.image_size) == scale.apply(
        model, scale.coefficients(strategy, solution.value), image_size, settings
    )


def test_strategies_combinator_labels_each_trial_and_keeps_counts_out():
    trials = sweep.strategies("wrn16_1", ["w", "r"], [2, 4], 32)
    assert [(t["tags.budget"], t["tags.strategy"]) for t in trials] == [
        (2, "w"), (2, "r"), (4, "w"), (4, "r")
    ]  # fmt: skip
    assert all(t["model.name"] == "wrn16_1" and "model.num_classes" not in t for t in trials)
    assert [t["image_size"] for t in trials] == [32, 45, 32, 64]  # resolution: 32 * sqrt(budget)
    with pytest.raises(ScalingError, match="unknown scaling axis or strategy 'diagonal'"):
        sweep.strategies("wrn16_1", ["diagonal"], [2], 32)


def test_star_varies_one_dimension_at_a_time_at_each_budget():
    centre = {"model.width": 64, "model.depth": 6}
    trials = sweep.star(centre, {"model.width": [32, 64, 128], "model.depth": [3, 12]},
                        "steps", [100, 200])  # fmt: skip
    assert len(trials) == 2 * (1 + 2 + 2)
    for t in trials:
        varied = {k for k in centre if t[k] != centre[k]}
        assert varied == ({t["tags.dimension"]} if t["tags.dimension"] != "centre" else set())
        assert t["steps"] == t["tags.budget"]


# ---- Populations ----
def test_edf_and_good_range_match_hand_computed_values():
    errors, fraction = population.edf([0.3, 0.1, 0.2, 0.2])
    assert list(errors) == [0.1, 0.2, 0.2, 0.3] and list(fraction) == [0.25, 0.5, 0.75, 1.0]
    # Four trials, all drawn with replacement: the best drawn is value 1 with probability
    # 1 - (3/4)^4 = 0.68, 2 with 0.25, 3 with 0.059 and 4 with 0.004: the central 95% is 1-3.
    assert population.good_range([1, 2, 3, 4], [0.1, 0.2, 0.3, 0.4], fraction=1.0) == (1, 3)
    # A quarter of 40 trials whose error is least at lr = 0.1: the range surrounds it.
    lrs = np.geomspace(0.01, 1, 40)
    low, high = population.good_range(lrs, np.abs(np.log(lrs / 0.1)))
    assert low < 0.1 < high and high / low < 4


def test_verdicts_name_the_winner_and_whether_seeds_separate_it():
    done = pd.DataFrame(
        dict(budget=[2, 2, 2, 2, 4, 4, 4, 4], strategy=["w", "w", "d", "d"] * 2,
             test_error=[0.40, 0.42, 0.45, 0.47, 0.35, 0.45, 0.36, 0.38])
    )  # fmt: skip
    table = population.verdicts(done).set_index("budget")
    assert table.loc[2, "winner"] == "w" and table.loc[2, "clear"] == "yes"
    assert table.loc[2, "margin"] == "0.0500" and table.loc[2, "w"] == "0.4100 ± 0.0141"
    assert table.loc[4, "winner"] == "d" and table.loc[4, "clear"] == "no"  # 0.03 < 0.0707


def test_time_correlates_with_what_sets_it():
    done = pd.DataFrame(dict(flops=[1e6, 4e6, 2e6, 8e6], activations=[1e4, 2e4, 4e4, 8e4]))
    done["images_per_second"] = 1e7 / done.activations
    r = population.time_correlations(done).set_index("measure").pearson_r
    assert r["activations"] == pytest.approx(1.0) and r["flops"] < 0.9


# ---- A study's report and predictions ----
F0 = 5e7


def law(flops, strategy="w"):
    """The fake study's truth: a saturating power law, d a little worse than w."""
    return 0.2 + 0.5 * (flops / F0) ** -0.45 + (0.01 if strategy == "d" else 0.0)


def fake_study(workdir, family="wrn"):
    """A strategies study without training: base, w and d at 2-16x, and a sample over lr."""
    trials = [("base", 1)] + [(s, b) for b in (2, 4, 8, 16) for s in ("w", "d")]
    records = []
    for strategy, budget in trials:
        for seed in (0, 1):
            overrides = {"tags.strategy": strategy, "tags.budget": budget, "seed": seed}
            error = law(budget * F0, strategy) + 0.002 * (seed - 0.5)
            records.append(write_trial(workdir, overrides, f"{family}16_1", budget * F0, error))
    for i, lr in enumerate(np.geomspace(0.01, 1, 12)):
        overrides = {"lr": float(lr), "tags.strategy": "sample"}
        error = law(2 * F0) + 0.05 * abs(math.log10(lr / 0.1)) + 0.001 * i
        records.append(write_trial(workdir, overrides, f"{family}16_1", 2 * F0, error))
    sweep.write_index(workdir, {r["name"]: r for r in records})
    return workdir


def write_trial(workdir, overrides, model, flops, error, **summary):
    name = sweep.trial_name(overrides)
    summary = {k: 1 for k in SUMMARY} | dict(
        model=model, dataset="synthetic", test_accuracy=1 - error, train_accuracy=1 - error,
        params=int(flops / 100), flops=flops, activations=flops / 300, num_classes=10,
        images_per_second=1e10 / flops, seed=overrides.get("seed", 0),
    ) | summary  # fmt: skip
    config = dict(model=dict(name=model), seed=overrides.get("seed", 0), lr=overrides.get("lr"))
    (workdir / name).mkdir(parents=True)
    (workdir / name / "summary.json").write_text(json.dumps(summary))
    (workdir / name / "config.json").write_text(json.dumps(config))
    return dict(name=name, state="done", error=None, overrides=overrides)


def section_table(text, heading) -> list[dict]:
    """The rows of the first Markdown table under `heading` in a report, as dicts."""
    lines = text.split(heading)[1].split("\n## ")[0].splitlines()
    table = [line for line in lines if line.startswith("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    return [dict(zip(header, [c.strip() for c in r.strip("|").split("|")], strict=True))
            for r in table[2:]]  # fmt: skip


def test_report_compares_populations_and_checks_its_extrapolation(tmp_path):
    study = fake_study(tmp_path / "study")
    text = report.write([study], tmp_path / "out", extrapolate=1).read_text()
    assert (tmp_path / "out" / "edf.png").exists()
    verdicts = section_table(text, "## Which strategy wins at each budget")
    assert [(v["budget"], v["winner"]) for v in verdicts] == [
        ("1", "base"), ("2", "w"), ("4", "w"), ("8", "w"), ("16", "w")
    ]  # fmt: skip
    assert all(v["clear"] == "yes" for v in verdicts[1:])  # 0.01 apart, seeds 0.0014
    (lr,) = [r for r in section_table(text, "## Good ranges") if r["setting"] == "lr"]
    low, high = map(float, lr["good"].split(" - "))
    assert low <= 0.1 <= high
    (check,) = [r for r in section_table(text, "## Extrapolation") if r["x"] == "flops"]
    assert check["group"] == "wrn"
    assert check["held_out"] == "8e+08"  # 16x only: the sample's own lr keeps it out of the law
    assert check["best"] in ("M1", "M2", "M3", "M4")
    assert float(check["predicted"]) == pytest.approx(float(check["measured"]), rel=0.05)


def test_predict_a_size_and_a_configuration(tmp_path):
    from scaling import flops, models

    study = fake_study(tmp_path / "study")
    fake_study(tmp_path / "other", family="resnet")  # another family: never in a wrn fit
    at = 40 * F0
    p = predict.predict([study], {"flops": at})
    assert p["beyond"] and p["low"] < law(at) < p["high"]
    assert p["error"] == pytest.approx(law(at), rel=0.05)
    only_w = predict.predict([study], {"flops": at, "strategy": "w"})
    assert only_w["trials"] == 8
    # A configuration is placed by the FLOPs training would record for it.
    config = {"model.name": "wrn16_1", "model.width_multiplier": 6, "image_size": 32}
    measured = flops.xla_flops(models.abstract("wrn16_1", width_multiplier=6, num_classes=10), 32)
    by_config = predict.predict([study, tmp_path / "other"], config)
    assert by_config["value"] == measured
    assert by_config["error"] == predict.predict([study], {"flops": measured})["error"]


def test_report_fits_each_dimensions_optimal_growth_in_a_star_study(tmp_path):
    """Error least at width 20 * (steps / 100)^0.5: the optimum grows as compute^0.5, as the
    widths tried (and so the FLOPs at each budget) are the same at every budget."""
    records = []
    for t in sweep.star({"model.width": 64}, {"model.width": [8, 16, 32, 128, 256]}, "steps",
                        [100, 200, 400, 800]):  # fmt: skip
        best = 20 * (t["steps"] / 100) ** 0.5
        error = 0.3 + 0.05 * math.log(t["model.width"] / best) ** 2
        records.append(write_trial(tmp_path / "star", t, "vit_s16", 1e6 * t["model.width"],
                                   error, examples_seen=128 * t["steps"]))  # fmt: skip
    sweep.write_index(tmp_path / "star", {r["name"]: r for r in records})
    text = report.write([tmp_path / "star"], tmp_path / "out").read_text()
    (row,) = section_table(text, "## Shape-optimal scaling")
    assert row["dimension"] == "model.width" and row["exponent"].startswith("0.500 ± 0.000")
    assert [float(v) for v in row["optima"].split(", ")] == pytest.approx(
        [20, 20 * 2**0.5, 40, 40 * 2**0.5], rel=1e-3
    )


@pytest.mark.parametrize(
    "at, message",
    [({"strategy": "w"}, "--at needs a size"),
     ({"flops": 1e9, "params": 1e6}, "one size"),
     ({"flops": 1e9, "colour": "red"}, "no column 'colour'"),
     ({"flops": 1e9, "strategy": "none"}, "no finished trials match"),
     ({"flops": 1e9, "strategy": "base"}, "0 groups with 3 or more distinct flops")],
)  # fmt: skip
def test_predict_refuses_what_the_data_cannot_support(tmp_path, at, message):
    study = fake_study(tmp_path / "study")
    with pytest.raises(ScalingError, match=message):
        predict.predict([study], at)


def test_the_strategies_study_starts_where_its_config_says():
    import importlib.util

    from conftest import ROOT

    from scaling import space

    spec = importlib.util.spec_from_file_location("study", ROOT / "configs/scaling_strategies.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    base = {"model.name": study.BASE} | {f"model.{k}": v for k, v in study.BASE_SETTINGS.items()}
    assert space.complexity(base)["flops"] == study.BASE_FLOPS

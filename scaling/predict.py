"""`scaling predict DIR --at KEY=VALUE ...`: the test error a study's trials predict for a
configuration nobody trained, with a 95% interval.

`--at` names the point in one of two ways:

- a size: `flops=4e8`, `params=2e6`, `activations=...` or `train_examples=...`, the x of the law;
- a configuration: `model.name=wrn16_1 model.width_multiplier=3 image_size=32`, whose FLOPs (or
  `--x` measure) are counted on the model built shape-only, as training counts them.

Any other KEY=VALUE is a column of the results (`strategy=dWr`, `dataset=...`) and keeps only the
trials with that value. The trials must form one of the report's groups (a family
and recipe: `scaling.results.fit_groups`). The estimator is the one of `scaling.laws` that best
predicted the group's largest size when it was held out; it is then fitted on every point and
evaluated at the target.
A target the data cannot support gets a refusal that says why.
"""

from scaling import ScalingError, laws, results
from scaling.config import parse_value

SIZES = ("flops", "params", "activations", "train_examples")


def parse_at(pairs) -> dict:
    at = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ScalingError(f"--at {pair!r}: expected KEY=VALUE")
        at[key] = text if key == "model.name" else parse_value(text)
    return at


def measure(config: dict, num_classes: int) -> dict:
    """params, FLOPs (XLA's count of the forward pass) and activations of the model that the
    `model.*` keys and `image_size` of `config` describe, as `scaling train` records them."""
    from scaling import flops, models  # JAX: only for a configuration, not for a size

    settings = {k.removeprefix("model."): v for k, v in config.items() if k.startswith("model.")}
    image_size = int(config.get("image_size") or models.default_image_size(settings["name"]))
    model = models.abstract(settings.pop("name"), image_size=image_size,
                            num_classes=num_classes, **settings)  # fmt: skip
    return dict(
        params=models.count_params(model),
        flops=flops.xla_flops(model, image_size),
        activations=flops.macs_and_activations(model, image_size)[1],
    )


def split(at: dict, x: str | None):
    """(x, the target's value or None for a configuration, the configuration, the filters)."""
    sizes = {k: v for k, v in at.items() if k in SIZES}
    config = {k: v for k, v in at.items() if k.startswith("model.") or k == "image_size"}
    filters = {k: v for k, v in at.items() if k not in sizes and k not in config}
    if len(sizes) > 1 or (sizes and "model.name" in config):
        raise ScalingError("--at gives one size (flops=..., params=...) or one configuration")
    if sizes:
        (key, value), = sizes.items()  # fmt: skip
        return key, float(value), {}, {**filters, **config}
    if "model.name" not in config:
        raise ScalingError(f"--at needs a size ({', '.join(SIZES)}) or model.name=...")
    return x or "flops", None, config, filters


def predict(directories, at: dict, x: str | None = None, holdout: int = 1) -> dict:
    """The prediction at `at` (see the module docstring) from the finished trials under
    `directories`: dict(x, value, estimator, log_rmse, error, low, high, trials, beyond)."""
    if x is not None and x not in SIZES:
        raise ScalingError(f"--x {x!r} is not a size; sizes: {', '.join(SIZES)}")
    x, value, config, filters = split(at, x)
    done = results.load(*directories)
    done = done[done.status == "done"]
    if config:
        family = results.family_name(config["model.name"])
        done = done[done.family == family]
    for key, wanted in filters.items():
        if key not in done:
            raise ScalingError(f"--at {key}=...: the results have no column {key!r}")
        done = done[done[key].astype(str) == str(wanted)]
    if done.empty:
        raise ScalingError("no finished trials match --at: nothing to fit")
    # The report's groups: one law per family and recipe (a sample's own learning rates apart).
    groups = [(g, rows) for size, g, rows in results.fit_groups(done) if size == x]
    groups = [(g, rows) for g, rows in groups if rows[x].nunique() >= 3]
    if len(groups) != 1:
        found = f"{len(groups)} groups" + (
            f" ({'; '.join(g for g, _ in groups)})" if groups else ""
        )
        raise ScalingError(
            f"the trials form {found} with 3 or more distinct {x} values; one is needed "
            "(choose with --at KEY=VALUE)"
        )
    rows = groups[0][1]
    if config:
        value = measure(config, int(rows.num_classes.iloc[0]))[x]
    points, errors = rows[x].astype(float).to_numpy(), rows.test_error.to_numpy()
    check = laws.extrapolate(points, errors, holdout)
    if check["best"] is None:
        reasons = "; ".join(f"{r['name']}: {r['reason']}" for r in check["results"])
        raise ScalingError(f"no estimator predicted the held-out {x}: {reasons}")
    law = laws.fit(check["best"], points, errors)
    if not law.converged:
        raise ScalingError(f"{check['best']} fitted on every point did not converge: {law.message}")
    low, high = law.interval(value)
    scored = next(r for r in check["results"] if r["name"] == check["best"])
    return dict(x=x, value=value, estimator=check["best"], log_rmse=scored["log_rmse"],
                error=float(law.predict(value)), low=float(low), high=float(high),
                trials=len(points), beyond=value > points.max())  # fmt: skip


def line(p: dict) -> str:
    where = "beyond the largest trained" if p["beyond"] else "within the trained range"
    return (
        f"test error at {p['x']}={p['value']:.4g}: {p['error']:.4f} "
        f"(95% interval {p['low']:.4f} - {p['high']:.4f}; {where}); estimator {p['estimator']}, "
        f"chosen by its log-RMSE {p['log_rmse']:.3f} on the held-out largest size; "
        f"{p['trials']} trials"
    )

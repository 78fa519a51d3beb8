"""The `scaling` command: `scaling info MODEL`, `scaling train --config FILE --workdir DIR`."""

import argparse
import json
import sys

from absl import flags
from ml_collections import config_flags

from scaling import ScalingError

TRAIN_USAGE = """scaling train --config configs/train.py[:key=value,...] [--config.KEY=VALUE ...]
                     --workdir DIR [--overwrite] [--stop_after STEPS]"""


def info(args):
    from scaling import flops, models
    from scaling.config import parse_settings

    settings = parse_settings(args.set)
    if args.num_classes is not None:
        settings["num_classes"] = args.num_classes
    model = models.abstract(args.model, **settings)
    image_size = args.image_size
    if image_size is None:
        image_size = models.default_image_size(args.model)
    if image_size < 1:
        raise ScalingError(f"image size must be positive, got {image_size}")
    macs, activations = flops.macs_and_activations(model, image_size)
    out = dict(
        model=args.model,
        params=models.count_params(model),
        flops=flops.xla_flops(model, image_size),
        macs=macs,
        activations=activations,
        image_size=image_size,
        num_classes=model.head.out_features,
        settings=settings,
    )
    print(json.dumps(out))


def train(argv):
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "Training config file.", flag_values=fv)
    flags.DEFINE_string(
        "workdir", None, "Run directory (resumed if it holds a run).", flag_values=fv
    )
    flags.DEFINE_bool("overwrite", False, "Replace a run with a different config.", flag_values=fv)
    flags.DEFINE_integer(
        "stop_after", None, "Stop after this many steps (resumable).", flag_values=fv
    )
    try:
        fv(["scaling train", *argv])
    except flags.Error as e:
        # A config file's own error ends the (multi-line) message: report that line.
        last = [line for line in str(e).splitlines() if line.strip()][-1]
        raise ScalingError(last.removeprefix("scaling.ScalingError: ")) from None
    except (AttributeError, KeyError) as e:  # how ml_collections reports --config.NO_SUCH_KEY
        key = str(e).strip("'\"")
        raise ScalingError(f"config override names a key that does not exist: {key}") from None
    if fv.config is None or fv.workdir is None:
        raise ScalingError(f"usage: {TRAIN_USAGE}")
    from scaling import train as trainer

    summary = trainer.train(fv.config, fv.workdir, overwrite=fv.overwrite, stop_after=fv.stop_after)
    if summary is None:
        print(f"stopped early; run the same command to resume from {fv.workdir}")
        return
    s = summary
    print(
        f"{s['model']} on {s['dataset']}: test accuracy {s['test_accuracy']:.4f}, "
        f"train accuracy {s['train_accuracy']:.4f}, {s['steps']} steps in "
        f"{s['wall_seconds']:.0f} s ({s['images_per_second']:.0f} images/s)"
    )
    print(f"metrics: {fv.workdir}/metrics.jsonl  summary: {fv.workdir}/summary.json")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="scaling", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="parameters, FLOPs and activations of a model, as JSON")
    p.add_argument("model", help="model name, e.g. resnet20, wrn28_10, resnet50")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None, help="default: the model's own")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a model setting (width_multiplier=2, norm=group, ...)",
    )
    sub.add_parser("train", help="train one model", usage=TRAIN_USAGE, add_help=False)
    args, rest = parser.parse_known_args(argv)
    try:
        if args.command == "train":
            train(rest)
        elif rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        else:
            info(args)
    except ScalingError as e:
        print(f"scaling {args.command}: error: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

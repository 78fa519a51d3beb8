"""The `scaling` command: info, models, import, train, sweep, status, report, predict, bench, knn,
launch. `scaling COMMAND --help` gives each one's options; docs/ the guides."""

import argparse
import json
import sys
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from scaling import Diverged, ScalingError, Stopped


def info(args):
    from scaling import flops, models
    from scaling.config import parse_settings

    settings = parse_settings(args.set)
    if args.num_classes is not None:
        settings["num_classes"] = args.num_classes
    image_size = args.image_size
    if image_size is None:
        image_size = settings.get("image_size", models.default_image_size(args.model))
    settings.pop("image_size", None)
    if not isinstance(image_size, int) or image_size < 1:
        raise ScalingError(f"image size must be positive, got {image_size!r}")
    model = models.abstract(args.model, image_size=image_size, **settings)
    channels = settings.get("in_channels", 3)
    macs, activations = flops.macs_and_activations(model, image_size, channels)
    out = dict(
        model=args.model,
        params=models.count_params(model),
        flops=flops.xla_flops(model, image_size, channels),
        macs=macs,
        activations=activations,
        image_size=image_size,
        num_classes=model.head.out_features,
        settings=settings,
    )
    print(json.dumps(out))


def list_models(args):
    from scaling import models

    names = models.list_models(args.pattern)
    if not names:
        raise ScalingError(f"no model matches {args.pattern!r}; try scaling models")
    print(f"{'name':<20} {'family':<13} {'image':>5} {'parameters':>13}")
    for name in names:
        size, family = models.default_image_size(name), models.family_of(name).name
        params = models.count_params(models.abstract(name))
        print(f"{name:<20} {family:<13} {size:>5} {params:>13,}")


def import_weights(args):
    from scaling import models, pretrained
    from scaling.config import parse_settings

    if args.image_size is not None and args.image_size < 1:
        raise ScalingError(f"--image-size must be positive, got {args.image_size}")
    model, source, count = pretrained.import_weights(
        args.source, args.model, args.out, kind=args.kind, image_size=args.image_size,
        settings=parse_settings(args.set),
    )  # fmt: skip
    print(
        f"{args.model} from {args.source} ({source}, {count} tensors, "
        f"{models.count_params(model):,} parameters) -> {args.out}; "
        f"fine-tune with --config.init_from={args.out}"
    )


def parse_config(config_args):
    """The ConfigDict of `--config FILE.py[:arg] [--config.KEY=VALUE ...]` (absl, as big_vision)."""
    from scaling.config import load_config

    for i, arg in enumerate(config_args):  # the file's own errors, as one line each
        if arg == "--config" and i + 1 < len(config_args):
            load_config(config_args[i + 1])
        elif arg.startswith("--config="):
            load_config(arg.removeprefix("--config="))
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "Config file.", flag_values=fv)
    argv, sys.argv = sys.argv, ["scaling", *config_args]  # ml_collections finds overrides there
    try:
        fv(["scaling", *config_args])
    except flags.Error as e:
        # A config file's own error ends the (multi-line) message: report that line.
        last = [line for line in str(e).splitlines() if line.strip()][-1]
        raise ScalingError(last.removeprefix("scaling.ScalingError: ")) from None
    except (AttributeError, KeyError) as e:  # how ml_collections reports --config.NO_SUCH_KEY
        key = str(e).strip("'\"")
        raise ScalingError(f"config override names a key that does not exist: {key}") from None
    finally:
        sys.argv = argv
    if fv.config is None:
        raise ScalingError("give the config with --config FILE.py[:arg]")
    return fv.config


def start_distributed(args):
    """Join a multi-host job: explicit coordinates (CPU tests), or JAX's own auto-detection
    (Cloud TPU VMs, SLURM) with --distributed."""
    import jax

    if args.coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    elif args.distributed:
        jax.distributed.initialize()


def train(args, config_args):
    from ml_collections import ConfigDict

    from scaling import train as trainer
    from scaling.rundir import recorded_config

    if not args.workdir:
        raise ScalingError("--workdir is empty")
    if args.stop_after is not None and args.stop_after < 1:
        raise ScalingError(f"--stop-after must be >= 1 (steps), got {args.stop_after}")
    workdir = Path(args.workdir)
    if config_args:
        config = parse_config(config_args)
    elif (workdir / "config.json").is_file():  # resume a run from its directory alone
        config = ConfigDict(recorded_config(workdir))
    else:
        raise ScalingError(f"{workdir} holds no run: give --config")
    start_distributed(args)
    summary = trainer.train(config, workdir, overwrite=args.overwrite, stop_after=args.stop_after)
    if summary is None:
        print(f"paused before the end; run the same command to resume from {workdir}")
        return
    s = summary
    steps = f"{s['steps']} steps"
    if early := s.get("early_stopping"):
        steps = (f"{early['stopped_step']} of {s['steps']} steps (early stopping: the best "
                 f"{early['metric']} at step {early['best_step']})")  # fmt: skip
    print(
        f"{s['model']} on {s['dataset']}: test accuracy {s['test_accuracy']:.4f}, "
        f"train accuracy {s['train_accuracy']:.4f}, {steps} in "
        f"{s['wall_seconds']:.0f} s ({s['images_per_second']:.0f} images/s)"
    )
    print(f"metrics: {workdir}/metrics.jsonl  summary: {workdir}/summary.json")


def sweep(args, config_args):
    from scaling import sweep as sweeps

    if args.parallel < 1:
        raise ScalingError(f"--parallel must be >= 1, got {args.parallel}")
    study = parse_config(config_args)
    index, _, count = args.shard.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise ScalingError(f"--shard takes I/N with 0 <= I < N, got {args.shard!r}")
    if args.dry_run:
        trials = sweeps.expand(study)[int(index) :: int(count)]
        print(sweeps.dry_run(trials, args.workdir))
        return
    train_args = ["--distributed"] if args.distributed else []
    shard = (int(index), int(count))
    if args.executor == "slurm":
        from scaling import slurm

        settings = dict(partition=args.partition, gpus_per_trial=args.gpus_per_trial,
                        time_min=args.time, array_parallelism=args.array_parallelism)  # fmt: skip
        states = slurm.run(study, args.workdir, settings=settings, retry_failed=args.retry_failed,
                           shard=shard, train_args=train_args)  # fmt: skip
    else:
        states = sweeps.run(study, args.workdir, parallel=args.parallel, shard=shard,
                            retry_failed=args.retry_failed, train_args=train_args)  # fmt: skip
    tally = {s: list(states.values()).count(s) for s in sweeps.STATES if s in states.values()}
    print(f"sweep {args.workdir}: " + ", ".join(f"{n} {s}" for s, n in tally.items()))
    if best := sweeps.best_trial(args.workdir, [n for n, s in states.items() if s == "done"]):
        print(f"best: {best['name']} (test accuracy {best['test_accuracy']:.4f})")
    if set(states.values()) != {"done"}:
        sys.exit(1)


def status(args):
    from scaling import sweep as sweeps

    print("\n".join(sweeps.status(Path(args.dir))))


def predict(args):
    from scaling import predict as predictions

    print(predictions.line(predictions.predict(args.dirs, predictions.parse_at(args.at), args.x)))


def report(args):
    from scaling import report as reports

    if args.notes and not Path(args.notes).is_file():
        raise ScalingError(f"no such notes file: {args.notes}")
    path = reports.write(args.dirs, args.out, notes=args.notes, extrapolate=args.extrapolate)
    print(f"report: {path}")


def bench(args):
    from scaling import bench as benchmarks

    for name, value in [("--batch", args.batch), ("--image-size", args.image_size),
                        ("--steps", args.steps), ("--windows", args.windows)]:  # fmt: skip
        if value < 1:
            raise ScalingError(f"{name} must be positive, got {value}")
    if args.out:
        from scaling.rundir import check_writable

        check_writable(Path(args.out), "--out")
    result = benchmarks.bench(
        args.models, batch=args.batch, image_size=args.image_size, steps=args.steps,
        windows=args.windows, dtype=args.dtype, compare=args.compare, stream=args.stream,
    )  # fmt: skip
    print("\n".join(benchmarks.table(result["records"])))
    if args.out:
        benchmarks.write(result, Path(args.out), "scaling bench " + " ".join(sys.argv[2:]))
        print(f"wrote {args.out}/bench.json and {args.out}/README.md")


def knn(args):
    from scaling import knn as knns
    from scaling.rundir import check_writable

    knns.check_settings(args.k, args.distance, args.vote, args.query_chunk, args.train_chunk)
    check_knn_source(args)
    workdir = Path(args.workdir) if args.workdir is not None else None
    if workdir is not None:
        check_writable(workdir, "--workdir")
        if workdir.exists() and any(workdir.iterdir()):
            raise ScalingError(f"{workdir} is not empty; choose a new or empty --workdir")
    from scaling import data, probe

    features, features_of = None, None
    if args.features:
        probe.run_config(Path(args.features))  # a directory without a run: before any work
        ds, *features, run = probe.run_features(args.features)
        args.data, args.image_size, args.seed = run.dataset, run.image_size, run.data_seed
        features_of = run.model.name
    else:
        args.seed = args.seed or 0
        ds = data.load(args.data, args.image_size, train_examples=args.train_examples,
                       seed=args.seed)  # fmt: skip
    results = knns.evaluate(ds, args.k, args.distance, args.vote, query_chunk=args.query_chunk,
                            train_chunk=args.train_chunk, features=features)  # fmt: skip
    ks = sorted(set(args.k))
    for k in ks:
        summary = knns.summary(ds, args.data, args.image_size, k, args.distance, args.vote,
                               results[k], results["wall_seconds"], results["queries"],
                               args.seed, features_of)  # fmt: skip
        if args.features:
            summary["features"] = str(args.features)
        print(
            f"{summary['model']} ({args.vote} vote) on {args.data}: test accuracy "
            f"{summary['test_accuracy']:.4f}, train accuracy (leave-one-out) "
            f"{summary['train_accuracy']:.4f}"
        )
        if workdir is not None:  # one run directory per k when there are several (k=K/)
            config = dict(model=dict(name=summary["model"]), dataset=args.data, k=k,
                          distance=args.distance, vote=args.vote, image_size=args.image_size,
                          train_examples=args.train_examples, seed=args.seed,
                          features=args.features)  # fmt: skip
            knns.write_run(workdir / f"k={k}" if len(ks) > 1 else workdir, config, summary)
    print(f"{results['queries']} queries in {results['wall_seconds']:.1f} s"
          + (f"; summaries in {workdir}" if workdir is not None else ""))  # fmt: skip


def check_knn_source(args):
    """Either raw pixels (--data and --image-size) or a run's features (--features), whole."""
    if args.features:
        given = [f for f in ("data", "image_size", "train_examples", "seed")
                 if getattr(args, f) is not None]  # fmt: skip
        if given:
            flags = ", ".join("--" + f.replace("_", "-") for f in given)
            raise ScalingError(f"--features takes the run's data and subset; drop {flags}")
        return
    if args.data is None or args.image_size is None:
        raise ScalingError("give --data and --image-size (raw pixels) or --features RUN_DIR")
    if args.image_size < 1:
        raise ScalingError(f"--image-size must be positive, got {args.image_size}")
    if args.train_examples is not None and args.train_examples < 2:
        raise ScalingError(f"--train-examples must be at least 2, got {args.train_examples}")


def launch(args, config_args):
    from scaling import launch as launcher
    from scaling import sweep as sweeps

    num_trials = len(sweeps.expand(parse_config(config_args)))
    spec = launcher.Launch(
        study=config_args, name=args.name, zone=args.zone, accelerator=args.accelerator,
        bucket=args.bucket, trials_per_vm=args.trials_per_vm, num_trials=num_trials,
        spot=not args.on_demand, queued=args.queued,
    )  # fmt: skip
    if args.target in ("sky", "skypilot"):
        tasks = launcher.skypilot_tasks(spec)
        if args.out:
            for path in launcher.write_tasks(tasks, Path(args.out)):
                print(f"sky jobs launch {path}")
        else:
            print("---\n".join(tasks.values()), end="")
        return
    commands = launcher.tpu_commands(spec)
    print(launcher.as_script(commands), end="")
    if args.execute and (status := launcher.execute(commands)):
        sys.exit(status)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as for every other bad input
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser():
    parser = Parser(prog="scaling", description=__doc__)
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
    config_help = "--config FILE.py[:arg] [--config.KEY=VALUE ...] as for big_vision"

    p = sub.add_parser("models", help="the registered model names, with parameter counts")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style, e.g. 'wrn*'")

    p = sub.add_parser("import", help="convert torchvision/timm/big_vision weights for init_from")
    p.add_argument("source", help="a .safetensors, .pth (needs torch) or big_vision .npz file")
    p.add_argument("--model", required=True, help="our model name, e.g. resnet50, vit_b16")
    p.add_argument("--out", required=True, help="a new directory for the converted weights")
    p.add_argument("--image-size", type=int, default=None,
                   help="resize ViT/CoAtNet position tables to this resolution")  # fmt: skip
    p.add_argument("--source", dest="kind", choices=["torchvision", "timm", "wrn", "big_vision"],
                   help="the checkpoint's naming; default: detected from its names")  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a model setting (e.g. scan=False)")  # fmt: skip

    p = sub.add_parser("train", help="train one model", epilog=config_help)
    p.add_argument("--workdir", required=True, help="run directory; resumed if it holds a run")
    p.add_argument("--overwrite", action="store_true", help="replace a run with another config")
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="STEPS",
        help="stop after this many steps, resumable (as a preemption would)",
    )
    p.add_argument(
        "--distributed",
        action="store_true",
        help="multi-host: jax.distributed.initialize() with auto-detection (TPU VMs)",
    )
    p.add_argument("--coordinator", help="multi-host with explicit HOST:PORT of process 0")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)

    p = sub.add_parser("sweep", help="run a study's trials; re-run to finish", epilog=config_help)
    p.add_argument("--workdir", required=True)
    p.add_argument("--dry-run", action="store_true", help="list the trials, run nothing")
    p.add_argument("--parallel", type=int, default=1, help="trials at once (processes)")
    p.add_argument("--retry-failed", action="store_true", help="re-run failed/diverged trials")
    p.add_argument("--shard", default="0/1", help="I/N: run every N-th trial from the I-th")
    p.add_argument("--distributed", action="store_true", help="trials span several hosts")
    p.add_argument("--executor", choices=["local", "slurm"], default="local",
                   help="slurm: one job-array task per trial, through submitit")  # fmt: skip
    p.add_argument("--partition", help="slurm: the partition")
    p.add_argument("--gpus-per-trial", type=int, default=0, help="slurm: GPUs per task")
    p.add_argument("--time", type=int, default=60, help="slurm: minutes per task, before requeue")
    p.add_argument("--array-parallelism", type=int, help="slurm: tasks running at once")

    p = sub.add_parser("report", help="REPORT.md, figures and runs.csv of one or more sweeps")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="sweep directories (finished or not)")
    p.add_argument("--out", help="where to write (default DIR/report); copies the run records")
    p.add_argument("--notes", help="a Markdown file placed at the top of REPORT.md")
    p.add_argument(
        "--extrapolate", type=int, default=0, metavar="K",
        help="hold out each group's K largest sizes; score each law's predictions",
    )  # fmt: skip

    p = sub.add_parser("status", help="a sweep's progress, from its directory (no JAX)")
    p.add_argument("dir", metavar="DIR", help="a sweep directory")

    p = sub.add_parser("predict", help="a study's predicted error at an untrained size or model")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="sweep directories with finished trials")
    p.add_argument("--at", nargs="+", required=True, metavar="KEY=VALUE",
                   help="flops=4e8, or model.name=... [model.SETTING=...] [image_size=...]; "
                   "other keys filter the trials (strategy=dWr)")  # fmt: skip
    p.add_argument("--x", help="the size a configuration is placed by (default flops)")

    p = sub.add_parser("bench", help="training throughput, utilisation, and PyTorch twins")
    p.add_argument("--models", nargs="+", default=["resnet20", "wrn16_4", "efficientnet_b0",
                   "vit_s4", "coatnet_cctt"], help="benchmark names or any model name")  # fmt: skip
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="steps per timed window")
    p.add_argument("--windows", type=int, default=5, help="timed windows; the median counts")
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="default: float32 on CPU, bfloat16 on accelerators")  # fmt: skip
    p.add_argument("--compare", choices=["torch"], help="time the PyTorch twins alongside")
    p.add_argument("--stream", metavar="SOURCE", help="time the input pipeline decoding "
                   "folder:DIR or tfds:NAME from disk, not in memory")  # fmt: skip
    p.add_argument("--out", help="directory for bench.json and README.md (the table)")

    p = sub.add_parser("knn", help="the k-nearest-neighbours baseline on raw pixels, or the "
                       "k-NN probe of a trained run's features")  # fmt: skip
    p.add_argument("--data", help="a data source: digits, folder:PATH, tfds:NAME")
    p.add_argument("--image-size", type=int)
    p.add_argument(
        "--features",
        metavar="RUN_DIR",
        help="a trained run: k-NN on its penultimate "
        "features, of the data it trained on (instead of --data, --image-size)",
    )
    p.add_argument("--k", type=int, nargs="+", default=[1], help="one or more k (default 1)")
    p.add_argument("--distance", default="l2", help="l1, l2 (default) or cosine")
    p.add_argument("--vote", default="majority", help="majority (default) or distance (1/d)")
    p.add_argument("--train-examples", type=int, help="a stratified training subset")
    p.add_argument("--seed", type=int, help="of the training subset and holdout (default 0)")
    p.add_argument("--query-chunk", type=int, default=256, help="queries per device step")
    p.add_argument("--train-chunk", type=int, help="training examples per step "
                   "(default: all; smaller streams them with a running top-k)")  # fmt: skip
    p.add_argument("--workdir", help="a new or empty directory for summary.json (k=K/ each)")

    p = sub.add_parser(
        "launch", help="print (or --execute) cloud TPU commands for a study", epilog=config_help
    )
    p.add_argument("target", choices=["tpu", "sky", "skypilot"], help="sky: SkyPilot tasks")
    p.add_argument("--name", required=True)
    p.add_argument("--zone", required=True)
    p.add_argument("--accelerator", required=True, help="e.g. v4-8, v4-32, v5p-16")
    p.add_argument("--bucket", required=True, help="gs://BUCKET for the results")
    p.add_argument("--trials-per-vm", type=int, default=0, help="0: all trials on one VM")
    p.add_argument("--on-demand", action="store_true", help="no spot VMs")
    p.add_argument("--queued", action="store_true", help="create through queued resources")
    p.add_argument("--execute", action="store_true", help="run the commands, not just print")
    p.add_argument("--out", help="sky: write one task file per shard here, not to stdout")
    return parser  # fmt: skip


def enable_compilation_cache():
    """Keep compiled programs on disk (JAX's persistent cache), so the trials of a sweep that
    share an architecture compile it once. $JAX_COMPILATION_CACHE_DIR, if set, wins."""
    import jax

    from scaling.decode import cache_directory

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(cache_directory() / "jax"))


def main(argv=None):
    from scaling.ops import cpu

    cpu.configure()  # before JAX starts: it reads XLA_FLAGS and malloc settings once
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    commands = {"train": train, "sweep": sweep, "launch": launch}
    plain = {"info": info, "models": list_models, "import": import_weights, "report": report,
             "predict": predict, "status": status, "bench": bench, "knn": knn}  # fmt: skip
    try:
        if args.command in ("train", "info"):
            enable_compilation_cache()
        if rest and args.command in plain:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        if args.command in plain:
            plain[args.command](args)
        else:
            commands[args.command](args, rest)  # the rest is --config and its overrides
    except Diverged as e:
        print(f"scaling {args.command}: diverged: {e}", file=sys.stderr)
        sys.exit(Diverged.exit_code)
    except Stopped as e:
        print(f"scaling {args.command}: {e}; run the same command to resume", file=sys.stderr)
        sys.exit(Stopped.exit_code)
    except KeyboardInterrupt:
        print(f"scaling {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)
    except ScalingError as e:
        print(f"scaling {args.command}: error: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

"""Cloud TPU launching: the exact gcloud commands for a study, or a SkyPilot task file.

`tpu_commands` returns, per VM: create it (spot by default, or through queued resources), copy
this checkout to every worker, install, run the study's sweep on every worker (`--worker=all`;
on a multi-host slice each trial is one multi-controller JAX job, `--distributed`) with its
workdir on the bucket, and delete the VM; then pull the results from the bucket. Nothing here
schedules or retries: a preempted VM is recreated by running the same commands again, and the
sweep's resume finishes only what is missing. Where a study outgrows hand-managed VMs,
`skypilot_tasks` writes a SkyPilot task per shard: its managed jobs (`sky jobs launch`) relaunch
preempted spot TPUs and re-run the same sweep command, which resumes from the checkpoints on the
bucket.

Every value the user gives is checked here (`Launch`) against what Google Cloud accepts (a zone,
a bucket, a TPU slice), and is quoted again where it lands: `shlex.quote` in the command strings
a remote shell reads, a JSON string (a valid YAML scalar) in the SkyPilot task. Either alone
keeps a value from becoming a command or a YAML key; both together survive a later change to
either.
"""

import dataclasses
import json
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

from scaling import ScalingError
from scaling.rundir import atomic_file, check_writable

RUNTIME = "tpu-ubuntu2204-base"
SOURCE_ARCHIVE = "scaling-src.tar.gz"
CORES_PER_HOST = 8  # v2, v3, v4 and v5p names count TensorCores; 4 chips x 2 cores per host
ACCELERATORS = "v2-N, v3-N, v4-N or v5p-N, N TensorCores: a positive multiple of 8 (e.g. v4-32)"
ZONE = re.compile(r"[a-z]+-[a-z]+[0-9]+-[a-z]")  # us-central2-b, europe-west4-a
# gs://BUCKET[/PATH]: GCS bucket names (3-63 characters), then path components of safe characters.
BUCKET = re.compile(r"gs://[a-z0-9][a-z0-9._-]{1,61}[a-z0-9](/[A-Za-z0-9._-]+)*/?")
BUCKETS = (
    "gs://BUCKET[/PATH]: BUCKET of 3-63 lower-case letters, digits, '-', '_' and '.', starting "
    "and ending with a letter or digit; PATH of letters, digits, '.', '_', '-' and '/', no '..'"
)


@dataclasses.dataclass
class Launch:
    study: list[str]  # --config FILE[:arg] and its --config.KEY=VALUE overrides
    name: str
    zone: str
    accelerator: str
    bucket: str
    num_trials: int
    trials_per_vm: int = 0  # 0: one VM runs every trial
    spot: bool = True
    queued: bool = False

    def __post_init__(self):
        if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", self.name):
            raise ScalingError(f"--name {self.name!r}: lower-case letters, digits and '-' only")
        if not BUCKET.fullmatch(self.bucket) or {".", ".."} & set(self.bucket[5:].split("/")):
            raise ScalingError(f"--bucket {self.bucket!r} is not valid; give {BUCKETS}")
        if self.trials_per_vm < 0:
            raise ScalingError("--trials-per-vm must be >= 0")
        hosts(self.accelerator)  # validates the name
        if not ZONE.fullmatch(self.zone):
            raise ScalingError(
                f"--zone {self.zone!r} is not a Google Cloud zone; give REGION-ZONE such as "
                "us-central2-b or europe-west4-a"
            )

    @property
    def num_vms(self) -> int:
        if not self.trials_per_vm:
            return 1
        return max(1, math.ceil(self.num_trials / self.trials_per_vm))


def hosts(accelerator: str) -> int:
    """Hosts in a TPU slice named like v4-32 (TensorCores). The smallest slice is one host's 8
    cores and larger ones are whole hosts, so a count that is not a multiple of 8 names no
    slice (v4-0 or v5p-12 would otherwise fail only at `gcloud ... create`)."""
    match = re.fullmatch(r"(v2|v3|v4|v5p)-([1-9][0-9]*)", accelerator)
    if not match or int(match[2]) % CORES_PER_HOST:
        raise ScalingError(f"unknown accelerator {accelerator!r}; valid: {ACCELERATORS}")
    return int(match[2]) // CORES_PER_HOST


def _sweep_command(spec: Launch, vm_index: int, workdir: str) -> str:
    args = ["scaling", "sweep", *spec.study, "--workdir", workdir,
            "--shard", f"{vm_index}/{spec.num_vms}"]  # fmt: skip
    if hosts(spec.accelerator) > 1:
        args.append("--distributed")
    return shlex.join(args)


def tpu_commands(spec: Launch) -> list[list[str]]:
    """Every command, in order, as argument lists (first: archive this checkout)."""
    bucket, _, prefix = spec.bucket.removeprefix("gs://").strip("/").partition("/")
    # The workdir lives on the bucket (a gcsfuse mount on every worker), so a preempted VM loses
    # nothing, and all hosts of a multi-host slice see the same trial states and checkpoints.
    # Values go into a remote shell's command line quoted (`Launch` has validated them too).
    only_dir = f"--only-dir {shlex.quote(prefix)} " if prefix else ""
    mount = (
        "mkdir -p ~/bucket && (mountpoint -q ~/bucket || "
        f"gcsfuse --implicit-dirs {only_dir}{shlex.quote(bucket)} ~/bucket)"
    )
    install = (
        f"mkdir -p scaling && tar xzf {shlex.quote(SOURCE_ARCHIVE)} -C scaling && "
        'cd scaling && python3 -m pip install -q -e ".[tpu]"'
    )
    commands = [["git", "archive", "--format=tar.gz", "-o", SOURCE_ARCHIVE, "HEAD"]]
    gcloud = ["gcloud", "compute", "tpus"]
    for i in range(spec.num_vms):
        vm = f"{spec.name}-{i}" if spec.num_vms > 1 else spec.name
        where = ["--zone", spec.zone]
        if spec.queued:
            create = [
                *gcloud,
                "queued-resources",
                "create",
                vm,
                "--node-id",
                vm,
                *where,
                "--accelerator-type",
                spec.accelerator,
                "--runtime-version",
                RUNTIME,
            ]
            delete = [*gcloud, "queued-resources", "delete", vm, *where, "--force", "--quiet"]
        else:
            create = [
                *gcloud,
                "tpu-vm",
                "create",
                vm,
                *where,
                "--accelerator-type",
                spec.accelerator,
                "--version",
                RUNTIME,
            ]
            delete = [*gcloud, "tpu-vm", "delete", vm, *where, "--quiet"]
        if spec.spot:
            create.append("--spot")
        ssh = [*gcloud, "tpu-vm", "ssh", vm, *where, "--worker=all", "--command"]
        sweep = _sweep_command(spec, i, f"../bucket/{spec.name}")  # run from ~/scaling
        commands += [
            create,
            [*gcloud, "tpu-vm", "scp", SOURCE_ARCHIVE, f"{vm}:~/", *where, "--worker=all"],
            [*ssh, install],
            [*ssh, f"{mount} && cd scaling && PATH=$HOME/.local/bin:$PATH {sweep}"],
            delete,
        ]
    commands.append(
        [
            "gcloud",
            "storage",
            "rsync",
            "-r",
            f"{spec.bucket.rstrip('/')}/{spec.name}",
            f"runs/{spec.name}",
        ]
    )
    return commands  # fmt: skip


def as_script(commands: list[list[str]]) -> str:
    return "".join(shlex.join(c) + "\n" for c in commands)


def execute(commands: list[list[str]]) -> int:
    """Run the commands in order; at the first failure stop, say which, and return its exit
    status (0 when every one succeeded). Running them all again is safe: the sweep resumes."""
    for command in commands:
        print(f"+ {shlex.join(command)}", flush=True)
        try:
            status = subprocess.run(command).returncode
        except OSError as e:  # not installed, not executable
            status, reason = 127, f"could not run ({e.strerror})"
        else:
            reason = f"exited with status {status}"
        if status:
            print(f"scaling launch: `{shlex.join(command)}` {reason}; stopped there (running "
                  "it all again is safe: the sweep resumes)", file=sys.stderr)  # fmt: skip
            return status
    return 0


MOUNT = "/results"  # where each task sees the bucket
RESTARTS_ON_ERRORS = 3  # a trial that fails (not a preemption) is retried this often


def skypilot_tasks(spec: Launch) -> dict[str, str]:
    """{file name: SkyPilot task (YAML)}, one managed job per shard of the study.

    Each runs `scaling sweep --shard I/N` with its workdir on the bucket (mounted at /results),
    on a spot TPU slice by default; SkyPilot's job recovery relaunches a preempted slice (and
    retries a failed run a few times), and the sweep resumes from the checkpoints on the
    bucket. Every interpolated value is a JSON scalar, which YAML reads as the same value: a
    quoted string cannot end its line or start a key, whatever it holds."""
    q = json.dumps
    tasks = {}
    for i in range(spec.num_vms):
        name = f"{spec.name}-{i}" if spec.num_vms > 1 else spec.name
        run = _sweep_command(spec, i, f"{MOUNT}/{spec.name}")
        tasks[f"{name}.yaml"] = f"""\
# sky jobs launch {name}.yaml: a managed job; a preempted spot slice is relaunched and the
# sweep resumes from the checkpoints under {MOUNT}, which lives on the bucket.
name: {q(name)}
resources:
  accelerators: {q(f"tpu-{spec.accelerator}")}
  accelerator_args:
    runtime_version: {q(RUNTIME)}
  use_spot: {q(spec.spot)}
  zone: {q(spec.zone)}
  job_recovery:
    strategy: FAILOVER
    max_restarts_on_errors: {RESTARTS_ON_ERRORS}
workdir: .
file_mounts:
  {MOUNT}:
    source: {q(spec.bucket)}
    mode: MOUNT
setup: {q("python3 -m pip install -q -e '.[tpu]'")}
run: {q(run)}
"""
    return tasks


def write_tasks(tasks: dict[str, str], out: Path) -> list[Path]:
    """Write the task files into `out`; a file there of other content (yours) is never written
    over: refused, before any write. Returns the paths."""
    check_writable(out, "--out")
    for name, task in tasks.items():
        if (out / name).exists() and (out / name).read_text(errors="replace") != task:
            raise ScalingError(f"{out / name} exists with other content; move it away")
    out.mkdir(parents=True, exist_ok=True)
    for name, task in tasks.items():
        with atomic_file(out / name) as file:
            file.write(task)
    return [out / name for name in tasks]

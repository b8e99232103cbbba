"""``python -m fttrain.slurm [--submit] [--array] OVERRIDES``: an sbatch script
rendered from the same Hydra config the run will use.

    compose     fttrain/conf/ + OVERRIDES -> the run's config (slurm group: the cluster)
    check       the run's config checks, the plan on the job's topology (nodes x
                processes), the cluster (sinfo: partition, node count, GPUs, CPUs;
                squeue: no job of this run already queued), the run directory
                (the same rules as python -m fttrain: a finished or unfinished
                run is not restarted without resume_from / a new name)
    write       <run_dir>/job/conf/        a copy of fttrain/conf/: the job composes from it
                <run_dir>/job/config.yaml  the resolved config; the job refuses to
                                           train if its own differs
                <run_dir>/job.sbatch       slurm/single_node or multi_node template
    submit      --submit: sbatch --parsable, prints the job id (Slurm's message on failure)

``--array``: overrides with sweep values (``peft.r=8,16``) become a job array,
one trial per task, each trial in ``<output_root>/multirun/<name>/<overrides>``
(the directory names of a local ``-m`` sweep); ``python -m fttrain.sweep DIR``
summarises it. Every trial is composed and checked before anything is submitted.

The job runs the user's overrides as given; when Slurm restarts it (requeue
after a stop signal, preemption), it continues from the newest complete
checkpoint (fttrain.__main__: SLURM_RESTART_COUNT > 0).
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

from fttrain.env import PORT_BASE, PORT_SPAN
from fttrain.errors import FttrainError, report
from fttrain.paths import CONF_DIR, SBATCH_DIR

# Overrides the renderer sets itself.
OWN_KEYS = ("hydra.run.dir",)


class SlurmError(FttrainError, RuntimeError):
    """The job cannot be rendered or submitted as asked; nothing was submitted."""


@dataclass
class Trial:
    overrides: List[str]  # the user's overrides for this trial (sweep values expanded)
    cfg: DictConfig
    run_dir: Path
    label: str  # the sweep values, e.g. "peft.r=8"


# ------------------------------------------------------------------ compose
def compose(overrides: List[str], config_dirs: Sequence[str] = ()) -> tuple:
    """(run config, hydra run dir) as ``python -m fttrain [--config-dir D ...] OVERRIDES`` would compose them."""
    from fttrain.config.compose import compose_config

    full = compose_config(overrides, return_hydra_config=True, config_dirs=config_dirs)
    run_dir = Path(str(full.hydra.run.dir))
    cfg = OmegaConf.masked_copy(full, [k for k in full if k != "hydra"])
    return cfg, run_dir.resolve()


def split_sweeps(overrides: List[str]):
    """([fixed overrides], [(key, [values])] for each sweep override)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    fixed, sweeps = [], []
    for text, parsed in zip(overrides, OverridesParser.create().parse_overrides(overrides)):
        if parsed.is_sweep_override():
            key = parsed.get_key_element()
            sweeps.append((key, [f"{key}={v}" for v in parsed.sweep_string_iterator()]))
        else:
            fixed.append(text)
    return fixed, sweeps


def dirname_of(overrides: List[str]) -> str:
    """Hydra's job.override_dirname for these overrides, with the keys
    fttrain/conf/config.yaml excludes from it (the same names as a local -m sweep)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    exclude = OmegaConf.load(CONF_DIR / "config.yaml").hydra.job.config.override_dirname.exclude_keys
    lines = [o.input_line for o in OverridesParser.create().parse_overrides(overrides)
             if o.key_or_group not in exclude]
    return ",".join(sorted(lines))


def expand_trials(overrides: List[str], config_dirs: Sequence[str] = ()) -> List[Trial]:
    fixed, sweeps = split_sweeps(overrides)
    if not sweeps:
        raise SlurmError("--array needs at least one sweep override, e.g. peft.r=8,16")
    trials = []
    for combo in itertools.product(*(values for _, values in sweeps)):
        trial_overrides = fixed + list(combo)
        cfg, _ = compose(trial_overrides, config_dirs)
        sweep_dir = (Path(cfg.output_root) / "multirun" / cfg.name).resolve()
        trials.append(Trial(trial_overrides, cfg, sweep_dir / dirname_of(trial_overrides), ",".join(combo)))
    return trials


# ------------------------------------------------------------------ check
def processes_per_node(s) -> int:
    return s.processes_per_node if s.processes_per_node is not None else s.gpus_per_node


def topology_problems(cfg: DictConfig) -> List[str]:
    """The slurm settings against each other and against the run's plan."""
    from fttrain.config.schema import value_of
    from fttrain.plan import PlanError, Topology
    from fttrain.plan.check import check_plan

    s, problems = cfg.slurm, []
    if not s.partition:
        problems.append("slurm.partition is not set (sinfo lists the partitions; fttrain/conf/slurm/local.yaml sets debug)")
    if s.nodes < 1:
        problems.append(f"slurm.nodes={s.nodes} must be >= 1")
    ppn = processes_per_node(s)
    if s.gpus_per_node and s.processes_per_node is not None and s.processes_per_node != s.gpus_per_node:
        problems.append(
            f"slurm.processes_per_node={s.processes_per_node} does not match slurm.gpus_per_node={s.gpus_per_node}: "
            "fttrain runs one process per GPU (leave processes_per_node null)")
    if ppn < 1:
        problems.append("slurm.gpus_per_node=0 (a CPU job) needs slurm.processes_per_node >= 1")
        return problems
    world = s.nodes * ppn
    if cfg.dist.expected_world_size is not None and cfg.dist.expected_world_size != world:
        problems.append(
            f"dist.expected_world_size={cfg.dist.expected_world_size} but the job starts {s.nodes} node(s) x {ppn} "
            f"process(es) = {world}")
    # "auto" as it will resolve on the compute nodes (bf16 on GPUs), not on this login node.
    requested = str(value_of(cfg.precision.dtype))
    precision = {"auto": "bf16" if s.gpus_per_node else "fp32"}.get(requested, requested)
    try:
        check_plan(cfg, Topology(world_size=world, local_world_size=ppn), precision, on_gpu=s.gpus_per_node > 0)
    except PlanError as e:
        problems.append(f"on {s.nodes} node(s) x {ppn} process(es): {e}")
    return problems


QUERY_TIMEOUT_S = 60  # sinfo / squeue wait this long for slurmctld before the check gives up on them


def slurm_query(args: List[str]) -> Tuple[Optional[str], Optional[str]]:
    """(stdout, None), or (None, why) when the command is missing, fails or hangs
    (slurmctld down): a problem to report with the others, never a traceback."""
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=QUERY_TIMEOUT_S)
    except FileNotFoundError:
        return None, (f"{args[0]} is not on PATH here, so the cluster cannot be checked or the job submitted: "
                      "run this where Slurm's commands are (a login node), or leave out --submit to only render")
    except subprocess.TimeoutExpired:
        return None, f"{args[0]} did not answer in {QUERY_TIMEOUT_S} s (is slurmctld up? scontrol ping says)"
    if done.returncode != 0:
        return None, f"{args[0]} failed: {(done.stderr or done.stdout).strip()}"
    return done.stdout, None


def cluster_problems(s) -> List[str]:
    """What sinfo says about the partition: it exists, has the nodes, GPUs and CPUs asked for."""
    if not s.partition:
        return []
    out, why = slurm_query(["sinfo", "-h", "-p", s.partition, "-o", "%D %c %G"])
    if why:
        return [why]
    lines = [l.split() for l in out.splitlines() if l.strip()]
    if not lines:
        return [f"slurm.partition={s.partition}: no such partition on this cluster (sinfo -s lists them)"]
    nodes = sum(int(l[0]) for l in lines)
    cpus = max(int(l[1].rstrip("+")) for l in lines)
    gpus = max(gpu_count(l[2]) for l in lines)
    problems = []
    if s.nodes > nodes:
        problems.append(f"slurm.nodes={s.nodes} but partition {s.partition} has {nodes} node(s)")
    if s.cpus_per_task > cpus:
        problems.append(f"slurm.cpus_per_task={s.cpus_per_task} but nodes of {s.partition} have {cpus} CPUs")
    if s.gpus_per_node > gpus:
        problems.append(f"slurm.gpus_per_node={s.gpus_per_node} but nodes of {s.partition} have {gpus} GPU(s)")
    return problems


def queued_problems(run_dir: Path) -> List[str]:
    """A queued or running job of this run reads job/ at start and at every
    requeue: rendering again would change what it trains."""
    out, why = slurm_query(["squeue", "-h", "-o", "%i %o"])
    if why:
        return [why]
    scripts = {str(run_dir / "job.sbatch"), str(run_dir.parent / "array.sbatch")}
    jobs = [line.split()[0] for line in out.splitlines() if len(line.split()) > 1 and line.split()[1] in scripts]
    if jobs:
        return [f"job(s) {', '.join(jobs)} of this run are queued or running and read {run_dir}/job at each "
                "(re)start; scancel them first, or choose name=..."]
    return []


def gpu_count(gres: str) -> int:
    """sinfo's %G: "gpu:8", "gpu:a100:4(S:0-1)", "gpu:2,shard:8" or "(null)" -> GPUs per node."""
    total = 0
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def check(cfg: DictConfig, run_dir: Path, against_cluster: bool) -> None:
    from fttrain import outputs
    from fttrain.config.checks import ConfigCheckError, check_config

    problems = []
    try:
        check_config(cfg)
    except ConfigCheckError as e:
        problems += e.problems
    problems += topology_problems(cfg)
    if against_cluster:
        problems += cluster_problems(cfg.slurm)
    if cfg.overwrite:
        problems.append(f"overwrite=true would clear {run_dir} again whenever Slurm restarts the job; remove the "
                        "directory (or choose name=...) and submit without overwrite")
    else:
        try:
            outputs.guard_run_dir(run_dir, False, cfg.resume_from)
        except outputs.RunDirError as e:
            problems.append(str(e))
    if against_cluster:
        problems += queued_problems(run_dir)
    if problems:
        raise SlurmError(f"{run_dir.name}: nothing submitted:\n" + "\n".join(f"  - {p}" for p in problems))


# ------------------------------------------------------------------ render
def template_env():
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(SBATCH_DIR)), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, trim_blocks=False)
    env.filters["shquote"] = lambda v: shlex.quote(str(v))
    return env


def job_args(overrides: List[str], run_dir: Path) -> List[str]:
    """The job's own command line: the user's overrides and its run dir."""
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in OWN_KEYS]
    # Quoted for Hydra's override grammar: sweep directory names hold '=' and ','.
    quoted = str(run_dir).replace("\\", "\\\\").replace("'", "\\'")
    return [*kept, f"hydra.run.dir='{quoted}'"]


def snapshot_conf(job_dir: Path, config_dirs: Sequence[str] = ()) -> Path:
    """fttrain's config folder and the user's (--config-dir) copied into one: the job
    composes from it alone. A user file named like a shipped one is not copied, as
    Hydra's search path would not read it either (the shipped folder comes first)."""
    dest = job_dir / "conf"
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(CONF_DIR, dest)
    for folder in config_dirs:
        for path in sorted(Path(folder).rglob("*.yaml")):
            target = dest / path.relative_to(folder)
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
    return dest


def expected_config(cfg: DictConfig, dest: Path) -> Path:
    """The resolved config the job must compose: the job's arguments differ
    from the ones cfg was composed with only in hydra.run.dir, which is not
    part of it."""
    dest.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return dest


def common_context(cfg: DictConfig) -> Dict:
    s = cfg.slurm
    ppn = processes_per_node(s)
    return {
        "s": s,
        "job_name": s.job_name or cfg.name,
        "processes_per_node": ppn,
        "python": shlex.quote(str(s.python)),
        "timeout_minutes": f'{cfg.dist.get("timeout_minutes", 30):g}',  # 30.0 -> 30
        "omp_threads": max(1, s.cpus_per_task // max(1, ppn)),
        "port_base": PORT_BASE,
        "port_span": PORT_SPAN,
    }


def render_run(overrides: List[str], cfg: DictConfig, run_dir: Path, config_dirs: Sequence[str] = ()) -> Path:
    """Write job/ and job.sbatch into the run directory; returns the script's path."""
    job_dir = run_dir / "job"
    job_dir.mkdir(parents=True, exist_ok=True)
    conf = snapshot_conf(job_dir, config_dirs)
    args = job_args(overrides, run_dir)
    expected = expected_config(cfg, job_dir / "config.yaml")
    script = run_dir / "job.sbatch"
    name = "multi_node.sbatch.j2" if cfg.slurm.nodes > 1 else "single_node.sbatch.j2"
    text = template_env().get_template(name).render(
        **common_context(cfg), run_dir=run_dir, log_dir=run_dir, log_pattern="%j", script_path=script,
        conf_snapshot=conf, expected_config=expected, run_args=" ".join(shlex.quote(a) for a in args),
        command_overrides=" ".join(shlex.quote(o) for o in overrides))
    script.write_text(text)
    return script


def render_array(overrides: List[str], trials: List[Trial], max_parallel: Optional[int],
                 config_dirs: Sequence[str] = ()) -> Path:
    cfg = trials[0].cfg
    sweep_dir = trials[0].run_dir.parent
    job_dir = sweep_dir / "job"
    job_dir.mkdir(parents=True, exist_ok=True)
    conf = snapshot_conf(job_dir, config_dirs)
    for i, t in enumerate(trials):
        args = job_args(t.overrides, t.run_dir)
        (sweep_dir / f"trial_{i}.args").write_text("".join(a + "\n" for a in args))
        expected_config(t.cfg, sweep_dir / f"trial_{i}.config.yaml")
    (sweep_dir / "run_dirs.txt").write_text("".join(f"{t.run_dir}\n" for t in trials))
    script = sweep_dir / "array.sbatch"
    text = template_env().get_template("array.sbatch.j2").render(
        **common_context(cfg), sweep_dir=sweep_dir, log_dir=sweep_dir, log_pattern="%A_%a", script_path=script,
        conf_snapshot=conf, trials=trials, max_parallel=max_parallel,
        command_overrides=" ".join(shlex.quote(o) for o in overrides))
    script.write_text(text)
    return script


# ------------------------------------------------------------------ submit
def submit(script: Path) -> str:
    done = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SlurmError(f"sbatch {script} failed (exit {done.returncode}):\n{(done.stderr or done.stdout).strip()}")
    return done.stdout.strip().split(";")[0]


def have_slurm() -> bool:
    return shutil.which("sbatch") is not None and shutil.which("sinfo") is not None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fttrain.slurm",
        description="Render (and with --submit, submit) the sbatch script for a run composed from fttrain/conf/.")
    parser.add_argument("--submit", action="store_true", help="call sbatch and print the job id")
    parser.add_argument("--array", action="store_true", help="sweep overrides (key=a,b) become a job array")
    parser.add_argument("--max-parallel", type=int, default=None, help="array: at most this many trials at once")
    parser.add_argument("--quiet", action="store_true", help="do not print the script")
    parser.add_argument("--config-dir", "-cd", action="append", default=[],
                        help="your config folder (exp/, data/, ...), copied into the job with fttrain's")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m fttrain")
    args = parser.parse_intermixed_args(argv)  # options may come after the overrides
    try:
        against_cluster = args.submit or have_slurm()
        if args.array:
            trials = expand_trials(args.overrides, args.config_dir)
            for t in trials:
                check(t.cfg, t.run_dir, against_cluster)
            script = render_array(args.overrides, trials, args.max_parallel, args.config_dir)
        else:
            if split_sweeps(args.overrides)[1]:
                raise SlurmError("sweep values (key=a,b) need --array (a job array) or python -m fttrain -m "
                                 "hydra/launcher=slurm (one job per trial)")
            cfg, run_dir = compose(args.overrides, args.config_dir)
            check(cfg, run_dir, against_cluster)
            script = render_run(args.overrides, cfg, run_dir, args.config_dir)
        if not args.quiet:
            print(script.read_text())
        print(f"fttrain.slurm: wrote {script}" + ("" if against_cluster else " (not checked against a cluster: "
                                                  "no sinfo here)"), file=sys.stderr)
        if args.submit:
            job = submit(script)
            print(f"fttrain.slurm: submitted job {job}", file=sys.stderr)
            print(job)
        return 0
    except FttrainError as e:
        return report("fttrain.slurm", e)
    except Exception as e:  # composing: unknown keys, wrong types, missing options
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        if not isinstance(e, (HydraException, OmegaConfBaseException)):
            raise
        return report("fttrain.slurm", e)


if __name__ == "__main__":
    raise SystemExit(main())

"""Multi-seed studies: ``python -m ctxseg study --methods ce contextrast:bane=false --seeds 0 1 2``.

Every (method spec, seed) is trained into ``OUT/<spec folder>/s<seed>`` (seed-major, so a study
stopped half-way already has paired results), finished runs are reused and interrupted ones
resumed; then ``OUT/summary.md`` and ``OUT/summary.json`` report, per method, the mean ± sample
std over seeds and, paired by seed against the first method, the mean difference with a 95 %
paired-t confidence interval.

The parsing, collecting and statistics below are pure functions (no training), so they can be
tested on fabricated ``eval.json`` files; ``run_study`` is the part that trains.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# The metrics of the tables (fractions in [0, 1]); the weakly supervised ones when eval.json has them.
METRICS = ("miou", "boundary_iou", "pixel_acc")
WSSS_METRICS = ("cam_miou", "pseudo_miou", "cls_map")
LABELS = {"miou": "mIoU", "boundary_iou": "boundary IoU", "pixel_acc": "pixel acc",
          "cam_miou": "CAM mIoU", "pseudo_miou": "pseudo mIoU",
          "cls_map": "class AP"}
# Settings the study sets per run: a method spec or --set may not carry them.
RESERVED = ("method", "seed", "out")
# A config key that may differ between a run folder and the study asking for it, beyond the
# runtime keys every reuse ignores (ctxseg.runs.REUSE_IGNORED): the split it is evaluated on (a
# finished run is evaluated on another split, not retrained).
STUDY_IGNORED = ("eval_split",)
LEVEL = 0.95
CI_METHOD = (
    "paired t over seeds: for each seed both runs finished, d = metric(method) - metric(baseline); "
    "95 % CI = mean(d) ± t(0.975, n-1) · sd(d) / √n (Student t quantile from scipy.stats.t, "
    "sd with ddof = 1)"
)
NOISE = "interval includes 0: not distinguishable from seed noise"
NO_INTERVAL = "fewer than 2 paired seeds: no interval can be computed"


class RunsFailed(RuntimeError):
    """Runs of a study broke; the others finished and are summarized (``run_study``)."""


# ------------------------------------------------------------------------------------------------
# Method specs: ``name`` or ``name:key=value,key=value`` (values read as YAML, as --set reads them).
@dataclass(frozen=True)
class MethodSpec:
    """One entry of ``--methods``: ``spec`` as written (its label in the tables), the method
    ``name``, its ``settings`` and the filesystem-safe ``folder`` its runs go in."""

    spec: str
    name: str
    settings: dict[str, Any] = field(default_factory=dict)
    folder: str = ""


# A comma starts a new setting only when "key=" follows, so list values (crop=[64,64]) stay whole.
_NEXT_SETTING = re.compile(r",(?=\s*[A-Za-z_][A-Za-z0-9_]*\s*=)")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.=+-]+")


def parse_method_spec(spec: str) -> MethodSpec:
    """Parse ``name[:key=value,...]``; an unknown method or a malformed setting is a ValueError.

    The settings are not checked against the method's config here (``apply_overrides`` does
    that, naming the valid keys)."""
    from ctxseg.methods import METHODS

    name, sep, rest = spec.partition(":")
    name = name.strip()
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r} in method spec {spec!r}; choose one of {sorted(METHODS)}")
    items = [item.strip() for item in _NEXT_SETTING.split(rest)] if rest.strip() else []
    if sep and not items:
        raise ValueError(f"method spec {spec!r} has nothing after ':'; write METHOD:KEY=VALUE[,KEY=VALUE...]")
    settings: dict[str, Any] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"method spec {spec!r}: expected KEY=VALUE, got {item!r}")
        if key in settings:
            raise ValueError(f"method spec {spec!r} sets {key!r} twice")
        try:
            settings[key] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise ValueError(f"method spec {spec!r}: the value of {key!r} is not valid YAML: {raw!r}") from None
    folder = "-".join([name, *(_UNSAFE.sub("_", re.sub(r"[\s\[\](){}'\"]", "", item).replace(",", "_"))
                               for item in items)])
    return MethodSpec(spec, name, settings, folder)


def parse_method_specs(specs: Sequence[str]) -> list[MethodSpec]:
    """Parse every spec; the same spec twice, or two specs with one folder, is an error."""
    parsed = [parse_method_spec(s) for s in specs]
    seen: dict[str, str] = {}
    for p in parsed:
        if p.folder in seen:
            other = seen[p.folder]
            what = "is given twice" if other == p.spec else f"and {other!r} share the folder {p.folder!r}"
            raise ValueError(f"method spec {p.spec!r} {what}")
        seen[p.folder] = p.spec
    return parsed


def run_dir(out: str | Path, spec: MethodSpec, seed: int) -> Path:
    return Path(out) / spec.folder / f"s{seed}"


# ------------------------------------------------------------------------------------------------
# The plan: one resolved config per (seed, spec), seed-major; every folder checked before training.
@dataclass(frozen=True)
class Run:
    spec: MethodSpec
    seed: int
    cfg: Any  # TrainConfig

    @property
    def dir(self) -> Path:
        return Path(self.cfg.out)


def plan_runs(specs: Sequence[MethodSpec], seeds: Sequence[int], out: str | Path,
              resolve: Callable[[MethodSpec], Any], eval_split: str | None = None) -> list[Run]:
    """Resolve and validate every run's config (``resolve(spec)`` gives the spec's config from
    the train flags, --set and the spec's settings), seed-major. Raises before anything runs."""
    from ctxseg.config import apply_overrides

    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds lists a seed twice: {list(seeds)}")
    if not seeds or not specs:
        raise ValueError("a study needs at least one method and one seed")
    base = {}
    for spec in specs:
        reserved = sorted(set(spec.settings) & set(RESERVED))
        if reserved:
            raise ValueError(f"method spec {spec.spec!r} sets {reserved}; the study sets method, seed and out per run")
        base[spec.spec] = resolve(spec)
    runs = []
    for seed in seeds:
        for spec in specs:
            over = {"seed": seed, "out": str(run_dir(out, spec, seed))}
            if eval_split:
                over["eval_split"] = eval_split
            runs.append(Run(spec, seed, apply_overrides(base[spec.spec], over, "study").validate()))
    splits = sorted({r.cfg.eval_split for r in runs})
    if len(splits) > 1:
        raise ValueError(f"the runs would be evaluated on different splits {splits}; choose one with --eval-split")
    return runs


def check_run_folders(runs: Sequence[Run]) -> None:
    """Refuse to reuse or resume a run folder made with other settings, by the rule demo and the
    notebooks use (``ctxseg.runs.reusable_state``; the study also lets ``eval_split`` differ)."""
    from ctxseg.runs import reusable_state

    for run in runs:
        reusable_state(run.dir, run.cfg, ignore=STUDY_IGNORED)


def run_state(path: str | Path) -> str:
    """``finished``, ``started`` or ``new`` (``ctxseg.runs.run_state``)."""
    from ctxseg.runs import run_state as state

    return state(path)


# ------------------------------------------------------------------------------------------------
# Collecting finished runs.
def eval_file(path: str | Path, split: str) -> Path | None:
    """The evaluation of run folder ``path`` on ``split``: its eval.json when the run was
    evaluated on ``split``, else ``eval-<split>.json`` if written, else None."""
    path = Path(path)
    main = path / "eval.json"
    if not main.is_file():
        return None
    result = json.loads(main.read_text())
    if result.get("split", _saved_split(path)) == split:
        return main
    other = path / f"eval-{split}.json"
    return other if other.is_file() else None


def _saved_split(path: Path) -> str | None:
    try:
        return (yaml.safe_load((path / "config.yaml").read_text()) or {}).get("eval_split")
    except (OSError, yaml.YAMLError):
        return None


def _finite(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def metrics_row(result: dict) -> dict[str, Any]:
    """The numbers a study reports from one evaluation (eval.json or ``ctxseg eval``'s output)."""
    row = {m: _finite(result.get(m)) for m in METRICS}
    row["per_class_iou"] = {k: _finite(v) for k, v in (result.get("per_class_iou") or {}).items()}
    if isinstance(result.get("wsss"), dict):
        row.update({m: _finite(result["wsss"].get(m)) for m in WSSS_METRICS})
    return row


def logged_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a run folder's metrics.jsonl (none without one); a line that is not JSON (a run
    killed mid-write) is skipped."""
    log = Path(path) / "metrics.jsonl"
    rows = []
    if log.is_file():
        for line in log.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def run_time(path: str | Path, rows: Sequence[dict] | None = None) -> dict[str, Any]:
    """Training time of a run: ``steps`` and median ``sec_per_iter`` of its metrics.jsonl rows
    (``rows``, if already read), and ``wall_s``, the wall time the study measured
    (study_time.json), where available."""
    path = Path(path)
    rates, steps = [], None
    for row in logged_rows(path) if rows is None else rows:
        if "sec_per_iter" in row:
            rates.append(row["sec_per_iter"])
            steps = row.get("step", steps)
    wall = None
    if (path / "study_time.json").is_file():
        wall = json.loads((path / "study_time.json").read_text()).get("seconds")
    return {"steps": steps, "sec_per_iter": statistics.median(rates) if rates else None, "wall_s": wall}


def evaluations(rows: Sequence[dict], split: str) -> list[dict[str, Any]]:
    """The evaluations on ``split`` among a run's metrics.jsonl ``rows`` (``eval_every``; the last
    is the final one): ``step`` and the metrics of ``METRICS`` of each, in step order, one per step."""
    found = {}
    for row in rows:
        if row.get("split") == split and "step" in row and row.get("miou") is not None:
            found[row["step"]] = {"step": row["step"], **{m: _finite(row.get(m)) for m in METRICS}}
    return [found[s] for s in sorted(found)]


def collect_results(out: str | Path, specs: Sequence[MethodSpec], seeds: Sequence[int], split: str):
    """({spec: {seed: metrics row + "time" + "during"}} of the runs evaluated on ``split``, [missing
    runs]); ``during``: the run's ``evaluations`` on ``split``."""
    rows: dict[str, dict[int, dict]] = {s.spec: {} for s in specs}
    missing = []
    for seed in seeds:
        for spec in specs:
            path = run_dir(out, spec, seed)
            found = eval_file(path, split)
            if found is None:
                state = run_state(path)
                why = {"new": "not started", "started": "not finished",
                       "finished": f"not evaluated on {split!r}"}[state]
                missing.append({"method": spec.spec, "seed": seed, "folder": str(path), "state": why})
                continue
            row = metrics_row(json.loads(found.read_text()))
            logged = logged_rows(path)
            row["time"] = run_time(path, logged)
            row["during"] = evaluations(logged, split)
            rows[spec.spec][seed] = row
    return rows, missing


# ------------------------------------------------------------------------------------------------
# Statistics.
def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof = 1; None for fewer than 2 values)."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def paired_interval(diffs: Sequence[float], level: float = LEVEL) -> dict[str, Any]:
    """Mean of paired differences with a ``level`` paired-t interval over them.

    ``ci_low``/``ci_high``/``includes_zero`` are None for fewer than 2 differences."""
    from scipy.stats import t

    n = len(diffs)
    out = {"n": n, "mean": statistics.fmean(diffs) if n else None, "sd": None, "t": None,
           "ci_low": None, "ci_high": None, "includes_zero": None, "n_improved": sum(d > 0 for d in diffs)}
    if n >= 2:
        sd = statistics.stdev(diffs)
        q = float(t.ppf(0.5 + level / 2, n - 1))
        half = q * sd / math.sqrt(n)
        out.update(sd=sd, t=q, ci_low=out["mean"] - half, ci_high=out["mean"] + half)
        out["includes_zero"] = out["ci_low"] <= 0 <= out["ci_high"]
    return out


def paired_by_step(a: dict[int, dict], b: dict[int, dict], seeds: Sequence[int]) -> list[dict[str, Any]]:
    """The paired differences of ``a`` against ``b`` (rows of ``collect_results``) at every step
    where both evaluated during training: per step, ``paired_interval`` of mIoU and boundary IoU
    over the seeds with both values. A curve of the difference against training length, within
    the runs' schedule (the learning rate has not decayed at an intermediate step as it has at
    the end of a run that long)."""
    def by_step(rows):
        return {s: {e["step"]: e for e in rows[s].get("during", [])} for s in seeds if s in rows}

    ea, eb = by_step(a), by_step(b)
    steps = sorted({step for evals in ea.values() for step in evals})
    curve = []
    for step in steps:
        entry = {"step": step}
        for m in ("miou", "boundary_iou"):
            pairs = [(ea[s][step].get(m), eb[s][step].get(m)) for s in seeds
                     if step in ea.get(s, {}) and step in eb.get(s, {})]
            entry[m] = paired_interval([va - vb for va, vb in pairs if va is not None and vb is not None])
        if entry["miou"]["n"]:
            curve.append(entry)
    return curve


def summarize(rows: dict[str, dict[int, dict]], specs: Sequence[MethodSpec], seeds: Sequence[int], split: str,
              missing: Sequence[dict] = (), argv: Sequence[str] | None = None, out: str | Path | None = None) -> dict:
    """The study's summary (what summary.json holds) from ``collect_results``' rows."""
    metrics = list(METRICS)
    if any(m in row and row[m] is not None for r in rows.values() for row in r.values() for m in WSSS_METRICS):
        metrics += WSSS_METRICS
    methods = {}
    for spec in specs:
        runs = rows.get(spec.spec, {})
        done = [s for s in seeds if s in runs]
        classes: list[str] = []
        for s in done:
            classes += [c for c in runs[s]["per_class_iou"] if c not in classes]
        entry = {"method": spec.name, "settings": spec.settings, "folder": spec.folder, "seeds": done,
                 "per_seed": {str(s): runs[s] for s in done}, "mean": {}, "std": {}, "per_class": {}}
        for m in metrics:
            entry["mean"][m], entry["std"][m] = mean_std([runs[s].get(m) for s in done])
        for c in classes:
            vals = [runs[s]["per_class_iou"].get(c) for s in done]
            mean, std = mean_std(vals)
            entry["per_class"][c] = {"mean": mean, "std": std, "n": sum(v is not None for v in vals)}
        methods[spec.spec] = entry
    baseline = specs[0].spec if specs else None
    paired = {}
    for spec in specs[1:]:
        a, b = rows.get(spec.spec, {}), rows.get(baseline, {})
        paired[spec.spec] = {"vs": baseline}
        for m in metrics:
            both = [s for s in seeds if s in a and s in b and a[s].get(m) is not None and b[s].get(m) is not None]
            diffs = [a[s][m] - b[s][m] for s in both]
            paired[spec.spec][m] = {"seeds": both, "diffs": diffs, **paired_interval(diffs)}
        paired[spec.spec]["by_step"] = paired_by_step(a, b, seeds)
    return {
        "command": "python -m ctxseg " + shlex.join(argv) if argv is not None else None,
        "argv": list(argv) if argv is not None else None,
        "out": str(out) if out is not None else None,
        "eval_split": split,
        "seeds": list(seeds),
        "metrics": metrics,
        "std": "sample standard deviation over seeds (ddof = 1)",
        "ci_method": CI_METHOD,
        "ci_level": LEVEL,
        "baseline": baseline,
        "methods": methods,
        "paired": paired,
        "missing": list(missing),
    }


# ------------------------------------------------------------------------------------------------
# Rendering.
def fmt_mean_std(mean, std) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.4f} ± {std:.4f}" if std is not None else f"{mean:.4f} ± n/a"


def _delta(p: dict) -> str:
    if p["n"] == 0:
        return "n/a (no paired seeds)"
    if p["ci_low"] is None:
        return f"{p['mean']:+.4f} [no interval, n = {p['n']}]"
    return f"{p['mean']:+.4f} [{p['ci_low']:+.4f}, {p['ci_high']:+.4f}]"


def reading(p: dict, baseline: str) -> str:
    """Plain words for one paired interval."""
    if p["n"] < 2:
        return NO_INTERVAL
    if p["includes_zero"]:
        return NOISE
    return f"{'higher' if p['ci_low'] > 0 else 'lower'} than {baseline} (interval excludes 0)"


def _cell(s: str) -> str:
    return s.replace("|", "\\|")


def render_markdown(summary: dict) -> str:
    """summary.md: the command, the results table, per-class IoU, the paired differences against
    the first method (with the method of the interval stated) and training times."""
    metrics, methods, base = summary["metrics"], summary["methods"], summary["baseline"]
    lines = [f"# Study: {summary['out'] or ''}".rstrip(), ""]
    if summary.get("command"):
        lines += ["Command:", "", f"    {summary['command']}", ""]
    seeds = " ".join(map(str, summary["seeds"]))
    lines += [f"Evaluated on split `{summary['eval_split']}`; seeds asked: {seeds}. Values are fractions "
              "(1 = perfect); `mean ± std` is the mean over seeds ± the sample standard deviation "
              "(ddof = 1; n/a with one seed).", ""]

    lines += ["## Results", ""]
    head = ["method", "seeds"] + [LABELS[m] for m in metrics]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for spec, e in methods.items():
        cells = [f"`{_cell(spec)}`", str(len(e["seeds"]))] + [fmt_mean_std(e["mean"][m], e["std"][m]) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")

    classes: list[str] = []
    for e in methods.values():
        classes += [c for c in e["per_class"] if c not in classes]
    if classes:
        lines += ["## Per-class IoU (mean ± std over seeds)", ""]
        head = ["class"] + [f"`{_cell(s)}`" for s in methods]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for c in classes:
            cells = [_cell(c)]
            for e in methods.values():
                pc = e["per_class"].get(c)
                cells.append(fmt_mean_std(pc["mean"], pc["std"]) if pc else "n/a")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")

    lines += [f"## Paired differences against `{_cell(base or '')}`", ""]
    if not summary["paired"]:
        lines += ["Only one method: nothing to compare.", ""]
    else:
        lines += [f"Method: {CI_METHOD}. An interval that includes 0 means the difference is not "
                  "distinguishable from seed-to-seed noise; with fewer than 2 paired seeds no interval can "
                  "be computed. \"seeds improved\": seeds where the method's mIoU is higher than the baseline's.",
                  ""]
        head = ["method", "Δ mIoU [95 % CI]", "Δ boundary IoU [95 % CI]", "seeds improved (mIoU)", "reading"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for spec, p in summary["paired"].items():
            mi, bi = p["miou"], p["boundary_iou"]
            words = f"mIoU: {reading(mi, base)}"
            if bi["n"] >= 2 or mi["n"] >= 2:
                words += f"; boundary IoU: {reading(bi, base)}"
            cells = [f"`{_cell(spec)}`", _delta(mi), _delta(bi), f"{mi['n_improved']}/{mi['n']}", _cell(words)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")

    curves = {spec: p["by_step"] for spec, p in summary["paired"].items() if len(p.get("by_step", [])) > 1}
    if curves:
        lines += [f"## Paired differences against `{_cell(base or '')}` during training", "",
                  "At every step where the runs evaluated on this split (`eval_every`), the same paired "
                  "interval over seeds; an intermediate step is within the runs' schedule (its learning rate "
                  "has not decayed as at the end of a run that long). Figure: differences.png.", ""]
        head = ["method", "step", "Δ mIoU [95 % CI]", "Δ boundary IoU [95 % CI]"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for spec, curve in curves.items():
            for e in curve:
                lines.append(f"| `{_cell(spec)}` | {e['step']} | {_delta(e['miou'])} | {_delta(e['boundary_iou'])} |")
        lines.append("")

    lines += ["## Training time", "", "s/iter: median of the run's metrics.jsonl rows; wall time: measured by "
              "the study (all sessions of a resumed run; n/a for runs it did not train).", ""]
    head = ["method", "seed", "steps", "s/iter", "wall time (s)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for spec, e in methods.items():
        for s in e["seeds"]:
            t = e["per_seed"][str(s)].get("time") or {}
            cells = [f"`{_cell(spec)}`", str(s), str(t.get("steps") if t.get("steps") is not None else "n/a"),
                     f"{t['sec_per_iter']:.3f}" if t.get("sec_per_iter") is not None else "n/a",
                     f"{t['wall_s']:.0f}" if t.get("wall_s") is not None else "n/a"]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")

    if summary["missing"]:
        lines += ["## Missing runs", "", "Not in the tables above:", ""]
        lines += [f"- `{m['method']}` seed {m['seed']}: {m['folder']} ({m['state']})" for m in summary["missing"]]
        lines.append("")
    return "\n".join(lines)


def write_summary(out: str | Path, summary: dict) -> tuple[Path, Path]:
    """Write OUT/summary.json and OUT/summary.md (each replaced atomically), and
    OUT/differences.png where a method has paired differences at two or more steps."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "summary.json", out / "summary.md"
    for path, text in zip(paths, (json.dumps(summary, indent=2, allow_nan=False) + "\n", render_markdown(summary))):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    curves = {spec: p["by_step"] for spec, p in summary["paired"].items() if len(p.get("by_step", [])) > 1}
    if curves:
        from ctxseg.viz.curves import plot_paired_differences

        tmp = out / ".differences.png.tmp"
        plot_paired_differences(curves, baseline=summary["baseline"]).savefig(tmp, format="png", dpi=110)
        tmp.replace(out / "differences.png")
    return paths


# ------------------------------------------------------------------------------------------------
# Running a study.
def record_time(path: str | Path, action: str, seconds: float) -> None:
    """Add one training session's wall time to the run folder's study_time.json."""
    file = Path(path) / "study_time.json"
    data = json.loads(file.read_text()) if file.is_file() else {"sessions": []}
    data["sessions"].append({"action": action, "seconds": seconds})
    data["seconds"] = sum(s["seconds"] for s in data["sessions"])
    file.write_text(json.dumps(data, indent=2))


def evaluate_on_split(path: str | Path, split: str, evaluator: Callable[[Path, str], dict]) -> Path:
    """Evaluate a finished run on ``split`` with ``evaluator`` and store it as eval-<split>.json."""
    path = Path(path)
    result = evaluator(path, split)
    file = path / f"eval-{split}.json"
    tmp = file.with_name(f".{file.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(file)
    return file


def _timed_job(train: Callable[[Any], None], cfg, threads: int) -> float:
    """One training in a worker process of a parallel study: ``threads`` torch threads; its wall
    time in seconds."""
    import torch

    torch.set_num_threads(threads)
    start = time.perf_counter()
    train(cfg)
    return time.perf_counter() - start


def job_resources(jobs: int, threads: int | None = None, cpus: int | None = None) -> tuple[int, int]:
    """(torch threads, DataLoader workers) for each of ``jobs`` concurrent trainings: the CPUs
    divided among them (``threads`` when given), and ``default_num_workers`` as if the jobs were
    processes of one torchrun."""
    from ctxseg.engine.distributed import available_cpus, default_num_workers

    cpus = available_cpus() if cpus is None else cpus
    return threads or max(1, cpus // jobs), default_num_workers(cpus, local_world_size=jobs)


def _train_all(todo: Sequence[tuple[Run, str]], train: Callable[[Any], None], jobs: int, threads: int | None,
               log) -> list[str]:
    """Train ``todo`` ((run, verb) pairs), ``jobs`` at a time in fresh worker processes when
    ``jobs`` > 1 (``train`` must then be picklable: a module-level function or a partial of one),
    each with ``threads`` torch threads (one at a time: this process's count when None).
    A run that breaks does not stop the others: its traceback is logged and it is returned, one
    line per failed run. An input error (``INPUT_ERRORS``) is raised as it is, and no run is
    started after it."""
    from ctxseg.runs import INPUT_ERRORS

    failed = []

    def broke(run, e):
        log(f"{run.spec.spec} seed {run.seed}: failed:\n" + "".join(traceback.format_exception(e)).rstrip(), flush=True)
        failed.append(f"{run.spec.spec} seed {run.seed}: {type(e).__name__}: {e}")

    if jobs <= 1:
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(threads or before)  # --threads holds one at a time too
        try:
            for run, verb in todo:
                start = time.perf_counter()
                try:
                    train(run.cfg)
                except INPUT_ERRORS:
                    raise
                except Exception as e:  # noqa: BLE001 -- reported with the run it belongs to
                    broke(run, e)
                    continue
                record_time(run.dir, verb, time.perf_counter() - start)
        finally:
            torch.set_num_threads(before)
        return failed
    import dataclasses
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    n_threads, n_workers = job_resources(jobs, threads)
    log(f"{len(todo)} run(s) to train, {jobs} at a time, {n_threads} torch thread(s) each", flush=True)
    # spawn: a fresh interpreter per run (no forked OpenMP state, memory returned after each run).
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1) as pool:
        futures = {}
        for run, verb in todo:
            cfg = run.cfg
            if cfg.num_workers is None:  # a runtime key: the run's results do not depend on it
                cfg = dataclasses.replace(cfg, num_workers=n_workers)
            futures[pool.submit(_timed_job, train, cfg, n_threads)] = (run, verb)
        for future in as_completed(futures):
            run, verb = futures[future]
            try:
                seconds = future.result()
            except INPUT_ERRORS:
                pool.shutdown(cancel_futures=True)  # the runs not yet started; the started ones end
                raise
            except Exception as e:  # noqa: BLE001 -- reported with the run it belongs to
                broke(run, e)
                continue
            record_time(run.dir, verb, seconds)
            log(f"{run.spec.spec} seed {run.seed}: trained in {seconds:.0f} s -> {run.dir}", flush=True)
    return failed


def run_study(runs: Sequence[Run], specs: Sequence[MethodSpec], seeds: Sequence[int], out: str | Path,
              split: str, *, train: Callable[[Any], None], evaluator: Callable[[Path, str], dict],
              summarize_only: bool = False, argv: Sequence[str] | None = None, log=print, jobs: int = 1,
              threads: int | None = None) -> dict:
    """Train (or reuse, or resume) every run in order, evaluate finished runs on ``split`` where
    they were evaluated on another, then write the summary. ``train(cfg)`` trains one run,
    resuming from its newest checkpoint; ``evaluator(run folder, split)`` returns the metrics.
    ``jobs`` > 1 trains that many runs at once, each in its own process with ``threads`` torch
    threads (default: the CPUs divided among the jobs; see ``_train_all``).

    A run that breaks (a diverged loss, out of memory, ...) does not stop the others: the finished
    runs are evaluated and summarized, then ``RunsFailed`` names every failed run, and the next
    call resumes them. An input error (``ctxseg.runs.INPUT_ERRORS``: a bad setting, data file or
    checkpoint, which every run would hit) stops the study at once with its own message."""
    check_run_folders(runs)
    failed, tried = [], 0
    if not summarize_only:
        todo = []
        for k, run in enumerate(runs, 1):
            state = run_state(run.dir)
            verb = {"finished": "reusing", "started": "resuming", "new": "training"}[state]
            log(f"[{k}/{len(runs)}] {run.spec.spec} seed {run.seed}: {verb} -> {run.dir}", flush=True)
            if state != "finished":
                tried += 1
                if jobs <= 1:  # one at a time, as listed
                    failed += _train_all([(run, verb)], train, 1, threads, log)
                else:
                    todo.append((run, verb))
        if todo:
            failed += _train_all(todo, train, jobs, threads, log)
    for run in runs:
        if run_state(run.dir) == "finished" and eval_file(run.dir, split) is None:
            log(f"{run.spec.spec} seed {run.seed}: evaluating on split {split!r} -> {run.dir / f'eval-{split}.json'}",
                flush=True)
            evaluate_on_split(run.dir, split, evaluator)
    rows, missing = collect_results(out, specs, seeds, split)
    summary = summarize(rows, specs, seeds, split, missing, argv, out)
    write_summary(out, summary)
    if failed:
        raise RunsFailed(f"{len(failed)} of {tried} run(s) failed (the finished ones are kept and summarized in "
                         f"{Path(out) / 'summary.md'}; run the study again to resume the others): " + "; ".join(failed))
    return summary

"""``python -m ctxseg study``: method specs, the summary's statistics against a hand computation
on fabricated eval.json files, and a tiny real study that is reused, resumed and checked."""

import json
import math
import shutil

import pytest

from ctxseg.cli import main
from ctxseg.study import (
    NO_INTERVAL,
    NOISE,
    collect_results,
    job_resources,
    paired_interval,
    parse_method_spec,
    parse_method_specs,
    reading,
    render_markdown,
    summarize,
)

T_2DOF = 4.302652729911275  # t quantile 0.975 with 2 degrees of freedom


def write_eval(out, folder, seed, miou, biou, acc, per_class, split="val", wsss=None):
    run = out / folder / f"s{seed}"
    run.mkdir(parents=True)
    result = {"miou": miou, "boundary_iou": biou, "pixel_acc": acc, "per_class_iou": per_class, "split": split}
    if wsss:
        result["wsss"] = wsss
    (run / "eval.json").write_text(json.dumps(result))
    return run


def summary_of(out, specs, seeds, split="val"):
    parsed = parse_method_specs(specs)
    rows, missing = collect_results(out, parsed, seeds, split)
    summary = summarize(rows, parsed, seeds, split, missing, argv=["study", "--methods", *specs], out=out)
    json.dumps(summary, allow_nan=False)  # summary.json is strict JSON
    return summary, render_markdown(summary)


# ------------------------------------------------------------------------------------------------
def test_method_specs_parse_settings_as_yaml_into_readable_folders():
    s = parse_method_spec("contextrast:bane=false,bane_ratio=0.3")
    assert (s.name, s.settings, s.folder) == ("contextrast", {"bane": False, "bane_ratio": 0.3},
                                              "contextrast-bane=false-bane_ratio=0.3")
    assert parse_method_spec("ce").folder == "ce" and parse_method_spec("ce").settings == {}
    lists = parse_method_spec("ce:crop=[64, 96],lr=0.02")  # a comma inside a value stays in it
    assert lists.settings == {"crop": [64, 96], "lr": 0.02} and lists.folder == "ce-crop=64_96-lr=0.02"
    for bad, match in [("nope", "unknown method 'nope'"), ("ce:", "nothing after"), ("ce:lr", "KEY=VALUE"),
                       ("ce:crop=[1,", "not valid YAML"), ("ce:lr=1,lr=2", "twice")]:
        with pytest.raises(ValueError, match=match):
            parse_method_spec(bad)
    with pytest.raises(ValueError, match="given twice"):
        parse_method_specs(["ce", "ce"])


def test_summary_matches_a_hand_computation(tmp_path):
    out = tmp_path / "study"
    base = {0: (0.50, 0.30, 0.80, 0.1), 1: (0.52, 0.40, 0.82, None), 2: (0.54, 0.35, 0.84, 0.3)}
    other = {0: (0.53, 0.32, 0.81, 0.2), 1: (0.56, 0.36, 0.83, 0.2), 2: (0.56, 0.41, 0.85, 0.5)}
    for seed in range(3):
        m, b, a, bird = base[seed]
        write_eval(out, "ce", seed, m, b, a, {"sky": 0.9, "bird": bird})
        m, b, a, bird = other[seed]
        write_eval(out, "contextrast-bane=false", seed, m, b, a, {"sky": 0.9, "bird": bird})
    summary, md = summary_of(out, ["ce", "contextrast:bane=false"], [0, 1, 2])

    ce, ctx = summary["methods"]["ce"], summary["methods"]["contextrast:bane=false"]
    # ce mIoU 0.50, 0.52, 0.54: mean 0.52; deviations -0.02, 0, 0.02 -> var (0.0004 + 0.0004) / 2.
    assert ce["seeds"] == [0, 1, 2]
    assert ce["mean"]["miou"] == pytest.approx(0.52) and ce["std"]["miou"] == pytest.approx(0.02)
    # boundary 0.30, 0.40, 0.35: mean 0.35, deviations -0.05, 0.05, 0 -> var 0.005 / 2 = 0.0025.
    assert ce["mean"]["boundary_iou"] == pytest.approx(0.35) and ce["std"]["boundary_iou"] == pytest.approx(0.05)
    # ctx mIoU 0.53, 0.56, 0.56: mean 0.55, deviations -0.02, 0.01, 0.01 -> var 0.0006 / 2.
    assert ctx["mean"]["miou"] == pytest.approx(0.55) and ctx["std"]["miou"] == pytest.approx(math.sqrt(0.0003))
    # bird: 0.1 and 0.3 (seed 1 undefined): mean 0.2, var (0.01 + 0.01) / 1.
    assert ce["per_class"]["bird"] == pytest.approx({"mean": 0.2, "std": math.sqrt(0.02), "n": 2})
    assert ctx["per_class"]["bird"]["mean"] == pytest.approx(0.3) and ce["per_class"]["sky"]["std"] == 0
    assert ce["per_seed"]["1"]["miou"] == 0.52

    p = summary["paired"]["contextrast:bane=false"]
    assert p["vs"] == "ce"
    # mIoU diffs 0.03, 0.04, 0.02: mean 0.03, sd sqrt((0 + 0.0001 + 0.0001) / 2) = 0.01.
    half = T_2DOF * 0.01 / math.sqrt(3)
    mi = p["miou"]
    assert mi["diffs"] == pytest.approx([0.03, 0.04, 0.02]) and mi["n"] == 3 and mi["n_improved"] == 3
    assert mi["mean"] == pytest.approx(0.03)
    assert mi["ci_low"] == pytest.approx(0.03 - half, rel=1e-9)
    assert mi["ci_high"] == pytest.approx(0.03 + half, rel=1e-9)
    assert mi["includes_zero"] is False
    # boundary diffs 0.02, -0.04, 0.06: mean 0.04 / 3; deviations 0.02/3, -0.16/3, 0.14/3.
    bi = p["boundary_iou"]
    mean_b = 0.04 / 3
    sd_b = math.sqrt(((0.02 / 3) ** 2 + (0.16 / 3) ** 2 + (0.14 / 3) ** 2) / 2)
    assert bi["mean"] == pytest.approx(mean_b) and bi["n_improved"] == 2
    assert bi["ci_low"] == pytest.approx(mean_b - T_2DOF * sd_b / math.sqrt(3), rel=1e-9)
    assert bi["ci_high"] == pytest.approx(mean_b + T_2DOF * sd_b / math.sqrt(3), rel=1e-9)
    assert bi["includes_zero"] is True

    # The markdown tables: mean ± std, and Δ [CI] with a reading of each interval.
    assert "| `ce` | 3 | 0.5200 ± 0.0200 | 0.3500 ± 0.0500 | 0.8200 ± 0.0200 |" in md
    assert f"| `contextrast:bane=false` | 3 | 0.5500 ± {math.sqrt(0.0003):.4f} |" in md
    assert f"| bird | 0.2000 ± {math.sqrt(0.02):.4f} |" in md
    row = next(line for line in md.splitlines() if line.startswith("| `contextrast:bane=false` | +"))
    assert f"+0.0300 [{0.03 - half:+.4f}, {0.03 + half:+.4f}]" in row
    assert f"{mean_b:+.4f} [{mean_b - T_2DOF * sd_b / 3 ** 0.5:+.4f}, {mean_b + T_2DOF * sd_b / 3 ** 0.5:+.4f}]" in row
    assert "| 3/3 |" in row
    assert "mIoU: higher than ce (interval excludes 0)" in row and f"boundary IoU: {NOISE}" in row
    assert "paired t over seeds" in md and "scipy.stats.t" in md and "ddof = 1" in md
    assert md.splitlines()[4].strip() == "python -m ctxseg study --methods ce contextrast:bane=false"
    assert summary["argv"] == ["study", "--methods", "ce", "contextrast:bane=false"]


def test_interval_including_zero_is_reported_as_noise_and_one_excluding_it_is_not():
    noisy = paired_interval([0.05, -0.04, 0.01])
    assert noisy["ci_low"] < 0 < noisy["ci_high"] and noisy["includes_zero"] is True
    clear = paired_interval([-0.03, -0.04, -0.02])
    assert clear["ci_high"] < 0 and clear["includes_zero"] is False
    assert paired_interval([0.01])["includes_zero"] is None and paired_interval([0.01])["ci_low"] is None


def test_fewer_than_two_paired_seeds_says_no_interval_and_lists_missing_runs(tmp_path):
    out = tmp_path / "study"
    for seed in (0, 1):
        write_eval(out, "ce", seed, 0.5 + seed / 100, 0.3, 0.8, {"sky": 0.9})
    write_eval(out, "pixel_contrast", 0, 0.6, 0.4, 0.9, {"sky": 0.9})
    summary, md = summary_of(out, ["ce", "pixel_contrast"], [0, 1])
    p = summary["paired"]["pixel_contrast"]["miou"]
    assert p["n"] == 1 and p["ci_low"] is None and p["includes_zero"] is None
    assert summary["methods"]["pixel_contrast"]["std"]["miou"] is None
    row = next(line for line in md.splitlines() if line.startswith("| `pixel_contrast` | +"))
    assert "+0.1000 [no interval, n = 1]" in row and NO_INTERVAL in row and NOISE not in row
    assert summary["missing"] == [{"method": "pixel_contrast", "seed": 1, "folder": str(out / "pixel_contrast" / "s1"),
                                   "state": "not started"}]
    assert "## Missing runs" in md and "`pixel_contrast` seed 1" in md


def test_weakly_supervised_runs_add_cam_and_pseudo_columns_and_other_splits_are_read(tmp_path):
    out = tmp_path / "study"
    for seed in (0, 1):
        write_eval(out, "wsss_cam", seed, 0.4, 0.2, 0.7, {"sky": 0.9},
                   wsss={"cam_miou": 0.3 + seed / 10, "pseudo_miou": 0.35, "cls_map": 0.9, "seg_miou": 0.4})
    # Seed 1 was evaluated on val; its test evaluation is in eval-test.json.
    (out / "wsss_cam" / "s1" / "eval-test.json").write_text(json.dumps(
        {"miou": 0.1, "boundary_iou": 0.1, "pixel_acc": 0.1, "per_class_iou": {}, "split": "test"}))
    summary, md = summary_of(out, ["wsss_cam"], [0, 1])
    assert summary["metrics"] == ["miou", "boundary_iou", "pixel_acc", "cam_miou", "pseudo_miou", "cls_map"]
    assert summary["methods"]["wsss_cam"]["mean"]["cam_miou"] == pytest.approx(0.35)
    assert "| method | seeds | mIoU | boundary IoU | pixel acc | CAM mIoU | pseudo mIoU | class AP |" in md
    assert "nothing to compare" in md
    test_summary, _ = summary_of(out, ["wsss_cam"], [0, 1], split="test")
    assert test_summary["methods"]["wsss_cam"]["seeds"] == [1]
    assert test_summary["missing"][0]["state"] == "not evaluated on 'test'"


# ------------------------------------------------------------------------------------------------
# Command line: errors before training.
def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize(("extra", "needle"), [
    (["--methods", "ce", "nope"], "unknown method 'nope'"),
    (["--methods", "ce", "contextrast:bogus=1"], "unknown setting(s) ['bogus'] in method spec 'contextrast:bogus=1'"),
    (["--methods", "ce", "contextrast:bane=maybe"],
     "method spec 'contextrast:bane=maybe': setting 'bane': expected bool"),
    (["--methods", "ce", "--set", "bogus=1"], "unknown setting(s) ['bogus'] in --set"),
    (["--methods", "ce", "--set", "lr=abc"], "setting 'lr': expected float"),
    (["--methods", "ce", "--set", "seed=3"], "the study sets method, seed and out"),
    (["--methods", "ce:seed=3"], "the study sets method, seed and out"),
    (["--methods", "ce", "--seeds", "0", "0"], "seed twice"),
    (["--methods", "ce", "--eval-split", "nope"], "split 'nope' of synthetic"),
])
def test_bad_methods_and_settings_fail_before_training(tmp_path, capsys, extra, needle):
    out = tmp_path / "study"
    assert main(["study", "--out", str(out), "--iters", "1", *extra]) == 2
    assert needle in _one_error_line(capsys)
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# A tiny real study: 2 methods x 2 seeds, a few steps on 32x32 synthetic scenes.
TINY = ["--iters", "4", "--ckpt-every", "2", "--encoder", "test_resnet", "--crop", "32", "32", "--batch-size", "2",
        "--set", "synthetic_size=[32, 32]", "--set", "synthetic_train_len=8", "--set", "num_workers=0",
        "--set", "eval_batch_size=50", "--set", "log_every=1", "--no-progress"]
METHODS = ["ce", "contextrast:bane=false"]


def study(out, *extra):
    return main(["study", "--methods", *METHODS, "--seeds", "0", "1", "--out", str(out), *TINY, *extra])


def stamps(out):
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.rglob("*"))
            if p.is_file() and not p.name.startswith("summary")}


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "s"
    assert study(out) == 0
    return out


@pytest.mark.slow
def test_study_trains_every_run_seed_major_and_writes_the_summary(tiny_study, capsys):
    out = tiny_study
    for folder in ("ce", "contextrast-bane=false"):
        for seed in (0, 1):
            run = out / folder / f"s{seed}"
            assert (run / "eval.json").is_file() and (run / "ckpt" / "step_00000004.pt").is_file()
            assert json.loads((run / "study_time.json").read_text())["sessions"][0]["action"] == "training"
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["methods"]) == METHODS and summary["methods"]["ce"]["seeds"] == [0, 1]
    assert summary["paired"]["contextrast:bane=false"]["miou"]["n"] == 2 and summary["missing"] == []
    assert summary["argv"][:4] == ["study", "--methods", *METHODS]
    md = (out / "summary.md").read_text()
    assert "| `contextrast:bane=false` | 2 |" in md and "## Training time" in md


@pytest.mark.slow
def test_parallel_jobs_train_the_same_runs_as_one_at_a_time(tiny_study, tmp_path, capsys):
    # --jobs 2: the runs train two at a time in their own processes (2 torch threads each, as the
    # one-at-a-time study had): the same weights and metrics, and the same files per run.
    import torch

    out = tmp_path / "parallel"
    assert study(out, "--jobs", "2", "--threads", "2") == 0
    log = capsys.readouterr().out
    assert "4 run(s) to train, 2 at a time, 2 torch thread(s) each" in log
    for folder in ("ce", "contextrast-bane=false"):
        for seed in (0, 1):
            a, b = tiny_study / folder / f"s{seed}", out / folder / f"s{seed}"
            assert json.loads((b / "study_time.json").read_text())["sessions"][0]["action"] == "training"
            assert f"seed {seed}: trained in " in log
            wa, wb = (torch.load(r / "ckpt" / "step_00000004.pt", weights_only=False)["model"] for r in (a, b))
            for k in wa:
                torch.testing.assert_close(wb[k], wa[k], msg=k)
            ea, eb = (json.loads((r / "eval.json").read_text()) for r in (a, b))
            assert eb["miou"] == pytest.approx(ea["miou"], abs=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["missing"] == [] and summary["paired"]["contextrast:bane=false"]["miou"]["n"] == 2


def test_job_resources_divide_the_cpus():
    # Each of N jobs gets cpus // N torch threads (at least 1; --threads wins) and, as one of N
    # torchrun processes, cpus // N low-priority loader workers (at least 1, at most 8).
    assert job_resources(2, cpus=8) == (4, 4)  # 8 // 2 = 4 threads, 4 workers
    assert job_resources(3, cpus=2) == (1, 1)  # 2 // 3 = 0: at least 1 of each
    assert job_resources(2, threads=1, cpus=16) == (1, 8)  # --threads 1; 16 // 2 = 8 workers
    assert job_resources(4, cpus=12) == (3, 3)  # 12 // 4 = 3 and 3
    assert job_resources(1, cpus=12) == (12, 8)  # 12 threads; 12 workers capped at 8
    assert job_resources(2, threads=3, cpus=7) == (3, 3)  # --threads 3; 7 // 2 = 3 workers


def test_paired_interval_with_two_seeds_and_with_no_spread():
    # n = 2: one degree of freedom, t(0.975, 1) = 12.7062047361747. Diffs 0.01 and 0.03: mean 0.02,
    # sd = sqrt((0.01^2 + 0.01^2) / 1) = 0.01 * sqrt(2), half width = t * sd / sqrt(2) = t * 0.01.
    p = paired_interval([0.01, 0.03])
    assert p["n"] == 2 and p["n_improved"] == 2 and p["t"] == pytest.approx(12.7062047361747, rel=1e-12)
    assert p["mean"] == pytest.approx(0.02) and p["sd"] == pytest.approx(0.01 * math.sqrt(2))
    assert p["ci_low"] == pytest.approx(0.02 - 0.127062047361747) and p["ci_high"] == pytest.approx(0.02 + 0.127062047361747)
    assert p["includes_zero"] is True
    # Every seed the same difference: sd 0, the interval is the mean itself (no noise to speak of).
    flat = paired_interval([0.02, 0.02, 0.02])
    assert flat["sd"] == 0 and flat["ci_low"] == flat["ci_high"] == pytest.approx(0.02)
    assert flat["includes_zero"] is False and flat["n_improved"] == 3
    zero = paired_interval([0.0, 0.0])  # the same numbers as the baseline: 0 is inside [0, 0]
    assert zero["ci_low"] == zero["ci_high"] == 0 and zero["includes_zero"] is True and zero["n_improved"] == 0
    negative = paired_interval([-0.01, -0.01])
    assert negative["ci_high"] == pytest.approx(-0.01) and negative["includes_zero"] is False
    assert reading(negative, "ce") == "lower than ce (interval excludes 0)" and reading(zero, "ce") == NOISE


def _fake_study(out, fail, jobs, error=FloatingPointError):
    """``run_study`` of ce and pixel_contrast over seeds 0 and 1 with study_fake_train's training
    (the runs in ``fail`` raise ``error``); returns (summary, log lines). On a failure the log
    lines are on the exception as ``lines``."""
    import functools

    from study_fake_train import fake_train

    from ctxseg.config import make_config
    from ctxseg.methods import get_method
    from ctxseg.study import plan_runs, run_study

    specs = parse_method_specs(["ce", "pixel_contrast"])
    runs = plan_runs(specs, [0, 1], out, lambda spec: make_config(get_method(spec.name).config_class, iters=1,
                                                                   encoder="test_resnet", device="cpu"))
    lines = []
    try:
        summary = run_study(runs, specs, [0, 1], out, "val", train=functools.partial(fake_train, fail=fail, error=error),
                            evaluator=None, log=lambda line, **_: lines.append(line), jobs=jobs, threads=1)
    except Exception as e:
        e.lines = lines
        raise
    return summary, lines


def _finished(out):
    return sorted(str(p.parent.relative_to(out)) for p in out.rglob("eval.json"))


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_run_that_breaks_does_not_stop_the_others_and_all_failures_are_reported(tmp_path, jobs):
    # The first run and the last break (a diverged loss); the two between still train, the
    # summary of the finished ones is written, both failures are named at the end with their
    # tracebacks logged, and the next call trains only the failed ones.
    from ctxseg.study import RunsFailed

    out = tmp_path / "study"
    with pytest.raises(RunsFailed) as e:
        _fake_study(out, frozenset({("ce", 0), ("pixel_contrast", 1)}), jobs=jobs)
    message = str(e.value)
    assert message.startswith("2 of 4 run(s) failed") and "run the study again" in message, message
    assert "ce seed 0: FloatingPointError: boom in ce seed 0" in message
    assert "pixel_contrast seed 1: FloatingPointError: boom in pixel_contrast seed 1" in message
    assert _finished(out) == ["ce/s1", "pixel_contrast/s0"]
    tracebacks = [line for line in e.value.lines if "failed:\n" in line]
    assert len(tracebacks) == 2 and all("Traceback" in line and "in fake_train" in line for line in tracebacks), \
        e.value.lines
    partial = json.loads((out / "summary.json").read_text())
    assert sorted((m["method"], m["seed"]) for m in partial["missing"]) == [("ce", 0), ("pixel_contrast", 1)]
    summary, lines = _fake_study(out, frozenset(), jobs=1)
    assert [line.split(": ")[1].split(" ->")[0] for line in lines if line.startswith("[")] == \
        ["training", "reusing", "reusing", "training"]
    assert summary["missing"] == [] and summary["methods"]["ce"]["seeds"] == [0, 1]
    assert summary["paired"]["pixel_contrast"]["miou"]["mean"] == pytest.approx(0.02)


def test_threads_hold_for_one_run_at_a_time_too(tmp_path):
    # --threads without --jobs: each run trains with that many torch threads (before, only --jobs
    # > 1 applied it, and a 1-thread run beside another job silently took every CPU), and the
    # process's own count is restored afterwards.
    import torch
    from study_fake_train import fake_train

    from ctxseg.config import make_config
    from ctxseg.methods import get_method
    from ctxseg.study import plan_runs, run_study

    specs = parse_method_specs(["ce"])
    before = torch.get_num_threads()
    for threads, want in ((before + 1, before + 1), (None, before)):  # a count that differs from the default
        out = tmp_path / f"study-{threads}"
        runs = plan_runs(specs, [0, 1], out, lambda spec: make_config(get_method(spec.name).config_class, iters=1,
                                                                       encoder="test_resnet", device="cpu"))
        seen = []

        def train(cfg):
            seen.append(torch.get_num_threads())
            fake_train(cfg)

        run_study(runs, specs, [0, 1], out, "val", train=train, evaluator=None, log=lambda *a, **k: None,
                  jobs=1, threads=threads)
        assert seen == [want, want] and torch.get_num_threads() == before


@pytest.mark.parametrize("jobs", [1, 2])
def test_an_input_error_stops_the_study_with_its_own_message(tmp_path, jobs):
    # A bad data file or setting would break every run: the study raises the run's own error (the
    # command prints it as one line, test_folder_dataset) and starts nothing after it; the next
    # call goes on.
    from ctxseg.data.base import DatasetError

    out = tmp_path / "study"
    with pytest.raises(DatasetError, match="^boom in pixel_contrast seed 0$"):
        _fake_study(out, frozenset({("pixel_contrast", 0)}), jobs=jobs, error=DatasetError)
    if jobs == 1:  # in order: ce seed 0 trained, nothing after the failure
        assert _finished(out) == ["ce/s0"]
    assert not (out / "summary.json").exists()
    summary, _ = _fake_study(out, frozenset(), jobs=1)
    assert _finished(out) == ["ce/s0", "ce/s1", "pixel_contrast/s0", "pixel_contrast/s1"] and summary["missing"] == []


def test_the_command_reports_broken_runs_in_one_line_and_exits_1(tmp_path, capsys, monkeypatch):
    import ctxseg.cli

    def diverges(cfg, progress):
        raise FloatingPointError(f"loss is nan at step 3 ({cfg.method} seed {cfg.seed})")

    monkeypatch.setattr(ctxseg.cli, "_train_study_run", diverges)
    out = tmp_path / "study"
    assert main(["study", "--methods", "ce", "--seeds", "0", "--out", str(out), *TINY]) == 1
    line = _one_error_line(capsys)
    assert line.startswith("error: 1 of 1 run(s) failed") and str(out / "summary.md") in line, line
    assert line.endswith("ce seed 0: FloatingPointError: loss is nan at step 3 (ce seed 0)"), line


@pytest.mark.slow
def test_second_call_trains_nothing_and_the_files_are_untouched(tiny_study, capsys):
    before = stamps(tiny_study)
    capsys.readouterr()
    assert study(tiny_study) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:4] == [
        f"[1/4] ce seed 0: reusing -> {tiny_study / 'ce' / 's0'}",
        f"[2/4] contextrast:bane=false seed 0: reusing -> {tiny_study / 'contextrast-bane=false' / 's0'}",
        f"[3/4] ce seed 1: reusing -> {tiny_study / 'ce' / 's1'}",
        f"[4/4] contextrast:bane=false seed 1: reusing -> {tiny_study / 'contextrast-bane=false' / 's1'}",
    ]
    assert stamps(tiny_study) == before


@pytest.mark.slow
def test_a_config_mismatch_with_a_run_folder_is_a_clear_error(tiny_study, capsys):
    before = stamps(tiny_study)
    assert study(tiny_study, "--set", "lr=0.5") == 2
    line = _one_error_line(capsys)
    assert f"run folder {tiny_study / 'ce' / 's0'} was made with other settings: lr (folder: 0.001, asked: 0.5)" in line
    assert stamps(tiny_study) == before


@pytest.mark.slow
def test_an_interrupted_run_is_resumed_not_retrained(tiny_study, tmp_path, capsys):
    out = tmp_path / "copy"  # a copy of the study: its config.yaml files name the old --out (ignored)
    shutil.copytree(tiny_study, out)
    run = out / "ce" / "s1"
    finished = json.loads((run / "eval.json").read_text())
    # Killed after its step-2 checkpoint: no step-4 checkpoint, no export, no eval.json.
    for name in ("eval.json", "model.safetensors", "ckpt/step_00000004.pt"):
        (run / name).unlink()
    before = stamps(out)
    capsys.readouterr()
    assert study(out) == 0
    assert f"[3/4] ce seed 1: resuming -> {run}" in capsys.readouterr().out.splitlines()
    after = stamps(out)
    assert after["ce/s1/ckpt/step_00000002.pt"] == before["ce/s1/ckpt/step_00000002.pt"]  # not rewritten
    assert {k: v for k, v in after.items() if not k.startswith("ce/s1/")} == \
        {k: v for k, v in before.items() if not k.startswith("ce/s1/")}
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4]
    sessions = json.loads((run / "study_time.json").read_text())["sessions"]
    assert [s["action"] for s in sessions] == ["training", "resuming"]
    # CPU resumes are bit-identical to uninterrupted runs.
    assert json.loads((run / "eval.json").read_text())["miou"] == finished["miou"]


@pytest.mark.slow
def test_summarize_only_and_another_eval_split(tiny_study, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(tiny_study, out)
    (out / "contextrast-bane=false" / "s1" / "eval.json").unlink()
    before = stamps(out)
    assert study(out, "--summarize-only") == 0
    assert stamps(out) == before  # nothing trained
    summary = json.loads((out / "summary.json").read_text())
    assert [(m["method"], m["seed"]) for m in summary["missing"]] == [("contextrast:bane=false", 1)]
    assert "## Missing runs" in (out / "summary.md").read_text()
    # The finished runs evaluated on val are evaluated on test (eval-test.json), not retrained.
    assert study(out, "--summarize-only", "--eval-split", "test") == 0
    test_eval = json.loads((out / "ce" / "s0" / "eval-test.json").read_text())
    assert test_eval["split"] == "test" and test_eval["num_images"] == 200
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_split"] == "test"
    assert summary["methods"]["ce"]["per_seed"]["0"]["miou"] == test_eval["miou"]
    assert all(after == before[k] for k, after in stamps(out).items() if k in before)


@pytest.mark.slow
def test_eval_of_an_absent_split_is_a_clear_one_line_error(tiny_study, tmp_path, capsys):
    model = str(tiny_study / "ce" / "s0")
    assert main(["eval", "--checkpoint", model, "--split", "nope"]) == 2
    line = _one_error_line(capsys)
    assert "split 'nope' of synthetic" in line and "unknown split 'nope'" in line
    camvid = tmp_path / "camvid"
    (camvid / "train").mkdir(parents=True)
    assert main(["eval", "--checkpoint", model, "--data", "camvid", "--data-root", str(camvid), "--split", "test"]) == 2
    line = _one_error_line(capsys)
    assert f"split 'test' of camvid in {camvid}" in line and str(camvid / "test") in line
    assert main(["eval", "--checkpoint", model, "--data", "camvid", "--data-root", str(camvid), "--split", "nope"]) == 2
    assert "unknown CamVid split 'nope'" in _one_error_line(capsys)


def test_paired_differences_at_every_evaluation_step_match_a_hand_computation(tmp_path):
    """Runs that evaluated during training (``eval_every``) give the difference to the baseline at
    each step, with the same paired-t interval, in summary.json, summary.md and differences.png."""
    from ctxseg.study import write_summary

    out = tmp_path / "study"
    # (step 5 mIoU, step 5 boundary IoU, step 10 mIoU, step 10 boundary IoU) per seed
    base = {0: (0.30, 0.10, 0.50, 0.20), 1: (0.32, 0.12, 0.52, 0.22), 2: (0.34, 0.11, 0.54, 0.21)}
    other = {0: (0.31, 0.12, 0.53, 0.25), 1: (0.32, 0.15, 0.56, 0.26), 2: (0.36, 0.13, 0.56, 0.27)}
    for folder, table in (("ce", base), ("contextrast", other)):
        for seed, (m5, b5, m10, b10) in table.items():
            run = write_eval(out, folder, seed, m10, b10, 0.8, {"sky": 0.9})
            rows = [{"step": 5, "loss": 1.0, "sec_per_iter": 0.1},
                    {"step": 5, "miou": m5, "boundary_iou": b5, "pixel_acc": 0.7, "split": "val"},
                    {"step": 5, "miou": 0.99, "boundary_iou": 0.99, "split": "train"},  # another split: not read
                    {"step": 10, "miou": m10, "boundary_iou": b10, "pixel_acc": 0.8, "split": "val"}]
            (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    summary, md = summary_of(out, ["ce", "contextrast"], [0, 1, 2])
    curve = summary["paired"]["contextrast"]["by_step"]
    assert [e["step"] for e in curve] == [5, 10]

    def interval(diffs):
        mean = sum(diffs) / 3
        sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
        return mean, mean - T_2DOF * sd / math.sqrt(3), mean + T_2DOF * sd / math.sqrt(3)

    for entry, k in ((curve[0], 0), (curve[1], 2)):
        for metric, j in (("miou", k), ("boundary_iou", k + 1)):
            diffs = [other[s][j] - base[s][j] for s in range(3)]
            mean, lo, hi = interval(diffs)
            got = entry[metric]
            assert got["n"] == 3
            assert (got["mean"], got["ci_low"], got["ci_high"]) == pytest.approx((mean, lo, hi))
    # step 10 is the final evaluation: the same interval as the final table's
    assert curve[1]["miou"]["ci_low"] == pytest.approx(summary["paired"]["contextrast"]["miou"]["ci_low"])
    # step 5's mIoU differences 0.01, 0, 0.02 include 0; step 10's boundary IoU 0.05, 0.04, 0.06 do not
    assert curve[0]["miou"]["includes_zero"] and not curve[1]["boundary_iou"]["includes_zero"]
    assert "during training" in md and "| `contextrast` | 5 |" in md
    write_summary(out, summary)
    png = (out / "differences.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

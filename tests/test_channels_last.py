"""channels_last (NHWC) is a memory layout, not a different model: one training step of every
method gives the same loss and the same gradients in both layouts (float tolerance), and the
evaluation paths that read feature maps give the same numbers."""


import pytest
import torch

from ctxseg.config import apply_overrides, make_config
from ctxseg.data import SyntheticScenes, train_transform
from ctxseg.engine.evaluate import build_model
from ctxseg.engine.resolve import resolve_config
from ctxseg.methods import METHODS, get_method
from ctxseg.study import parse_method_spec

SIZE = (64, 64)
# Every registered method at its defaults, plus the variants that take other code paths.
SPECS = [*sorted(METHODS), "pixel_contrast:memory=true,memory_size=64", "contextrast:bane=false",
         "contextrast:contrast_features=encoder",
         "dscnet:dual_stream=B"]


def _batch(n=4):
    ds = SyntheticScenes("train", length=n, size=SIZE, transform=train_transform(SIZE, (0.75, 1.0)))
    items = [ds[(i, 1000 + i)] for i in range(n)]
    return ds, {k: torch.stack([it[k] for it in items]) for k in ("image", "mask", "tags")}


def _step(spec, channels_last, ds, batch, dtype=torch.float64):
    """Loss, logged terms and parameter gradients of one training step (the same init and the
    same random draws in both layouts). In float64 by default: float32 rounding, amplified through
    a randomly initialised network in training mode, moves the stem's gradient by about 1 % between
    the layouts' kernels, which would hide a real error; in float64 the two agree to 1e-9."""
    parsed = parse_method_spec(spec)
    cls = get_method(parsed.name)
    cfg = make_config(cls.config_class, "synthetic", iters=100, pretrained=False, channels_last=channels_last,
                      synthetic_size=SIZE)
    cfg = resolve_config(apply_overrides(cfg, parsed.settings, spec))
    torch.manual_seed(0)
    method = cls(cfg, ds.info, total_iters=100)
    method.prepare(ds)
    model = build_model(cfg, ds.info.num_classes, heads=method.heads).to(dtype).train()
    method.to(dtype)
    torch.manual_seed(1)
    loss, terms = method(model(batch["image"].to(dtype)), batch, step=60)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), {k: float(v) for k, v in terms.items()}, grads, model


@pytest.mark.parametrize("spec", SPECS)
def test_one_step_gives_the_same_loss_and_gradients_in_both_layouts(spec):
    ds, batch = _batch()
    loss0, terms0, grads0, model0 = _step(spec, False, ds, batch)
    loss1, terms1, grads1, model1 = _step(spec, True, ds, batch)
    # The layout really differs: the model's 4-d weights and its maps are NHWC in one run only.
    conv = model1.decoder.fuse[0].weight  # a 3x3 conv (a 1x1 one is contiguous in both)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert model0.decoder.fuse[0].weight.is_contiguous()
    with torch.no_grad():
        out = model1(batch["image"][:1].double())
    assert out["features"].is_contiguous(memory_format=torch.channels_last) and not out["features"].is_contiguous()

    assert loss0.item() > 0
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-7)
    assert terms1.keys() == terms0.keys()
    for k in terms0:
        assert terms1[k] == pytest.approx(terms0[k], rel=1e-6, abs=1e-7), k
    assert grads1.keys() == grads0.keys()
    # The contrastive heads' gradients are there in both layouts (a head the loss missed would be absent).
    assert any(n.startswith("heads.") for n in grads0) == bool(dict(model0.heads.named_parameters()))
    # Each parameter against the largest gradient of the model: some gradients are zero up to
    # rounding (a BN bias whose output another BN normalises), and rounding has no relative scale.
    scale = max(g.abs().max().item() for g in grads0.values())
    for name, g0 in grads0.items():
        assert (grads1[name] - g0).abs().max().item() <= 1e-6 * scale, name


def test_evaluation_and_weak_maps_agree_across_layouts():
    """Evaluation, CAMs and pseudo labels (PAMR), embeddings: the same on the same weights."""
    from ctxseg.engine.evaluate import eval_dataset, evaluate
    from ctxseg.methods.wsss import evaluate_weak

    ds, batch = _batch()
    cls = get_method("wsss_cam")
    results = []
    for cl in (False, True):
        cfg = resolve_config(make_config(cls.config_class, "synthetic", iters=10, pretrained=False, channels_last=cl,
                          synthetic_size=SIZE))
        torch.manual_seed(0)
        model = build_model(cfg, ds.info.num_classes).eval()
        data = torch.utils.data.Subset(eval_dataset(cfg, "val"), range(6))
        loader = torch.utils.data.DataLoader(data, batch_size=3)
        seg = evaluate(model, loader, ds.info, torch.device("cpu"), progress=False)
        weak = evaluate_weak(model, loader, cfg, ds.info, torch.device("cpu"), "val", progress=False)
        results.append((seg, weak))
    (seg0, weak0), (seg1, weak1) = results
    assert seg1["miou"] == pytest.approx(seg0["miou"], abs=1e-3)
    assert weak1["cam"]["miou"] == pytest.approx(weak0["cam"]["miou"], abs=1e-3)
    assert weak1["pseudo"]["miou"] == pytest.approx(weak0["pseudo"]["miou"], abs=1e-3)

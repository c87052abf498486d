"""Contextrast (docs/methods.md, "Contextrast"): the exact distance transform against scipy, BANE on
hand-drawn masks and against a loop oracle (tests/contextrast_oracle.py), anchors and fusion, the
loss and its gradients against the oracle, the empty cases, and the method inside the trainer."""

import json

import contextrast_oracle as oracle
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from ctxseg.config import make_config
from ctxseg.data.base import DatasetInfo
from ctxseg.engine.resolve import resolve_config
from ctxseg.engine.trainer import Trainer
from ctxseg.methods.contextrast import (
    Contextrast,
    ContextrastConfig,
    Projection,
    bane_select,
    class_means,
    edge_distance,
    inverse_norms,
    negative_mask,
    representative_anchors,
    stage_embeddings,
)

STRIDES = (4, 8, 16, 32)


def blobs(B, h, w, C, seed, cell=4, ignore_frac=0.0, low=0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(low, C, (B, 1, -(-h // cell), -(-w // cell)), generator=g).float()
    out = F.interpolate(coarse, scale_factor=cell, mode="nearest")[:, 0, :h, :w].long()
    if ignore_frac:
        out[torch.rand(B, h, w, generator=g) < ignore_frac] = 255
    return out


def corrupt(labels, C, frac, seed):
    g = torch.Generator().manual_seed(seed)
    preds = torch.where(labels == 255, 0, labels)
    flip = torch.rand(labels.shape, generator=g) < frac
    return torch.where(flip, (preds + torch.randint(1, C, labels.shape, generator=g)) % C, preds)


# ------------------------------------------------------------------------------------------------
# Distance transform
@pytest.mark.parametrize("h,w,max_elements", [(9, 13, 1 << 24), (31, 17, 1 << 24), (24, 40, 5000)])
def test_edge_distance_equals_scipy_for_every_region(h, w, max_elements):
    regions = blobs(3, h, w, 4, seed=h, cell=3, low=-1)  # -1 plays "outside every error region"
    d = edge_distance(regions, max_elements=max_elements)
    for b in range(3):
        for r in regions[b].unique().tolist():
            m = (regions[b] == r).numpy()
            if m.all():
                continue
            want = ndimage.distance_transform_edt(m)
            np.testing.assert_allclose(d[b].numpy()[m], want[m], atol=1e-5, err_msg=f"image {b} region {r}")


def test_edge_distance_of_a_region_filling_its_image_is_inf():
    d = edge_distance(torch.zeros(2, 5, 6, dtype=torch.long))
    assert torch.isinf(d).all()


# ------------------------------------------------------------------------------------------------
# BANE on hand-drawn masks
def square_scene():
    """9x9: class 1 is the 5x5 square at rows/cols 2..6, class 0 elsewhere, everything predicted 0.
    The square's distances to its edge: 16 pixels at 1, 8 at 2, the centre at 3."""
    labels = torch.zeros(1, 9, 9, dtype=torch.long)
    labels[0, 2:7, 2:7] = 1
    return labels, torch.zeros_like(labels)


@pytest.mark.parametrize("ratio,rings", [(0.1, 1), (0.5, 1), (0.64, 1), (0.65, 2), (0.96, 2), (1.0, 3)])
def test_bane_keeps_the_error_pixels_nearest_the_region_edge(ratio, rings):
    labels, preds = square_scene()
    out = bane_select(labels, preds, num_classes=3, ratio=ratio)
    # ceil(0.64 * 25) = 16 keeps the outer ring; ceil(0.65 * 25) = 17 reaches into distance 2.
    want = torch.zeros(1, 9, 9, dtype=torch.bool)
    want[0, 2:7, 2:7] = True
    inner = 2 + rings  # rings kept from the outside in: 1 -> rows/cols 3..5 dropped, 2 -> only the centre
    if rings < 3:
        want[0, inner:9 - inner, inner:9 - inner] = False
    assert torch.equal(out["kept"], want)
    assert torch.equal(out["region"] == 1, labels == 1)
    assert out["distance"][0, 2, 2] == 1 and out["distance"][0, 3, 3] == 2 and out["distance"][0, 4, 4] == 3


def test_bane_measures_distance_inside_the_image_only():
    # Class 2 fills columns 0..1 and is predicted 0: column 0 is 2 away from the edge (column 2),
    # column 1 is 1 away; the image border is not an edge.
    labels = torch.zeros(1, 6, 8, dtype=torch.long)
    labels[0, :, :2] = 2
    out = bane_select(labels, torch.zeros_like(labels), num_classes=3, ratio=0.5)
    assert torch.equal(out["distance"][0, :, 0], torch.full((6,), 2.0))
    assert torch.equal(out["kept"][0], (labels[0] == 2) & (torch.arange(8) == 1)[None, :])


def test_bane_false_positive_reading_groups_errors_by_prediction():
    labels, preds = square_scene()  # class-1 pixels predicted 0: false positives of class 0
    preds[0, 0, :] = 2  # the top row (label 0) predicted 2: false positives of class 2
    missed = bane_select(labels, preds, 3, 0.5, negatives="missed")
    fp = bane_select(labels, preds, 3, 0.5, negatives="false_positives")
    assert set(missed["region"].unique().tolist()) == {-1, 0, 1}
    assert set(fp["region"].unique().tolist()) == {-1, 0, 2}
    assert torch.equal(fp["region"] == 0, labels == 1)
    assert torch.equal(fp["region"] == 2, preds == 2)
    # The top row is a 1-pixel-high strip: every pixel is 1 from the edge and kept.
    assert fp["kept"][0, 0].all()
    # Negatives: "missed" -> the kept class-1 ring is a negative of anchors 0 and 2, not of 1;
    # "false_positives" -> the ring (predicted 0) is a negative of anchor 0 only, the top row of anchor 2.
    neg_m = negative_mask(labels.flatten(), preds.flatten(), missed["kept"].flatten(), 3, "missed")
    neg_f = negative_mask(labels.flatten(), preds.flatten(), fp["kept"].flatten(), 3, "false_positives")
    ring = (missed["kept"] & (labels == 1)).flatten()
    assert torch.equal(neg_m[0] & (labels == 1).flatten(), ring) and torch.equal(neg_m[2] & (labels == 1).flatten(), ring)
    assert not (neg_m[1] & (labels == 1).flatten()).any()
    assert torch.equal(neg_f[0], ring)
    assert torch.equal(neg_f[2], (preds == 2).flatten())


def test_bane_excludes_ignored_pixels_and_empty_pools_fall_back():
    labels, preds = square_scene()
    labels[0, 2, 2:7] = 255  # the square's top row is ignored: never an error, never a negative
    out = bane_select(labels, preds, 3, 0.5)
    assert not out["kept"][0, 2].any()
    assert out["distance"][0, 3, 3] == 1  # the ignored row is outside the region: an edge
    neg = negative_mask(labels.flatten(), preds.flatten(), out["kept"].flatten(), 3)
    assert not neg[:, (labels == 255).flatten()].any()
    # Nothing predicted wrong: no pool at all, every anchor falls back to all other-class pixels.
    none = bane_select(labels, labels.clamp(max=2), 3, 0.5)
    assert not none["kept"].any()
    fallback = negative_mask(labels.flatten(), labels.flatten(), none["kept"].flatten(), 3)
    assert torch.equal(fallback, negative_mask(labels.flatten(), labels.flatten(), None, 3))


@pytest.mark.parametrize("negatives", ["missed", "false_positives"])
@pytest.mark.parametrize("per_image", [True, False])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.9])
def test_bane_matches_the_loop_oracle(negatives, per_image, ratio):
    labels = blobs(3, 20, 28, 5, seed=7, cell=5, ignore_frac=0.03)
    preds = corrupt(blobs(3, 20, 28, 5, seed=8, cell=3), 5, 0.1, seed=9)
    preds = torch.where(torch.rand(labels.shape, generator=torch.Generator().manual_seed(1)) < 0.5, labels, preds)
    preds = preds.clamp(0, 4)
    got = bane_select(labels, preds, 5, ratio, negatives, per_image)["kept"]
    want = oracle.bane_kept(labels, preds, 5, ratio, negatives, per_image)
    assert got.any() and torch.equal(got, want)
    flat = labels.flatten(), preds.flatten(), got.flatten()
    mask = negative_mask(*flat, 5, negatives)
    want_neg = oracle.negatives(*flat, 5, negatives)
    for c in range(5):
        assert mask[c].nonzero().squeeze(1).tolist() == want_neg[c]


# ------------------------------------------------------------------------------------------------
# Anchors
def stage_inputs(B=2, H=32, W=64, C=5, D=8, seed=0, ignore_frac=0.05):
    g = torch.Generator().manual_seed(seed)
    mask = blobs(B, H, W, C, seed, cell=8, ignore_frac=ignore_frac)
    embeds = [torch.randn(B, D, H // s, W // s, generator=g) for s in STRIDES]
    labels = [mask[:, ::s, ::s] for s in STRIDES]
    return mask, embeds, labels


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("fusion", [True, False])
def test_anchors_equal_masked_means_of_the_loop_oracle(normalize, fusion):
    _, embeds, labels = stage_inputs()
    got, present = representative_anchors(
        [e.flatten(2) for e in embeds], [l.flatten(1) for l in labels], 5, fusion, 0.3, normalize
    )
    want = oracle.anchors(embeds, labels, 5, fusion, 0.3, normalize)
    for i in range(4):
        assert present[i].nonzero().squeeze(1).tolist() == sorted(want[i])
        for c, a in want[i].items():
            torch.testing.assert_close(got[i][c].double(), a, atol=1e-6, rtol=1e-5)


def test_class_means_ignore_ignored_pixels_and_report_counts():
    emb = torch.arange(12.0).view(1, 2, 6)
    labels = torch.tensor([[0, 0, 255, 2, 2, 2]])
    means, counts = class_means(emb, labels, 3)
    assert counts.tolist() == [2, 0, 3]
    torch.testing.assert_close(means, torch.tensor([[0.5, 6.5], [0.0, 0.0], [4.0, 10.0]]))


def test_fusion_only_for_classes_present_at_both_stages():
    # Class 1 is a 4x4 patch: visible at strides 4..16 but not on the stride-32 grid (1 cell at (0, 0)).
    mask = torch.zeros(1, 32, 32, dtype=torch.long)
    mask[0, 8:24, 8:24] = 1
    labels = [mask[:, ::s, ::s] for s in STRIDES]
    g = torch.Generator().manual_seed(0)
    embeds = [torch.randn(1, 4, 32 // s, 32 // s, generator=g).flatten(2) for s in STRIDES]
    flat = [l.flatten(1) for l in labels]
    fused, present = representative_anchors(embeds, flat, 2, fusion=True)
    plain, _ = representative_anchors(embeds, flat, 2, fusion=False)
    assert present[3].tolist() == [True, False] and all(p.tolist() == [True, True] for p in present[:3])
    for i in range(3):
        torch.testing.assert_close(fused[i][1], plain[i][1])  # absent at the deepest stage: not fused
        assert not torch.allclose(fused[i][0], plain[i][0])  # present at both: fused
        torch.testing.assert_close(fused[i][0], F.normalize(0.5 * plain[i][0] + 0.5 * plain[3][0], dim=0))
    torch.testing.assert_close(fused[3], plain[3])


# ------------------------------------------------------------------------------------------------
# The loss against the oracle
def fake_out(hidden, projs, preds4, C):
    """A segmenter output whose logits argmax to ``preds4`` (B, H/4, W/4), with the projection
    heads' hidden maps and last layers as leaves."""
    return {"logits": F.one_hot(preds4, C).permute(0, 3, 1, 2).float() * 5.0,
            "stage_hidden": [h.clone().requires_grad_(True) for h in hidden],
            "stage_proj": [(w.clone().requires_grad_(True), b.clone().requires_grad_(True)) for w, b in projs]}


def head_inputs(B=2, H=32, W=64, C=5, c=6, D=8, seed=0, ignore_frac=0.05):
    """Labels, and per stage hidden maps (B, c, h, w) with a last layer (W (D, c), b (D,))."""
    mask, _, labels = stage_inputs(B, H, W, C, D, seed, ignore_frac)
    g = torch.Generator().manual_seed(seed + 100)
    hidden = [torch.randn(B, c, H // s, W // s, generator=g) for s in STRIDES]
    projs = [(torch.randn(D, c, generator=g) / c**0.5, 0.3 * torch.randn(D, generator=g)) for _ in STRIDES]
    return mask, hidden, projs, labels


def test_the_folded_projection_equals_the_materialised_embeddings():
    _, hidden, projs, labels = head_inputs(seed=11)
    x, (w, b) = hidden[0].flatten(2), projs[0]
    emb = torch.einsum("dc,bcp->bdp", w, x) + b[:, None]
    torch.testing.assert_close(stage_embeddings({"stage_hidden": hidden, "stage_proj": projs})[0].flatten(2), emb)
    anchors = torch.randn(5, 8)
    torch.testing.assert_close(Projection.scores(x, anchors, (w, b)), anchors @ emb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inverse_norms(x, True, (w, b)), 1 / emb.norm(dim=1), atol=1e-5, rtol=1e-4)
    lab = labels[0].flatten(1)
    scale = torch.rand(lab.shape)
    torch.testing.assert_close(class_means(x, lab, 5, scale, (w, b)), class_means(emb, lab, 5, scale),
                               atol=1e-5, rtol=1e-5)


def method(C=5, **kw):
    """The method with the loop oracle's reading of the paper (docs/methods.md (CTX-2)-(CTX-10)):
    labels and predictions put on each stage's grid by the nearest rule (pixel (s i, s j), (SH-4))
    and BANE's distances measured on each stage's own grid (``bane_distance="stage"``, (CTX-5));
    ``label_grid`` and ``bane_distance`` have tests of their own."""
    kw = {"label_grid": "nearest", "bane_distance": "stage", **kw}
    cfg = make_config(ContextrastConfig, **kw)
    return Contextrast(cfg, DatasetInfo("t", tuple(f"c{i}" for i in range(C)), ((0, 0, 0),) * C), 100)


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"bane": False},
        {"fusion": False, "temperature": 0.5},
        {"bane_negatives": "false_positives", "bane_percentile": "batch", "bane_ratio": 0.3},
        {"detach_anchors": True, "normalize": False, "temperature": 2.0},
    ],
    ids=["default", "ccl", "nofusion", "fp-batch", "detach-unnorm"],
)
def test_loss_and_gradients_equal_the_loop_oracle(settings):
    C = 5
    mask, hidden, projs, labels = head_inputs(C=C, seed=3)
    preds4 = corrupt(mask[:, ::4, ::4], C, 0.3, seed=4)
    m = method(C, **settings)
    out = fake_out(hidden, projs, preds4, C)
    targets = m.stage_targets(out, mask)
    for i, s in enumerate(STRIDES):  # nearest-downsampling reads pixel (s*i, s*j)
        assert torch.equal(targets[i]["labels"], labels[i])
        assert torch.equal(targets[i]["preds"], preds4[:, :: s // 4, :: s // 4])
    loss, terms = m(out, {"mask": mask}, step=0)
    got = (loss - terms["ce"]) / m.cfg.contrast_weight
    # The oracle sees the embeddings themselves, computed in float64 from the same leaves.
    ref_h = [h.double().requires_grad_(True) for h in hidden]
    ref_p = [(w.double().requires_grad_(True), b.double().requires_grad_(True)) for w, b in projs]
    embeds = stage_embeddings({"stage_hidden": ref_h, "stage_proj": ref_p})
    want, per_stage = oracle.total_loss(embeds, labels, [t["preds"] for t in targets], C, m.cfg)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    for i in range(4):
        torch.testing.assert_close(terms[f"contrast_s{i + 1}"].double(), per_stage[i], atol=1e-5, rtol=1e-5)
    got.backward()
    want.backward()
    leaves = [*out["stage_hidden"], *(t for p in out["stage_proj"] for t in p)]
    ref_leaves = [*ref_h, *(t for p in ref_p for t in p)]
    for e, r in zip(leaves, ref_leaves):
        assert torch.isfinite(e.grad).all()
        torch.testing.assert_close(e.grad.double(), r.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", ["all_ignore", "no_errors", "one_class", "absent_deep"])
def test_empty_cases_give_a_finite_loss_and_gradients(case):
    C = 4
    mask, hidden, projs, _ = head_inputs(C=C, seed=5, ignore_frac=0.0)
    preds4 = corrupt(mask[:, ::4, ::4], C, 0.3, seed=6)
    if case == "all_ignore":
        mask = torch.full_like(mask, 255)
    elif case == "no_errors":
        preds4 = mask[:, ::4, ::4].clone()
    elif case == "one_class":
        mask = torch.full_like(mask, 2)
    elif case == "absent_deep":
        mask = torch.zeros_like(mask)
        mask[:, 4:12, 4:12] = 3  # invisible on the stride-32 grid
    m = method(C)
    out = fake_out(hidden, projs, preds4, C)
    loss, terms = m(out, {"mask": mask}, step=0)
    assert torch.isfinite(loss)
    (loss - terms["ce"]).backward()
    for e in [*out["stage_hidden"], *(t for p in out["stage_proj"] for t in p)]:
        assert e.grad is not None and torch.isfinite(e.grad).all()
    if case in ("all_ignore", "one_class"):
        assert terms["contrast"] == 0  # no positives / no negatives at all
    if case == "no_errors":
        ccl, ccl_terms = method(C, bane=False)(fake_out(hidden, projs, preds4, C), {"mask": mask}, step=0)
        torch.testing.assert_close(terms["contrast"], ccl_terms["contrast"])  # every pool fell back


def test_config_rejects_bad_settings():
    for bad in ({"bane_ratio": 0.0}, {"bane_ratio": 1.5}, {"bane_negatives": "both"}, {"bane_percentile": "x"},
                {"fusion_weight": 1.2}, {"stage_weights": (0.1, -1.0, 0.7, 1.0)}, {"temperature": 0.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            make_config(ContextrastConfig, **bad).validate()


# ------------------------------------------------------------------------------------------------
# In the trainer
def test_trains_in_the_trainer_and_deploys_without_heads(tmp_path):
    cfg = make_config(
        ContextrastConfig, encoder="test_resnet", crop=(64, 64), synthetic_size=(64, 64), synthetic_train_len=16,
        batch_size=4, iters=4, eval_every=0, log_every=1, num_workers=0, out=str(tmp_path / "run"),
        eval_batch_size=50,
    )
    trainer = Trainer(cfg, Contextrast, progress=False)
    trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "contrast" in r]
    assert len(rows) == 4 and all(np.isfinite(r["contrast"]) and r["contrast"] > 0 for r in rows)
    assert {f"contrast_s{i}" for i in range(1, 5)} <= set(rows[0])
    heads = [k for k in trainer.model.state_dict() if k.startswith("heads.ctx_proj.nets.")]
    assert len({k.split(".")[3] for k in heads}) == 4  # one projection head per stage
    assert not any(k.startswith("heads.") for k in trainer.model.deploy_state_dict())


@pytest.mark.parametrize("source", ["encoder", "decoder"])
def test_contrast_features_decide_whether_the_contrast_reaches_the_decoder(source):
    """With ``contrast_features="decoder"`` the contrastive term alone has a gradient on every
    decoder layer (lateral, smooth and fuse convs: the maps it contrasts are the classifier's input
    and the pyramid built into it); with ``"encoder"`` its gradient on the decoder is exactly 0.
    The classifier comes after every contrasted map, so neither reaches it (docs/methods.md,
    "Contextrast", contrasted maps)."""
    from ctxseg.data import SyntheticScenes
    from ctxseg.engine.evaluate import build_model

    ds = SyntheticScenes("train", length=2, size=(64, 64))
    items = [ds[i] for i in range(2)]
    batch = {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in ("image", "mask")}
    cfg = resolve_config(make_config(ContextrastConfig, iters=10, encoder="test_resnet", contrast_features=source,
                      synthetic_size=(64, 64)))
    method = Contextrast(cfg, ds.info, total_iters=10)
    torch.manual_seed(0)
    model = build_model(cfg, ds.info.num_classes, heads=method.heads).train()
    out = model(batch["image"])
    head = model.heads["ctx_proj"]
    widths = [net[0].in_channels for net in head.nets]
    assert widths == ([model.decoder_channels] * 4 if source == "decoder" else model.stage_channels)
    contrast, stages = method.contrast(out, batch["mask"])
    assert all(torch.isfinite(li) and li > 0 for li in stages)
    contrast.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    decoder = {n: g for n, g in grads.items() if n.startswith("decoder.") and "weight" in n and "bn" not in n}
    assert decoder, "no decoder conv weights found"
    if source == "decoder":
        assert all(g is not None and g.abs().sum() > 0 for g in decoder.values()), \
            [n for n, g in decoder.items() if g is None or g.abs().sum() == 0]
    else:
        assert all(g is None or g.abs().sum() == 0 for g in decoder.values())
    assert grads["classifier.weight"] is None
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("encoder."))


def test_bane_at_a_coarse_stage_keeps_the_error_cells_nearest_the_boundary():
    """A 16-cell band of missed class-1 pixels on the stride-4 grid (64x64) is 2 cells wide on the
    stride-32 grid (8x8): there every error cell is 1 cell from the region's edge, and BANE measured
    on that grid (``bane_distance="stage"``) keeps all 16 of them. Measured on the fine grid and
    pooled (docs/methods.md (CTX-6), the default ``bane_distance="fine"``), the cells whose centres
    lie nearer the band's edge are kept first: half of them, the column whose centre is 4 fine cells
    from the edge rather than 5."""
    from ctxseg.methods.contrast import downsample_labels

    fine_labels = torch.zeros(1, 64, 64, dtype=torch.long)
    fine_labels[:, :, 32:] = 1
    fine_preds = fine_labels.clone()
    fine_preds[:, :, 32:48] = 0  # class 1 missed in columns 32..47
    coarse = {"labels": downsample_labels(fine_labels, (8, 8)), "preds": downsample_labels(fine_preds, (8, 8))}
    error = coarse["labels"] != coarse["preds"]
    assert error.sum() == 16 and error[0, :, 4:6].all()  # columns 4 and 5 of the coarse grid
    targets = [{"labels": fine_labels, "preds": fine_preds}, coarse]
    info = DatasetInfo("t", ("a", "b"), ((0, 0, 0), (1, 1, 1)))
    kept = {}
    for where in ("stage", "fine"):
        cfg = make_config(ContextrastConfig, iters=1, bane_distance=where, bane_ratio=0.5)
        maps = Contextrast(cfg, info).bane(targets)
        kept[where] = maps[1]["kept"]
    assert kept["stage"].sum() == 16  # every distance ties at 1 on the coarse grid
    assert kept["fine"].sum() == 8 and kept["fine"][0, :, 4].all() and not kept["fine"][0, :, 5].any()
    assert not (kept["fine"] & ~error).any()


def test_contrast_warmup_trains_ce_alone_then_switches_the_contrast_on():
    from ctxseg.data import SyntheticScenes
    from ctxseg.engine.evaluate import build_model

    ds = SyntheticScenes("train", length=2, size=(64, 64))
    items = [ds[i] for i in range(2)]
    batch = {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in ("image", "mask")}
    cfg = resolve_config(make_config(ContextrastConfig, iters=12, encoder="test_resnet", contrast_warmup=0.25))
    method = Contextrast(cfg, ds.info, total_iters=12)
    model = build_model(cfg, ds.info.num_classes, heads=method.heads).train()
    out = model(batch["image"])
    early, terms = method(out, batch, step=2)  # 0.25 * 12 = 3 steps of CE alone
    assert early.item() == pytest.approx(terms["ce"].item()) and terms["contrast"].item() == 0.0
    early.backward()  # the heads are in the graph, with zero gradient
    assert all(p.grad is not None and not p.grad.any() for p in model.heads.parameters())
    late, terms = method(model(batch["image"]), batch, step=3)
    assert terms["contrast"].item() > 0
    assert late.item() == pytest.approx(terms["ce"].item() + cfg.contrast_weight * terms["contrast"].item(), rel=1e-5)

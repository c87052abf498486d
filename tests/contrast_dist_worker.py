"""Run under torchrun with 2 CPU processes by test_gather_contrast.py:

    torchrun --standalone --nproc_per_node=2 tests/contrast_dist_worker.py OUT

1. Per-rank sampling streams: a Trainer is built on each rank (its model initialised from the same
   seed, then ``seed_sampling``); the ranks' RNG states and the anchors they draw from the same
   labels must differ.
2. Each method's contrastive term, with ``gather_contrast`` on, on each rank's half of a fixed batch
   of 4 images, against one process given the whole batch (computed on every rank with the setting
   off, no collective). Sampling takes every candidate pixel (budgets larger than the grid), so the
   anchors are the same sets. Compared, for every case:

   - ``term``: each rank's term against the single-process term;
   - ``rows``: each rank's gradient with respect to the embeddings / features the method reads
     (retained on the model's outputs), divided by the world size, against the single-process
     gradient's rows for that rank's images;
   - ``params``: the mean over the ranks of the model's parameter gradients (what DDP gives)
     against the single-process parameter gradients;
   - ``anchors`` (pixel contrast): the anchor count the forward logs.

   and the same with ``gather_contrast`` off on the halves (which must differ).
   Rank 0 writes OUT/results.json: per case the largest relative errors.
"""

import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ctxseg.config import make_config
from ctxseg.data.base import DatasetInfo
from ctxseg.engine.distributed import all_gather_objects, all_gather_rows, cleanup
from ctxseg.engine.evaluate import build_model
from ctxseg.engine.trainer import Trainer
from ctxseg.methods import PixelContrastConfig, get_method

INFO = DatasetInfo("toy", ("a", "b", "c", "d"), ((0, 0, 0),) * 4)
VOC_LIKE = DatasetInfo("voc-like", ("background", "a", "b", "c"), ((0, 0, 0),) * 4, background=0)
B, SIZE = 4, 64
EVERY = 10**6  # budgets larger than any grid: sampling takes every candidate pixel


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def blobs(g, C, cell=4):
    coarse = torch.randint(0, C, (B, 1, SIZE // cell, SIZE // cell), generator=g).float()
    return F.interpolate(coarse, scale_factor=cell, mode="nearest")[:, 0].long()


def sampling_streams(out_dir: Path) -> dict:
    cfg = make_config(PixelContrastConfig, encoder="test_resnet", crop=(32, 32), batch_size=4,
                      synthetic_size=(32, 32), synthetic_train_len=8, iters=2, num_workers=0, device="cpu",
                      max_views=3, anchors_per_image=6, out=str(out_dir / "streams"))
    trainer = Trainer(cfg, get_method(cfg.method), progress=False)
    rank = trainer.dist.rank
    states = all_gather_objects(torch.get_rng_state())
    g = torch.Generator().manual_seed(5)
    labels = blobs(g, 4)[:, ::8, ::8].flatten(1)  # the same labels on both ranks, an 8x8 grid
    logits = torch.randn(B, 4, 8, 8, generator=g)
    anchors = trainer.method._sample(logits, labels, (8, 8))
    index = all_gather_rows(anchors.index[None])  # (2, M): every image gives the same count
    params = all_gather_objects(torch.cat([p.detach().flatten() for p in trainer.model.parameters()]))
    return {
        "rank": rank,
        "rng_states_differ": not torch.equal(states[0], states[1]),
        "anchor_sets_differ": not torch.equal(index[0].sort().values, index[1].sort().values),
        "same_counts": index.shape[0] == 2,
        "params_equal": torch.equal(params[0], params[1]),
    }


def dscnet_inputs(method, model, mask, rows):
    """DSCNet's inputs made by hand (an untrained model's CAMs are flat, and its graph, fed
    positively correlated nodes, smooths them all into one): random features and embeddings
    (leaves), CAMs and pseudo labels from the labels, random refined masks, the node MLP's last
    layer and the GCN without biases. The same numbers on every rank; ``rows`` picks the images."""
    g = torch.Generator().manual_seed(7)
    C, h = method.info.num_classes, SIZE // 4
    lab = mask[:, ::4, ::4]
    features = torch.randn(B, model.decoder_channels, h, h, generator=g)[rows].requires_grad_()
    embed_raw = torch.randn(B, method.cfg.proj_dim, h, h, generator=g)[rows].requires_grad_()
    logits = torch.randn(B, C, h, h, generator=g)[rows]
    refined = torch.rand(B, C, h, h, generator=g).softmax(1)[rows]
    cams = F.one_hot(torch.where(lab == 255, 0, lab), C).permute(0, 3, 1, 2).float()[rows]
    graph = model.heads["sgcl_graph"]
    with torch.no_grad():  # no shared offset: nodes of different classes point apart
        for layer in [*graph.mlp, *graph.gcn]:
            if isinstance(layer, torch.nn.Linear):
                layer.bias.zero_()
    identity = (torch.eye(method.cfg.proj_dim), torch.zeros(method.cfg.proj_dim))  # the head's last conv
    out = {"features": features, "embed_hidden": embed_raw, "embed_proj": identity, "logits": logits, "node_cams": cams,
           "node_mlp": graph.mlp[-1], "gcn": graph.gcn}  # one linear layer: zero-mean nodes
    weak = {"labels": lab[rows], "refined": refined, "valid": None, "seg_on": True}
    return out, weak, [features, embed_raw]


def forward(model, method_name, image):
    out = model(image)
    keys = {"contextrast": ["stage_hidden"], "pixel_contrast": ["embed_hidden"]}[method_name]
    leaves = []
    for k in keys:
        for t in out[k] if isinstance(out[k], list) else [out[k]]:
            t.retain_grad()
            leaves.append(t)
    return out, leaves


def contrast_term(method, out, batch):
    return method.contrast(out, batch["mask"])[0]  # Contextrast, pixel contrast


def run_case(method_name: str, settings: dict, info: DatasetInfo, rank: int, world: int) -> dict:
    cls = get_method(method_name).config_class
    results = {}
    g = torch.Generator().manual_seed(11)
    image = torch.randn(B, 3, SIZE, SIZE, generator=g)
    mask = blobs(g, info.num_classes)
    mask[:, 5:9, 9:14] = 255
    mask[2:, :24] = 255  # the second process holds fewer labelled pixels (and anchors)
    tags = torch.zeros(B, info.num_classes)
    for b in range(B):
        tags[b, mask[b][mask[b] != 255].unique()] = 1
    batch = {"image": image, "mask": mask, "tags": tags}
    share = slice(rank * B // world, (rank + 1) * B // world)

    terms = []

    def run(gather: bool, rows: slice):
        cfg = make_config(cls, encoder="test_resnet", iters=10, gather_contrast=gather, **settings)
        torch.manual_seed(0)  # the same model on every rank and in every run
        method = get_method(method_name)(cfg, info, 10)
        model = build_model(cfg, info.num_classes, heads=method.heads).train()
        for m in model.modules():  # BN with its running statistics: each image's outputs its own
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
        if getattr(method, "memory", None) is not None:  # the same filled queues everywhere
            gm = torch.Generator().manual_seed(3)
            for kind, n in (("pixel", 30), ("region", 7)):
                keys = F.normalize(torch.randn(n, cfg.proj_dim, generator=gm), dim=1)
                method.memory.push(kind, keys, torch.randint(0, info.num_classes, (n,), generator=gm))
        if method_name == "dscnet":
            out, weak, leaves = dscnet_inputs(method, model, mask, rows)
            pgcl, sgcl, _ = method.contrast(out, {k: v[rows] for k, v in batch.items()}, weak)
            term = pgcl + sgcl
        else:
            out, leaves = forward(model, method_name, image[rows])
            term = contrast_term(method, out, {k: v[rows] for k, v in batch.items()})
        term.backward()
        grads = [t.grad for t in leaves]
        params = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}
        terms.append(term.item())
        anchors = None
        if method_name == "pixel_contrast":  # the anchors the forward logs
            with torch.no_grad():
                anchors = method(out, {k: v[rows] for k, v in batch.items()}, 10**6)[1]["anchors"].item()
        return term.detach(), grads, params, anchors

    single_term, single_grads, single_params, single_anchors = run(False, slice(None))
    for gather in (True, False):
        term, grads, params, anchors = run(gather, share)
        for p in params.values():  # the mean over the ranks, as DDP takes it
            dist.all_reduce(p)
            p /= world
        key = "on" if gather else "off"
        results[key] = {
            "term": abs(term.item() - single_term.item()) / max(1e-12, abs(single_term.item())),
            "rows": max(rel_err(gr / world, sg[share]) for gr, sg in zip(grads, single_grads)),
            "params": max(rel_err(params[n], single_params[n]) for n in single_params
                          if single_params[n].abs().max() > 0),
            "anchors": anchors,
        }
    results["single_term"] = single_term.item()
    results["single_anchors"] = single_anchors
    return results


CASES = {
    "contextrast": ("contextrast", {}, INFO),
    "contextrast_batch_percentile": ("contextrast", {"bane_percentile": "batch", "fusion": False}, INFO),
    "pixel_contrast": ("pixel_contrast", {"anchors_per_image": EVERY, "max_views": EVERY, "min_class_share": 0.0}, INFO),
    "pixel_contrast_memory": ("pixel_contrast", {"anchors_per_image": EVERY, "max_views": EVERY,
                                                 "min_class_share": 0.0, "memory": True, "memory_size": 20}, INFO),
    "dscnet_A": ("dscnet", {"pgcl_anchors_per_image": EVERY, "seg_gate": False, "seg_warmup": 0.0}, VOC_LIKE),
    "dscnet_B": ("dscnet", {"pgcl_anchors_per_image": EVERY, "seg_gate": False, "seg_warmup": 0.0,
                            "dual_stream": "B"}, VOC_LIKE),
}

if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    with tempfile.TemporaryDirectory() as tmp:
        streams = sampling_streams(Path(tmp))  # builds a Trainer: joins the process group
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {"streams": streams}
    for case, (name, settings, info) in CASES.items():
        results[case] = run_case(name, settings, info, rank, world)
    per_rank = all_gather_objects(results)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.json").write_text(json.dumps(per_rank, indent=1))
    cleanup()

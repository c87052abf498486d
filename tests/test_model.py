import pytest
import torch
from torch import nn

from ctxseg.models import Head, Segmenter


class CountingHead(Head):
    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(128, 8, 1)
        self.calls = 0

    def forward(self, out):
        self.calls += 1
        return {"proj": self.proj(out["features"])}


@pytest.mark.parametrize("encoder", ["test_resnet", "test_convnext", "test_efficientnet"])
def test_output_dict_shapes_follow_feature_info(encoder):
    model = Segmenter(num_classes=5, encoder=encoder).eval()
    out = model(torch.randn(2, 3, 64, 96))
    assert out["logits"].shape == (2, 5, 16, 24)
    assert out["features"].shape == (2, 128, 16, 24)
    assert [tuple(s.shape[-2:]) for s in out["stages"]] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert [s.shape[1] for s in out["stages"]] == model.stage_channels
    assert model.predict(torch.randn(1, 3, 64, 96)).shape == (1, 5, 64, 96)


def test_heads_run_in_training_only_and_can_be_dropped():
    head = CountingHead()
    model = Segmenter(3, "test_resnet", heads={"p": head})
    model.train()
    assert "proj" in model(torch.randn(2, 3, 64, 64))
    model.eval()
    assert "proj" not in model(torch.randn(1, 3, 32, 32))
    assert head.calls == 1
    deployed = model.deploy_state_dict()
    assert not any(k.startswith("heads.") for k in deployed)
    baseline = Segmenter(3, "test_resnet")
    baseline.load_state_dict(deployed)  # strict: same keys as a head-less model
    assert sum(p.numel() for p in model.drop_heads().parameters()) == sum(p.numel() for p in baseline.parameters())


def test_heads_factory_sees_model_channels():
    model = Segmenter(3, "test_resnet", heads=lambda m: {"p": nn.Conv2d(m.stage_channels[-1], 4, 1)})
    assert model.heads["p"].in_channels == model.stage_channels[-1]


def test_encoder_without_required_strides_is_a_clear_error():
    with pytest.raises(ValueError, match="strides"):
        Segmenter(3, "test_vit")


def test_gradients_reach_encoder_decoder_and_classifier():
    model = Segmenter(4, "test_resnet")
    model(torch.randn(2, 3, 32, 32))["logits"].sum().backward()
    for name in ("encoder", "decoder", "classifier"):
        grads = [p.grad for p in getattr(model, name).parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), name


@pytest.mark.parametrize("channels_last", [False, True])
def test_class_argmax_is_argmax_over_classes_first_on_ties(channels_last):
    from ctxseg.models.segmenter import class_argmax

    x = torch.randint(0, 3, (2, 5, 6, 7)).float()  # many ties
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    got = class_argmax(x)
    first = torch.stack([torch.nonzero(x[b, :, i, j] == x[b, :, i, j].max())[0, 0]
                         for b in range(2) for i in range(6) for j in range(7)]).view(2, 6, 7)
    assert torch.equal(got, first) and torch.equal(got, x.argmax(1))


@pytest.mark.parametrize("encoder, channels_last", [("tf_efficientnet_lite0", True), ("test_resnet", False)])
def test_folded_batchnorm_predicts_what_the_model_predicts_without_its_norm_passes(encoder, channels_last):
    from ctxseg.engine.evaluate import fold_batchnorm

    torch.manual_seed(0)
    model = Segmenter(5, encoder, channels_last=channels_last).train()
    with torch.no_grad():  # running statistics far from the identity
        for _ in range(3):
            model(torch.randn(4, 3, 64, 64) * 3 + 1)
    model.eval()
    x = torch.randn(2, 3, 72, 96)
    with torch.no_grad():
        fast = fold_batchnorm(model, x[:1], with_heads=False)
        assert fast is not model
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        calls = []
        hooks = [m.register_forward_pre_hook(lambda m, i: calls.append(m)) for m in fast.modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        got, want = fast(x, with_heads=False)["logits"], model(x, with_heads=False)["logits"]
        for h in hooks:
            h.remove()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert len(calls) == len(norms)  # every norm is still called (its activation runs) ...
    assert all(m.forward.__func__ is not type(m).forward for m in calls)  # ... through the folded path
    assert model.decoder.fuse[0].bias is None  # the model itself is untouched


def test_fold_batchnorm_leaves_a_model_alone_where_a_conv_output_is_read_twice():
    from ctxseg.engine.evaluate import fold_batchnorm

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # the conv's output also goes around the norm

    model = Twice()
    model.bn.running_mean.fill_(0.5)
    model.bn.running_var.fill_(4.0)
    model.eval()
    with torch.no_grad():
        assert fold_batchnorm(model, torch.randn(1, 3, 8, 8)) is model

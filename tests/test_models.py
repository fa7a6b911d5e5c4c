import pytest
import torch
from torch import nn

from ufm.core.models import ARCHITECTURES, build_model, count_parameters, has_batchnorm, last_conv_layer

SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32), "chest-xray": (1, 64, 64)}


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("dataset", list(SHAPES))
def test_output_shapes(arch, dataset):
    c, h, w = SHAPES[dataset]
    k = 2 if dataset == "chest-xray" else 10
    model = build_model(arch, c, (h, w), k).eval()
    with torch.no_grad():
        assert model(torch.rand(2, c, h, w)).shape == (2, k)


def test_paper_layer_sizes():
    mlp = build_model("mlp", 1, (28, 28), 10)
    assert [m.out_features for m in mlp if isinstance(m, nn.Linear)] == [512, 256, 10]
    cnn1 = build_model("cnn1", 1, (28, 28), 10)
    assert [m.out_channels for m in cnn1 if isinstance(m, nn.Conv2d)] == [32, 64]
    assert [m.out_features for m in cnn1 if isinstance(m, nn.Linear)] == [128, 128, 10]
    assert next(m for m in cnn1 if isinstance(m, nn.Linear)).in_features == 64 * 12 * 12
    cnn2 = build_model("cnn2", 3, (32, 32), 10)
    assert [m.out_channels for m in cnn2 if isinstance(m, nn.Conv2d)] == [32, 32, 64, 64]
    assert [m.out_features for m in cnn2 if isinstance(m, nn.Linear)] == [1024, 10]
    dn = build_model("densenet100", 3, (32, 32), 10)
    convs = [m for m in dn.modules() if isinstance(m, nn.Conv2d)]
    # 1 stem + 3 blocks x 16 bottleneck layers x 2 convs + 2 transitions = 99 convs, +1 classifier = 100
    assert len(convs) == 99 and convs[0].kernel_size == (3, 3)
    assert 0.7e6 < count_parameters(dn) < 0.85e6  # DenseNet-BC-100 (k=12): 0.8M parameters


def test_switches():
    m = build_model("mlp", 1, (28, 28), 10, dropout=0.3, batchnorm=True)
    assert any(isinstance(x, nn.Dropout) and x.p == 0.3 for x in m) and has_batchnorm(m)
    assert not has_batchnorm(build_model("cnn1", 1, (28, 28), 10))
    assert last_conv_layer(build_model("mlp", 1, (28, 28), 10)) is None
    assert last_conv_layer(build_model("cnn1", 1, (28, 28), 10)).out_channels == 64


def test_bad_arguments():
    with pytest.raises(ValueError, match="mlp, cnn1"):
        build_model("resnet", 1, (28, 28), 10)
    with pytest.raises(ValueError, match="at least 14x14"):
        build_model("cnn2", 1, (12, 12), 10)

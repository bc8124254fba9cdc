"""Tests for dynbatch_core.models: shapes, parameter counts, norm options, errors, and that gradients flow."""

import pytest
import torch
import torch.nn as nn

from dynbatch_core.models import MODEL_NAMES, NORM_CHOICES, build_model, count_parameters


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    # Tiny tensors gain nothing from intra-op threads, and when another process holds a core each op
    # waits at an OpenMP barrier for a descheduled thread (measured: a small conv 250x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("in_channels, image_size", [(1, 28), (3, 32)])
def test_every_model_maps_a_batch_of_images_to_class_logits(name, in_channels, image_size):
    model = build_model(name, in_channels=in_channels, num_classes=7).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, in_channels, image_size, image_size))
    assert logits.shape == (2, 7)


def test_smallest_supported_input_of_8x8_works_with_every_norm():
    for norm in NORM_CHOICES:
        model = build_model("resnet18", norm=norm).eval()
        with torch.no_grad():
            assert model(torch.randn(1, 3, 8, 8)).shape == (1, 10)


@pytest.mark.parametrize("name, expected", [
    ("resnet8", 75_290),
    ("resnet20", 269_722),      # He et al. / akamaster: 0.27M
    ("resnet56", 853_018),      # He et al. / akamaster: 0.85M
    ("resnet18", 11_173_962),   # kuangliu/pytorch-cifar ResNet18
])
def test_parameter_count_matches_reference(name, expected):
    assert count_parameters(build_model(name, in_channels=3, num_classes=10, norm="batch")) == expected


def test_count_parameters_skips_frozen_parameters():
    model = build_model("resnet8")
    model.head.requires_grad_(False)
    assert count_parameters(model) == 75_290 - (64 * 10 + 10)


def test_norm_none_has_no_normalisation_layers_and_gives_convs_a_bias():
    model = build_model("resnet20", norm="none")
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in model.modules())
    assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))


def test_norm_group_uses_group_norm_with_8_groups_and_no_batch_norm():
    model = build_model("resnet50", norm="group")
    group_norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert group_norms and all(m.num_groups == 8 for m in group_norms)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_norm_batch_convs_have_no_bias():
    model = build_model("resnet18", norm="batch")
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))


def test_unknown_model_name_error_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model 'resnet9'") as error:
        build_model("resnet9")
    assert all(name in str(error.value) for name in MODEL_NAMES)


def test_unknown_norm_error_lists_valid_norms():
    with pytest.raises(ValueError, match="unknown norm 'layer'") as error:
        build_model("resnet8", norm="layer")
    assert all(norm in str(error.value) for norm in NORM_CHOICES)


def test_same_seed_builds_identical_weights():
    torch.manual_seed(0)
    first = build_model("resnet8").state_dict()
    torch.manual_seed(0)
    second = build_model("resnet8").state_dict()
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_resnet8_without_norm_overfits_a_tiny_batch():
    torch.manual_seed(0)
    model = build_model("resnet8", in_channels=3, num_classes=4, norm="none")
    # Small images: global pooling of larger noise images averages away most of what tells samples apart.
    images = torch.randn(16, 3, 8, 8)
    labels = torch.randint(0, 4, (16,))
    # residual branches start at zero without norm layers, so a larger step than with batch norm
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(30):
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]

"""Bad inputs (issue 37, item 6): nothing an allow-listed constructor would fetch or open runs before the allow-list
says yes: arguments that download or read files are refused (or, as a class's default, forced off) before the
constructor is called."""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from cfseg.builder import FETCH_ENV, UntrustedSpecError, build_network, check_spec, fetching_arguments
from cfseg.module import CFSegModule, load_checkpoint

CONFIG = Path(__file__).parent / "configs" / "tiny.yaml"
TINY_BACKBONE = yaml.safe_load(CONFIG.read_text())["model"]["backbone"]
HOVERNET = {"class_path": "monai.networks.nets.HoVerNet",
            "init_args": {"mode": "fast", "in_channels": 1, "out_classes": 2,
                          "pretrained_url": "https://example.invalid/preact-resnet50.pth"}}


class Fetched(AssertionError):
    pass


@pytest.fixture
def no_network(monkeypatch):
    """Every way a constructor could download fails loudly (and is recorded)."""
    calls: list[str] = []

    def fail(what):
        def f(*a, **k):
            calls.append(what)
            raise Fetched(f"{what} was called: a constructor tried to fetch {a[:1]}")
        return f

    import monai.apps.utils
    import monai.networks.nets.hovernet as hovernet
    import torch.hub

    monkeypatch.setattr(urllib.request, "urlopen", fail("urllib.request.urlopen"))
    monkeypatch.setattr(urllib.request, "urlretrieve", fail("urllib.request.urlretrieve"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fail("torch.hub.load_state_dict_from_url"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", fail("torch.hub.download_url_to_file"))
    monkeypatch.setattr(monai.apps.utils, "download_url", fail("monai.apps.utils.download_url"))
    monkeypatch.setattr(hovernet, "download_url", fail("hovernet.download_url"))
    monkeypatch.delenv(FETCH_ENV, raising=False)
    return calls


def _ckpt(path, backbone):
    """A real cfseg checkpoint whose backbone spec is replaced afterwards (as an attacker would)."""
    model = CFSegModule(class_names=["liver", "spleen"], backbone=dict(TINY_BACKBONE), feature_channels=8)
    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(ckpt)
    ckpt["hyper_parameters"]["backbone"] = backbone
    torch.save(ckpt, path)
    return path


def test_hovernet_checkpoint_with_pretrained_url_is_refused_before_any_download(tmp_path, no_network):
    path = _ckpt(tmp_path / "hovernet.ckpt", HOVERNET)
    with pytest.raises(UntrustedSpecError, match="pretrained_url='https://example.invalid/preact-resnet50.pth'"):
        load_checkpoint(str(path))
    assert no_network == []
    from cfseg.apps.segment import main as segment_main

    assert segment_main(["--ckpt", str(path), "--list-classes"]) == 2
    assert no_network == []
    # the check is on the string: nothing of the class was even looked at
    with pytest.raises(UntrustedSpecError, match="would fetch or open a file"):
        check_spec(HOVERNET)


@pytest.mark.parametrize("spec, argument", [
    ({"class_path": "monai.networks.nets.DenseNet121",
      "init_args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "pretrained": True}}, "pretrained"),
    ({"class_path": "monai.networks.nets.TorchVisionFCModel",
      "init_args": {"model_name": "resnet18", "weights": "DEFAULT"}}, "weights"),
    ({"class_path": "monai.networks.nets.UNet",
      "init_args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2],
                    "pretrained_path": "/etc/passwd"}}, "pretrained_path"),
    ({"class_path": "monai.networks.nets.UNet",
      "init_args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2],
                    "encoder_weights_url": "http://example.invalid/w.pth"}}, "encoder_weights_url"),
    ({"class_path": "monai.networks.nets.UNet",
      "init_args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2],
                    "act": ["prelu", {"init": "s3://bucket/key"}]}}, "act"),  # a URL under any name
], ids=["pretrained=True", "torchvision-weights", "pretrained_path", "any-url-argument", "nested-url"])
def test_fetching_arguments_are_refused_from_a_checkpoint(tmp_path, no_network, spec, argument):
    path = _ckpt(tmp_path / "fetch.ckpt", spec)
    with pytest.raises(UntrustedSpecError, match=f"{argument}=") as e:
        load_checkpoint(str(path))
    assert "would fetch or open a file" in str(e.value) and FETCH_ENV in str(e.value)
    with pytest.raises(UntrustedSpecError, match=f"{argument}="):
        build_network(spec)
    assert no_network == []


def test_own_network_reading_a_file_is_never_constructed(tmp_path, monkeypatch, no_network):
    (tmp_path / "own_nets.py").write_text(
        "import torch\nCALLS = []\nclass Net(torch.nn.Module):\n"
        "    def __init__(self, weights_path=None, cache_dir=None):\n"
        "        super().__init__()\n        CALLS.append(weights_path)\n"
        "        if weights_path: open(weights_path).read()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    secret = tmp_path / "secret.txt"
    secret.write_text("x")
    spec = {"class_path": "own_nets.Net", "init_args": {"weights_path": str(secret)}}
    with pytest.raises(UntrustedSpecError, match="weights_path="):
        build_network(spec, ["own_nets"])
    assert "own_nets" not in sys.modules  # refused on the string, before the import
    # the user, in the environment (never a file), lets constructors fetch
    monkeypatch.setenv(FETCH_ENV, "1")
    assert build_network(spec, ["own_nets"]) is not None
    assert sys.modules["own_nets"].CALLS == [str(secret)]
    monkeypatch.delenv(FETCH_ENV)
    assert isinstance(build_network(spec, ["own_nets"], allow_fetch=True), torch.nn.Module)


def test_fetching_defaults_are_forced_off_or_refused(no_network):
    # EfficientNetBN downloads ImageNet weights by default (pretrained=True): built with pretrained=False
    net = build_network({"class_path": "monai.networks.nets.EfficientNetBN",
                         "init_args": {"model_name": "efficientnet-b0", "spatial_dims": 2, "in_channels": 1,
                                       "num_classes": 2}})
    assert isinstance(net, torch.nn.Module) and no_network == []
    # Transchex reads a BERT from the hub by default, which cannot be turned off: refused before the constructor
    with pytest.raises(UntrustedSpecError, match="its default arguments path_or_repo_id='bert-base-uncased'"):
        build_network({"class_path": "monai.networks.nets.Transchex",
                       "init_args": {"in_channels": 3, "img_size": [32, 32], "patch_size": [16, 16],
                                     "num_classes": 2, "num_language_layers": 1, "num_vision_layers": 1,
                                     "num_mixed_layers": 1}})
    assert no_network == []


def test_arguments_that_do_not_fetch_pass():
    assert fetching_arguments({"use_checkpoint": True, "dropout_path_rate": 0.1, "pretrained": False,
                               "pretrained_url": None, "norm": "instance", "channels": [8, 16],
                               "hyena_l_cache": 32, "weights": [0.5, 0.5]}) == []
    assert fetching_arguments({"pretrained": True, "model_path": "m.pt", "x": "https://a/b", "cache_dir": "/tmp"}
                              ) == ["pretrained", "model_path", "x", "cache_dir"]
    check_spec(TINY_BACKBONE)

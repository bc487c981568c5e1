"""LoRA experts on a frozen network (cfseg.continual.experts) and the ``experts`` strategy end to end."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import UNet
from torch import nn

from cfseg.apps.cli import main as cli
from cfseg.continual import experts
from cfseg.evaluation import evaluate_datasets
from cfseg.module import load_checkpoint

CONFIG = Path(__file__).parent / "configs" / "tiny.yaml"
STAGE0 = ["liver", "spleen", "kidney_left", "kidney_right"]
STAGE1 = ["stomach", "aorta"]


@pytest.mark.parametrize("conv", [nn.Conv3d(3, 5, 3, padding=1), nn.ConvTranspose3d(4, 6, 3, stride=2, padding=1,
                                                                                     output_padding=1)])
def test_zero_initialised_expert_leaves_outputs_unchanged(conv):
    torch.manual_seed(0)
    x = torch.randn(2, conv.in_channels, 6, 5, 4)
    reference = conv(x)
    layer = experts.LoRAConv(conv, rank=2, alpha=1.0)
    assert layer.weight is conv.weight and layer.bias is conv.bias  # reused, same state-dict names
    assert layer.add_expert() == 1
    layer.active = 1
    assert torch.equal(layer(x), reference)
    layer.active = 0
    assert torch.equal(layer(x), reference)


@pytest.mark.parametrize("transposed", [False, True])
def test_expert_update_is_the_low_rank_weight_change(transposed):
    torch.manual_seed(1)
    conv = nn.ConvTranspose3d(4, 6, 3, stride=2, padding=1) if transposed else nn.Conv3d(4, 6, 3, padding=1)
    layer = experts.LoRAConv(conv, rank=3, alpha=6.0)
    layer.add_expert()
    with torch.no_grad():
        layer.lora_up[0].normal_()
    layer.active = 1
    x = torch.randn(1, 4, 5, 5, 5)
    w = conv.weight + 2.0 * (layer.lora_up[0] @ layer.lora_down[0]).view_as(conv.weight)  # alpha / r = 2
    expected = F.conv_transpose3d(x, w, conv.bias, 2, 1) if transposed else F.conv3d(x, w, conv.bias, padding=1)
    torch.testing.assert_close(layer(x), expected)
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected)  # merged weight, cached
        layer.lora_up[0].zero_()  # a changed factor invalidates the cached merge
        torch.testing.assert_close(layer(x), conv(x))
    # a second expert copies the first one's factors
    assert layer.add_expert(init_from=1) == 2 and torch.equal(layer.lora_down[1], layer.lora_down[0])


def unet():
    return UNet(3, 1, 16, [16, 32, 64, 128, 256], [2, 2, 2, 2], num_res_units=0)


def test_attach_to_decoder_by_name_and_count_parameters():
    net = nn.Module()
    net.backbone = unet()
    keys = set(net.state_dict())
    names = experts.attach_lora(net, experts.DECODER_EXPERT_LAYERS, rank=4, alpha=4.0)
    assert len(names) == 4 and all(n.endswith(".2.conv") for n in names)  # the four up-sampling convolutions
    assert keys <= set(net.state_dict())  # the shared weights keep their names
    per_expert = experts.expert_parameter_count(net, 4, experts.DECODER_EXPERT_LAYERS)
    experts.add_expert(net)
    assert sum(p.numel() for p in experts.expert_parameters(net, 1)) == per_expert
    assert per_expert < 0.05 * sum(p.numel() for p in unet().parameters())
    assert experts.attach_lora(net, experts.DECODER_EXPERT_LAYERS, 4, 4.0) == names  # idempotent
    with pytest.raises(ValueError, match="matches no convolution"):
        experts.attach_lora(net, [r"backbone\.nothing"], 4, 4.0)


def test_unset_layout_keeps_the_checkpoints_experts_else_the_default():
    from types import SimpleNamespace

    module = SimpleNamespace(head=nn.Linear(2, 2))  # a head with a projection weight
    fresh = experts.Experts().layout(module)
    assert fresh == {"layers": list(experts.EVERY_CONV_LAYERS), "rank": experts.DEFAULT_EXPERT_RANK,
                     "alpha": float(experts.DEFAULT_EXPERT_RANK), "projection": True}
    decoder = {"layers": list(experts.DECODER_EXPERT_LAYERS), "rank": 4, "alpha": 4.0, "projection": True}
    assert experts.Experts().layout(module, decoder) == decoder  # a checkpoint with decoder experts continues so
    asked = experts.Experts(rank=8).layout(module, decoder)  # an explicit setting is kept (setup then refuses it)
    assert asked["rank"] == 8 and asked["alpha"] == 4.0 and asked["layers"] == decoder["layers"]
    assert experts.Experts().lr_factor == 4.0


def test_shared_prefix_runs_the_encoder_once_per_input():
    torch.manual_seed(0)
    net = nn.Module()
    net.backbone = unet()
    experts.attach_lora(net, experts.DECODER_EXPERT_LAYERS, 4, 4.0)
    for _ in range(2):
        e = experts.add_expert(net)
        with torch.no_grad():
            for p in experts.expert_parameters(net, e):
                p.normal_(std=0.1)
    net.eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        plain = []
        for e in range(3):
            with experts.active_expert(net, e):
                plain.append(net.backbone(x))
        assert not torch.allclose(plain[0], plain[1])
        with experts.shared_prefix_cache(net.backbone) as cache:
            cached = []
            for e in range(3):
                with experts.active_expert(net, e):
                    cached.append(net.backbone(x))
    assert cache.hits > 0
    for a, b in zip(plain, cached, strict=True):
        assert torch.equal(a, b)
    with experts.shared_prefix_cache(net.backbone) as cache:  # with gradients nothing is reused
        net.backbone(x)
        net.backbone(x)
    assert cache.hits == 0


def ds(path, classes=None, **kw):
    return {"path": str(path), "val_fraction": 0.25, "test_fraction": 0.25, "classes": classes, **kw}


def fit(tmp_path, datasets, *extra):
    return cli(["fit", "--config", str(CONFIG), f"--data.datasets={json.dumps(datasets)}",
                f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.default_root_dir={tmp_path}",
                "--model.statistics.router_batches=8", *extra])


@pytest.fixture(scope="module")
def ct_stage0(tiny_phantoms, tmp_path_factory):
    run = fit(tmp_path_factory.mktemp("experts0"), [ds(tiny_phantoms[0], STAGE0)])
    return Path(run.trainer.checkpoint_callback.best_model_path)


def test_experts_stage_freezes_the_shared_network_and_round_trips(ct_stage0, tiny_phantoms, tmp_path):
    teacher = load_checkpoint(str(ct_stage0))
    assert teacher.router is not None and teacher.router.n_experts == 1  # stage 0 keeps router statistics
    run = fit(tmp_path, [ds(tiny_phantoms[0], STAGE1)], f"--model.previous_checkpoint={ct_stage0}",
              "--model.strategy=experts")
    model = run.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # expert 1 = slot 0 of the decoder's LoRA factors and of the projection copies
    assert "net.expert_projection.copies.0" in trainable
    assert all((".lora_" in n or "expert_projection" in n) and n.endswith(".0") for n in trainable)
    shared = teacher.net.state_dict()
    after = model.net.state_dict()
    for k, v in shared.items():  # the frozen weights are bit-identical after training
        assert torch.equal(after[k], v), k
    assert any(not torch.equal(after[k], torch.zeros_like(after[k])) for k in after if "lora_up" in k)
    ckpt = run.trainer.checkpoint_callback.best_model_path
    loaded = load_checkpoint(ckpt)
    assert loaded.n_experts == 2 and [r["classes"] for r in loaded.expert_records] == [STAGE0, STAGE1]
    idx = [loaded.bank.index(c) for c in STAGE0 + STAGE1]
    assert loaded.expert_plan(idx) == {0: idx[:4], 1: idx[4:]}  # each class from the stage that added it
    model.eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
        # a class of stage 0 gets exactly the stage-0 network's output
        liver = loaded.bank.index("liver")
        torch.testing.assert_close(loaded(x, [liver]), teacher(x, [liver]))
    assert loaded.router.n_experts == 2


def test_router_picks_the_expert_of_each_modality(ct_stage0, tiny_phantoms, tmp_path):
    mri = ds(tiny_phantoms[1], STAGE0, domain="mri")
    run = fit(tmp_path, [mri], f"--model.previous_checkpoint={ct_stage0}", "--model.strategy=experts")
    _trained_the_default_layers(run)
    model = load_checkpoint(run.trainer.checkpoint_callback.best_model_path)
    assert [r["domains"] for r in model.expert_records] == [["ct"], ["mri"]] and model.can_route
    for path, expected in ((tiny_phantoms[0], 0), (tiny_phantoms[1], 1)):
        res = evaluate_datasets(model, [ds(path, STAGE0)], split="all")
        assert res["routing_accuracy"] == 1.0
        assert model.last_route["expert"] == expected
    model.route_override = 0  # --expert: one expert for every class, no routing
    res = evaluate_datasets(model, [ds(tiny_phantoms[1], STAGE0)], split="all")
    assert "routing_accuracy" not in res
    model.route_override = None
    # the modality router: fitted on the neutral view of the training cases of stage 0 (CT) and this stage (MRI)
    assert model.modality_router.names == ["ct", "mri"] and model.modality_router.view["modality"] == "neutral"
    assert model.modality_router.ridge.n_samples[0] > 0 and model.modality_router.ridge.n_samples[1] > 0
    _segment_answers_the_modality(model, tiny_phantoms)


def _trained_the_default_layers(run):
    """The experts stage on the new modality trained exactly the LoRA factors of the layers ``Experts()``'s default
    names (and the expert's projection), every one of them moved, at the default learning-rate factor."""
    module, default = run.model, experts.Experts()
    names = experts.resolve_expert_layers(module.net, default.layout(module)["layers"])
    convs = {n: m for n, m in experts.lora_layers(module.net).items() if isinstance(m, experts.LoRAConv)}
    assert names and set(convs) == set(names)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    expected = {f"net.{n}.lora_{k}.0" for n in names for k in ("up", "down")} | {"net.expert_projection.copies.0"}
    assert trainable == expected
    for n in names:  # each expert's up factor starts at zero: non-zero means the layer learnt on the MRI stage
        assert convs[n].lora_up[0].abs().sum() > 0, n
    h = module.hparams
    lr = run.trainer.optimizers[0].param_groups[0]["initial_lr"]
    assert lr == pytest.approx(h.lr * h.incremental_lr_factor * default.lr_factor)


def _segment_answers_the_modality(model, tiny_phantoms):
    """Without ``--modality`` the router names each phantom's modality; a CT stored without its HU offset (+1024:
    the intensity rule reads it as MRI; the neutral view does not see an offset) is refused with both answers."""
    import nibabel as nib
    import numpy as np

    from cfseg.segmentation import SegmentError, segment

    for site, expected in ((tiny_phantoms[0], "ct"), (tiny_phantoms[1], "mri")):
        for path in sorted((site / "imagesTr").glob("*.nii.gz")):
            said: list[tuple[str, str]] = []
            segment(str(path), model, notify=lambda level, msg, said=said: said.append((level, msg)))
            infos = [m for lv, m in said if lv == "info" and "modality" in m]
            assert f"modality {expected} (router: " in infos[0] and "the intensity rule agrees" in infos[0], said
            assert not [m for lv, m in said if lv == "warning"], said
    ct = nib.load(str(sorted((tiny_phantoms[0] / "imagesTr").glob("*.nii.gz"))[0]))
    shifted = nib.Nifti1Image(np.asarray(ct.dataobj, dtype=np.float32) + 1024.0, ct.affine)
    with pytest.raises(SegmentError, match="the modality router says ct .* but the intensity rule says mri .*"
                                           "--modality ct or --modality mri"):
        segment(shifted, model)
    assert segment(shifted, model, modality="ct")  # the user's answer resolves it
    said = []  # a given modality is used as given: the router is not asked
    segment(str(sorted((tiny_phantoms[0] / "imagesTr").glob("*.nii.gz"))[0]), model, modality="ct",
            notify=lambda level, msg: said.append((level, msg)))
    assert any("modality ct (given)" in m for lv, m in said), said

"""The multi-stage protocol (cfseg-protocol): budgets, seeds, shared stage 0, summary.json, validation-only data."""

import csv
import json
import statistics
from pathlib import Path

import pytest
import torch
import yaml

from cfseg.apps.protocol import main, run_protocol
from cfseg.data.datamodule import SegDataModule
from cfseg.experiments.protocol import load_protocol
from cfseg.module import CFSegModule, load_checkpoint

CONFIG = Path(__file__).parent / "configs" / "tiny.yaml"
FAST = {"data": {"spacing": [4.0, 4.0, 4.0]}, "trainer": {"limit_val_batches": 1.0}}


def box(boxes, classes=None, val=0.0):
    return {"path": str(boxes), "val_fraction": val, "test_fraction": 0.34, "classes": classes}


def write_spec(tmp_path, **spec) -> Path:
    path = tmp_path / "protocol.yaml"
    path.write_text(yaml.safe_dump({"base_config": str(CONFIG), "output": str(tmp_path / "out"), **spec}))
    return path


def test_protocol_writes_matrices_and_beats_an_untrained_model(boxes, tmp_path):
    spec_path = write_spec(
        tmp_path, strategies=["distill", "finetune", "joint"], max_steps=40, lr=0.01, config=FAST,
        stages=[{"name": "s0", "datasets": [box(boxes, ["liver", "spleen"])]},
                {"name": "s1", "classes": ["aorta"], "datasets": [box(boxes)], "unlabeled": [box(boxes)]}])
    res = run_protocol(load_protocol(spec_path))[0]
    out = tmp_path / "out" / "seed0"
    for s in ("distill", "finetune", "joint"):
        R = res[s]["R"]
        assert len(R) == 2 and len(R[0]) == 1 and len(R[1]) == 2
        assert all(0 <= v <= 1 for row in R for v in row)
        assert res[s]["bwt"] == pytest.approx(R[1][0] - R[0][0])
        assert (out / f"{s}_matrix.png").stat().st_size > 1000
        assert (out / f"{s}_matrix.csv").read_text().startswith("after_stage,test_s0,test_s1")
    assert res["distill"]["R"][0] == res["finetune"]["R"][0] == res["joint"]["R"][0]  # stage 0 trained once, shared
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["strategies"].keys() == {"distill", "finetune", "joint"}
    # training did something: stage 0 and the distilled stage 1 beat an untrained model on the same test cases
    from cfseg.evaluation import evaluate_datasets

    trained = load_checkpoint(str(out / "runs" / "distill_stage1" / "final.ckpt"))
    untrained = CFSegModule(class_names=trained.class_names, backbone=trained.hparams.backbone, feature_channels=8,
                            preprocessing=trained.preprocessing)
    chance = [evaluate_datasets(untrained, [box(boxes)], classes=c)["mean_dice"]
              for c in (["liver", "spleen"], ["aorta"])]
    print("protocol R", res["distill"]["R"], "untrained", chance)
    assert res["distill"]["R"][0][0] > chance[0] + 0.1
    assert res["distill"]["R"][1][1] > chance[1] + 0.1
    distill, finetune = (torch.load(out / "runs" / f"{s}_stage1" / "final.ckpt", weights_only=True)["state_dict"]
                         for s in ("distill", "finetune"))
    assert not torch.equal(distill["net.head.weight"], finetune["net.head.weight"])
    # a later invocation for one strategy reuses the checkpoints and keeps the others in the summary
    again = run_protocol(load_protocol(spec_path), ["finetune"])[0]
    assert again["finetune"]["R"] == res["finetune"]["R"]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["strategies"].keys() == \
        {"distill", "finetune", "joint"}
    # a changed budget is not silently served by the old checkpoints
    spec = load_protocol(spec_path)
    spec["stage_steps"] = [40, 30]
    with pytest.raises(ValueError, match="max_steps=40.*max_steps=30"):
        run_protocol(spec, ["finetune"])


def _metrics_columns(run_dir: Path) -> set[str]:
    with open(next(run_dir.rglob("metrics.csv"))) as f:
        return {k for row in csv.DictReader(f) for k, v in row.items() if v}


def test_budgets_seeds_summary_and_old_classes_in_validation(boxes, tmp_path):
    """Stage budgets reach the runs, joint gets the cumulative budget, two seeds merge into one summary.json."""
    spec_path = write_spec(
        tmp_path, strategies=["finetune", "joint"], seeds=[0, 1], lr=0.01, config=FAST, score_val=True,
        summary_copy=str(tmp_path / "copy" / "summary.json"),
        stages=[{"name": "s0", "max_steps": 3, "datasets": [box(boxes, ["liver", "spleen"], val=0.34)]},
                {"name": "s1", "max_steps": 2, "lr_factor": 0.5, "classes": ["aorta"],
                 "datasets": [box(boxes, val=0.34)]}])
    assert main(["--config", str(spec_path), "--strategies", "finetune"]) == 0
    out = tmp_path / "out"
    for seed in (0, 1):
        runs = out / f"seed{seed}" / "runs"
        stage0 = torch.load(runs / "stage0" / "final.ckpt", weights_only=True)
        fin = torch.load(runs / "finetune_stage1" / "final.ckpt", weights_only=True)
        assert (stage0["global_step"], stage0["hyper_parameters"]["lr"]) == (3, 0.01)
        assert (fin["global_step"], fin["hyper_parameters"]["lr"]) == (2, 0.005)  # the stage's own budget
        config = json.loads((runs / "finetune_stage1" / "final.json").read_text())["config"]
        assert config["model"]["previous_checkpoint"] == str(runs / "stage0" / "final.ckpt")  # the seed's own stage 0
        assert config["seed_everything"] == seed and config["data"]["seed"] == seed
        # validation in stage 1 scores the stage-0 classes too (validation-only datasets of stage 0)
        cols = _metrics_columns(runs / "finetune_stage1")
        assert {"val/dice_liver", "val/dice_spleen", "val/dice_aorta"} <= cols
    # joint in a second invocation, one seed: reuses the seed's stage 0 and trains on the cumulative budget
    assert main(["--config", str(spec_path), "--strategies", "joint", "--seeds", "0"]) == 0
    joint = torch.load(out / "seed0" / "runs" / "joint_stage1" / "final.ckpt", weights_only=True)
    assert (joint["global_step"], joint["hyper_parameters"]["lr"]) == (3 + 2, 0.01)
    assert not (out / "seed1" / "runs" / "joint_stage1").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads((tmp_path / "copy" / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["strategies"].keys() == {"finetune", "joint"}
    for name, steps, seeds in (("finetune", [3, 2], {"0", "1"}), ("joint", [3, 5], {"0"})):
        s = summary["strategies"][name]
        assert s["stage_steps"] == steps and set(s["per_seed"]) == seeds
        for key in ("average_dice", "bwt"):
            assert s[key] == pytest.approx(statistics.fmean(v[key] for v in s["per_seed"].values()))
        for v in s["per_seed"].values():
            assert len(v["matrix"]) == 2 and v["average_dice"] == pytest.approx(statistics.fmean(v["matrix"][1]))
            assert set(v["per_class_dice"]) == {"s0", "s1"} and set(v["per_class_dice"]["s1"]) == {"aorta"}
            # score_val: the same matrix on the validation cases, the numbers settings are chosen on
            assert [len(r) for r in v["matrix_val"]] == [1, 2]
            assert v["average_dice_val"] == pytest.approx(statistics.fmean(v["matrix_val"][1]))
            assert v["bwt_val"] == pytest.approx(v["matrix_val"][1][0] - v["matrix_val"][0][0])
            assert set(v["per_class_dice_val"]["s1"]) == {"aorta"}  # per class on validation, after the last stage
        assert s["average_dice_val"] == pytest.approx(statistics.fmean(v["average_dice_val"]
                                                                       for v in s["per_seed"].values()))
        assert s["wall_time_s"] > 0
    rows = [summary["strategies"][n]["per_seed"]["0"]["matrix"][0] for n in ("finetune", "joint")]
    assert rows[0] == rows[1]  # both strategies start from the same stage-0 model of a seed
    # a finished run is reused only for the settings it was trained with (not only the same budget and lr)
    record = json.loads((out / "seed0" / "runs" / "finetune_stage1" / "final.json").read_text())
    assert record["config"]["model"]["strategy"]["class_path"] == "cfseg.continual.Finetune"
    assert record["config"]["trainer"]["max_steps"] == 2
    spec = load_protocol(spec_path)
    spec["config"]["model"] = {"weight_decay": 0.001}  # acts in every run, stage 0 included
    with pytest.raises(ValueError, match=r"stage0/final.ckpt was trained with other settings.*"
                                         r"model.weight_decay: trained with 1e-05, now 0.001"):
        run_protocol(spec, ["finetune"], seeds=[0])
    spec = load_protocol(spec_path)
    spec["strategies"] = [{**spec["strategies"][0], "config": {"data": {"batch_size": 1}}}]
    with pytest.raises(ValueError, match=r"finetune_stage1/final.ckpt.*data.batch_size: trained with 2, now 1"):
        run_protocol(spec, ["finetune"], seeds=[0])
    # the same protocol again: every run is reused, nothing retrains
    spec = load_protocol(spec_path)
    assert run_protocol(spec, ["finetune"], seeds=[0])[0]["finetune"]["R"] == \
        summary["strategies"]["finetune"]["per_seed"]["0"]["matrix"]


def test_effective_settings_compare_only_what_acts_in_the_stage():
    """A first stage compares its strategy's class only (a shared stage 0 stays reusable when a distillation
    setting changes) and no incremental_lr_factor; an incremental stage compares the full spec, defaults resolved."""
    from cfseg.checkpoint import effective_settings
    from cfseg.module import DEFAULT_BACKBONE

    distill = {"class_path": "cfseg.continual.Distill", "init_args": {"kd_weight": 7.0}}
    first = effective_settings({"strategy": distill, "incremental_lr_factor": 0.5, "lr": 0.1}, DEFAULT_BACKBONE)
    assert first["strategy"] == {"class_path": "cfseg.continual.Distill"} and "incremental_lr_factor" not in first
    assert first["lr"] == 0.1 and first["backbone"] == DEFAULT_BACKBONE
    later = effective_settings({"strategy": distill, "previous_checkpoint": "a.ckpt", "incremental_lr_factor": 0.5,
                                "statistics": {"router_batches": 0}}, DEFAULT_BACKBONE)
    assert later["strategy"]["init_args"]["kd_weight"] == 7.0 and later["incremental_lr_factor"] == 0.5
    assert later["strategy"]["init_args"]["pseudo_dice_weight"] == 0.1  # None resolves as the stage ran it
    assert later["statistics"]["router_batches"] == 0 and later["statistics"]["fisher_batches"] == 8
    short = effective_settings({"strategy": "distill", "previous_checkpoint": "a.ckpt"}, DEFAULT_BACKBONE)
    assert short["strategy"]["init_args"]["kd_weight"] == 10.0  # a short name is the strategy's defaults


def test_validation_only_datasets_add_cases_not_classes(boxes):
    train = {**box(boxes, ["aorta"], val=0.34), "name": "train"}
    old = {**box(boxes, ["liver", "spleen"], val=0.34), "name": "old", "val_only": True}
    dm = SegDataModule([train, old], classes=["liver", "spleen", "aorta"], spacing=(4.0, 4.0, 4.0), cache="none")
    by_name = {d.name: d for d in dm.datasets}
    assert dm.items(by_name["old"], "train") == [] and dm.items(by_name["old"], "test") == []
    assert len(dm.split_dataset("train")) == len(dm.items(by_name["train"], "train")) > 0
    val = dm.items(by_name["old"], "val")
    assert val and all(it["annotated"].tolist() == [True, True, True, False] for it in val)
    assert len(dm.split_dataset("val")) == 2 * len(val)
    assert "validation-only" in dm.summary()
    # no new classes from a validation-only dataset: without them in the class list it is refused
    with pytest.raises(ValueError, match="val_only.*'liver', 'spleen'"):
        SegDataModule([train, old], spacing=(4.0, 4.0, 4.0), cache="none")
    assert SegDataModule([train], spacing=(4.0, 4.0, 4.0), cache="none").class_names == ["aorta"]


@pytest.mark.parametrize(("change", "match"), [
    ({"config": {"trainer": {"max_steps": 5}}}, "config: trainer.max_steps is set by the protocol; use max_steps"),
    ({"stages": [{"datasets": ["x"], "config": {"model": {"lr": 0.1}}}]}, r"stages\[0\].config: model.lr.*lr_factor"),
    ({"fit_args": ["--trainer.precision=bf16-mixed"]}, "fit_args .command-line strings. are gone"),
    ({"config": {"optimizer": {}}}, "config overrides are a mapping of"),
    ({"strategies": [{"name": "d", "strategy": {"class_path": "os.system"}}]}, r"strategies\[0\].strategy.*refusing"),
    ({"strategies": [{"name": "d", "strategy": "distill", "stage_fit_args": {}}]}, "stage_fit_args .* are gone"),
    ({"stages": [{"datasets": ["x"], "lr_factor": -1}]}, r"stages\[0\].lr_factor"),
    ({"stages": [{"datasets": ["x"], "max_steps": 0}]}, r"stages\[0\].max_steps"),
    ({"strategies": ["distill", {"name": "d2", "strategy": "nope"}]}, r"strategies\[1\].strategy 'nope'"),
    ({"seeds": []}, "seeds must be a non-empty list"),
])
def test_bad_protocol_keys_are_named(tmp_path, change, match):
    spec = {"stages": [{"datasets": ["x"]}], "max_steps": 4, **change}
    with pytest.raises(ValueError, match=match):
        load_protocol(write_spec(tmp_path, **spec))


def test_lr_factor_needs_model_lr(tmp_path):
    base = yaml.safe_load(CONFIG.read_text())
    base["optimizer"] = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {"base_config": str(tmp_path / "base.yaml"), "stages": [{"datasets": ["x"], "lr_factor": 0.5}]}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match="optimizer block"):
        load_protocol(tmp_path / "p.yaml")
    spec["stages"][0].pop("lr_factor")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(spec))
    assert load_protocol(tmp_path / "p.yaml")["stage_lr"] == [None]


def test_workers_run_strategies_side_by_side_after_one_stage0(boxes, tmp_path):
    """--workers: stage 0 once in the parent, the strategies in child processes, the same summary files."""
    spec_path = write_spec(
        tmp_path, strategies=["finetune", "joint"], lr=0.01, config=FAST, full_matrix=True,
        stages=[{"name": "s0", "max_steps": 3, "datasets": [box(boxes, ["liver", "spleen"])]},
                {"name": "s1", "max_steps": 2, "classes": ["liver"], "datasets": [box(boxes)]}])
    assert main(["--config", str(spec_path), "--workers", "2"]) == 0
    out = tmp_path / "out" / "seed0"
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["finetune_stage1", "joint_stage1", "stage0"]
    for name in ("finetune", "joint"):
        assert "reusing" in (out / f"{name}.log").read_text()  # the children reuse the parent's stage 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["strategies"].keys() == {"finetune", "joint"}
    assert summary["strategies"]["joint"]["stage_steps"] == [3, 5]
    rows = [summary["strategies"][n]["per_seed"]["0"]["matrix"][0] for n in ("finetune", "joint")]
    assert rows[0] == rows[1] and len(rows[0]) == 2  # full_matrix: stage 0's model on stage 1's test cases too
    fin = summary["strategies"]["finetune"]["per_seed"]["0"]
    assert fin["bwt"] == pytest.approx(fin["matrix"][1][0] - fin["matrix"][0][0])


def test_experts_train_only_an_expert_and_replay_reuses_a_fraction(boxes, tmp_path):
    spec_path = write_spec(
        tmp_path, strategies=["experts", "replay", "ewc"], max_steps=6, lr=0.01, config=FAST, replay_fraction=0.5,
        stages=[{"name": "s0", "datasets": [box(boxes, ["liver", "spleen"])]},
                {"name": "s1", "datasets": [box(boxes, ["aorta"])]}])
    res = run_protocol(load_protocol(spec_path))[0]
    experts = res["experts"]
    assert len(experts["R"]) == 2 and "routing_accuracy" not in experts  # one domain: nothing to route
    stage0, stage1 = experts["params"]
    assert stage0["trainable"] == stage0["total"] and stage1["total"] == stage0["total"] + stage1["trainable"]
    run = tmp_path / "out" / "seed0" / "runs"
    config = json.loads((run / "replay_stage1" / "final.json").read_text())["config"]
    replayed = [d for d in config["data"]["datasets"] if d.get("train_fraction") == 0.5]
    assert len(replayed) == 1 and replayed[0]["classes"] == ["liver", "spleen"]
    assert config["model"]["strategy"] == {"class_path": "cfseg.continual.Replay", "init_args": {"fraction": 0.5}}
    model = load_checkpoint(str(run / "experts_stage1" / "final.ckpt"))
    assert model.n_experts == 2 and model.expert_records[1]["classes"] == ["aorta"]
    from cfseg.continual.experts import DEFAULT_EXPERT_LAYERS, DEFAULT_EXPERT_RANK, expert_parameter_count

    # only the new expert trained: the default layout's LoRA factors (every convolution) + its copy of the projection
    assert model.expert_layout["rank"] == DEFAULT_EXPERT_RANK
    assert stage1["trainable"] == expert_parameter_count(model.net, DEFAULT_EXPERT_RANK, DEFAULT_EXPERT_LAYERS,
                                                         projection=True)
    # ewc: stage 0 stores its Fisher, the ewc stage is penalised towards stage 0 and accumulates the Fisher
    f0 = load_checkpoint(str(run / "stage0" / "final.ckpt")).ewc_fisher
    ewc = load_checkpoint(str(run / "ewc_stage1" / "final.ckpt"))
    assert set(f0) == {n for n, _ in ewc.net.named_parameters()}
    assert all((ewc.ewc_fisher[n] >= f0[n]).all() for n in f0) and any((ewc.ewc_fisher[n] > f0[n]).any() for n in f0)
    assert "train/ewc_step" in _metrics_columns(run / "ewc_stage1")


def test_stage_settings_reach_one_stage_of_one_row(boxes, tmp_path):
    """A row's ``stages`` settings go to the named incremental stage only, over its strategy's init_args; bad
    entries are named."""
    stages = [{"name": "s0", "datasets": [box(boxes, ["liver", "spleen"])]},
              {"name": "s1", "datasets": [box(boxes, ["aorta"])]},
              {"name": "s2", "datasets": [box(boxes, ["liver", "spleen"])]}]
    row = {"name": "sched", "strategy": {"class_path": "cfseg.continual.Distill", "init_args": {"kd_weight": 2.0}},
           "stages": {"s1": {"kd_weight": 0.0}}}
    spec = load_protocol(write_spec(tmp_path, strategies=["distill", row], max_steps=1, lr=0.01, config=FAST,
                                    stages=stages))
    assert spec["strategies"][0]["stages"] == {}  # the other rows keep their settings
    res = run_protocol(spec, ["sched"])[0]["sched"]
    run = tmp_path / "out" / "seed0" / "runs"
    kd = [load_checkpoint(str(run / f"sched_stage{i}" / "final.ckpt")).hparams.strategy["init_args"]["kd_weight"]
          for i in (1, 2)]
    assert kd == [0.0, 2.0]  # s1: its stage settings over the row's init_args; s2: the row's init_args
    assert res["stages_settings"] == {"s1": {"kd_weight": 0.0}}
    for bad, match in (([{"kd_weight": 0}], "maps an incremental stage's name"),
                       ({"s0": {"kd_weight": 0}}, "'s0' is not an incremental stage"),
                       ({"s1": {"lr": 0.1}}, r"stages.s1: .*unexpected keyword argument 'lr'")):
        with pytest.raises(ValueError, match=match):
            load_protocol(write_spec(tmp_path, stages=stages, max_steps=2, strategies=[{**row, "stages": bad}]))
    with pytest.raises(ValueError, match="trains one model per stage from scratch"):
        load_protocol(write_spec(tmp_path, stages=stages, max_steps=2,
                                 strategies=[{"name": "j", "strategy": "joint", "stages": {"s1": {}}}]))


def test_joint_diagnostic_scales_the_last_joint_budget(boxes, tmp_path):
    """benchmarks/openkbp/joint_diagnostic.py: the protocol's last joint run with its steps scaled, scored per stage."""
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "openkbp" / "joint_diagnostic.py"
    spec = importlib.util.spec_from_file_location("joint_diagnostic", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    spec_path = write_spec(
        tmp_path, strategies=["joint"], lr=0.01, config=FAST,
        stages=[{"name": "s0", "max_steps": 2, "datasets": [box(boxes, ["liver", "spleen"], val=0.34)]},
                {"name": "s1", "max_steps": 2, "classes": ["aorta"], "datasets": [box(boxes, val=0.34)]}])
    summary = tmp_path / "joint_diagnostic.json"
    res = mod.main(["--config", str(spec_path), "--steps", "1.5", "--lr-factor", "0.5", "--tag", "jd",
                    "--summary", str(summary)])
    run = tmp_path / "out" / "seed0" / "runs" / "jd"
    ckpt = torch.load(run / "final.ckpt", weights_only=True)
    assert (res["steps"], res["lr"]) == (6, 0.005) == (ckpt["global_step"], ckpt["hyper_parameters"]["lr"])
    assert ckpt["hyper_parameters"]["class_names"] == ["liver", "spleen", "aorta"]  # every stage's classes at once
    saved = json.loads((run / "diagnostic.json").read_text())
    merged = json.loads(summary.read_text())
    assert merged["runs"]["jd"]["0"] == saved and "--steps 1.5" in merged["commands"]["jd"]["0"]
    for split in ("test", "val"):
        assert len(saved[split]["row"]) == 2 and all(0 <= v <= 1 for v in saved[split]["row"])
        assert saved[split]["average_dice"] == pytest.approx(statistics.fmean(saved[split]["row"]))
        assert set(saved[split]["per_class"]) == {"s0", "s1"}

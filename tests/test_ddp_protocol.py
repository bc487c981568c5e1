"""cfseg-protocol with a row that trains on two processes (DDP, 2 CPU processes, gloo): the stage runs as its own
training process, the protocol stays one process (each evaluation, matrix and summary written once), and the
decision which stages run apart, the launcher and the refusals when started as one of several processes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cfseg.apps.protocol import main, one_process_check, own_process
from cfseg.experiments.protocol import load_protocol

CONFIG = Path(__file__).parent / "configs" / "tiny.yaml"
FAST = {"data": {"spacing": [4.0, 4.0, 4.0]}, "trainer": {"limit_val_batches": 1.0}}
DDP = {"trainer": {"devices": 2, "strategy": "ddp", "accelerator": "cpu"}}
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def box(boxes, classes=None, val=0.34):
    return {"path": str(boxes), "val_fraction": val, "test_fraction": 0.34, "classes": classes}


def write_spec(tmp_path, boxes, strategies, **spec) -> Path:
    path = tmp_path / "protocol.yaml"
    path.write_text(yaml.safe_dump({
        "base_config": str(CONFIG), "output": str(tmp_path / "out"), "strategies": strategies, "lr": 0.01,
        "config": FAST, "stages": [{"name": "s0", "max_steps": 3, "datasets": [box(boxes, ["liver", "spleen"])]},
                                   {"name": "s1", "max_steps": 2, "classes": ["aorta"], "datasets": [box(boxes)]}],
        **spec}))
    return path


def test_a_ddp_row_trains_its_stage_as_its_own_process_and_the_protocol_runs_once(boxes, tmp_path):
    spec = write_spec(tmp_path, boxes, ["finetune", {"name": "finetune_ddp", "strategy": "finetune", "config": DDP}])
    r = subprocess.run([sys.executable, "-m", "cfseg.apps.protocol", "--config", str(spec)], capture_output=True,
                       text=True, timeout=600, cwd=tmp_path)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    out = tmp_path / "out"
    for name in ("finetune", "finetune_ddp"):  # each stage's evaluation printed once: one runner
        assert r.stdout.count(f"[seed 0 {name}] after s1:") == 1, r.stdout
    assert r.stdout.count("wrote ") == 1 and r.stdout.count("cfseg.apps.protocol --train-stage") == 1
    runs = out / "seed0" / "runs"
    records = {tag: json.loads((runs / tag / "final.json").read_text())
               for tag in ("stage0", "finetune_stage1", "finetune_ddp_stage1")}
    assert sorted(p.parent.name for p in runs.rglob("final.json")) == sorted(records)
    for tag, steps, world in (("stage0", 3, 1), ("finetune_stage1", 2, 1), ("finetune_ddp_stage1", 2, 2)):
        rec = records[tag]
        print(tag, "global_step", rec["global_step"], "world_size", rec["world_size"], "wall", rec["wall_time_s"])
        assert (rec["global_step"], rec["steps"], rec["world_size"]) == (steps, steps, world)
    ddp = records["finetune_ddp_stage1"]["config"]["trainer"]  # the resolved configuration it trained with
    assert (ddp["devices"], ddp["strategy"]) == (2, "ddp")
    assert not list(tmp_path.rglob("*.tmp"))
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["strategies"]
    assert rows.keys() == {"finetune", "finetune_ddp"}
    assert rows["finetune"].keys() == rows["finetune_ddp"].keys()
    one, two = rows["finetune"]["per_seed"]["0"], rows["finetune_ddp"]["per_seed"]["0"]
    assert one.keys() == two.keys()
    assert [len(r) for r in one["matrix"]] == [len(r) for r in two["matrix"]] == [1, 2]
    assert one["matrix"][0] == two["matrix"][0]  # the shared stage 0
    # run again: every run is reused (the DDP stage's record holds its resolved configuration), nothing trains
    again = subprocess.run([sys.executable, "-m", "cfseg.apps.protocol", "--config", str(spec)],
                           capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert again.stdout.count("reusing") == 3 and "cfseg fit" not in again.stdout


@pytest.mark.parametrize("trainer,launcher,own", [
    ({"devices": 1}, None, False),
    ({"devices": "auto", "accelerator": "cpu"}, None, False),
    ({"devices": -1, "accelerator": "cpu"}, None, False),
    ({"devices": [0]}, None, False),
    ({"devices": 2, "strategy": "ddp"}, None, True),
    ({"devices": "2"}, None, True),
    ({"devices": [0, 1]}, None, True),
    ({"devices": "0,1"}, None, True),
    ({"devices": 1}, ["srun", "python", "-m"], True),
    ({"devices": 4, "num_nodes": 2}, ["srun", "python", "-m"], True),
])
def test_which_stages_train_as_their_own_process(trainer, launcher, own):
    assert own_process(trainer, launcher) is own


def test_all_devices_of_several_gpus_train_apart(monkeypatch):
    monkeypatch.setattr("torch.cuda.device_count", lambda: 4)
    assert own_process({"devices": "auto", "accelerator": "auto"}, None)
    assert own_process({"devices": -1, "accelerator": "gpu"}, None)
    assert not own_process({"devices": "auto", "accelerator": "cpu"}, None)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    assert not own_process({"devices": "auto", "accelerator": "auto"}, None)


def test_several_nodes_need_a_launcher(boxes, tmp_path, capsys):
    with pytest.raises(ValueError, match="launcher"):
        own_process({"devices": 4, "num_nodes": 2}, None)
    rows = ["finetune", {"name": "multi", "strategy": "finetune", "config": {"trainer": {"num_nodes": 2}}}]
    spec = write_spec(tmp_path, boxes, rows)
    assert main(["--config", str(spec)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cfseg-protocol: error: trainer.num_nodes=2") and "\n" not in err
    assert not (tmp_path / "out").exists()  # refused before anything trains


def test_launcher_key_and_option(boxes, tmp_path):
    spec = load_protocol(write_spec(tmp_path, boxes, ["finetune"], launcher="srun --kill-on-bad-exit=1 python -m"))
    assert spec["launcher"] == ["srun", "--kill-on-bad-exit=1", "python", "-m"]
    assert load_protocol(write_spec(tmp_path, boxes, ["finetune"]))["launcher"] is None
    with pytest.raises(ValueError, match="launcher"):
        load_protocol(write_spec(tmp_path, boxes, ["finetune"], launcher=""))


@pytest.mark.parametrize("env,refused", [
    ({"WORLD_SIZE": "2", "RANK": "1"}, True),  # torchrun
    ({"WORLD_SIZE": "1", "RANK": "0"}, False),
    ({"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "2", "SLURM_NTASKS": "4"}, True),  # srun -n 4 cfseg-protocol
    ({"SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "8"}, False),  # srun -n 1 in an allocation of 8 tasks
    ({"SLURM_NTASKS": "8", "SLURM_JOB_ID": "7"}, False),  # the batch script of an sbatch allocation
    ({"SLURM_NTASKS": "8", "SLURM_STEP_ID": "batch", "SLURM_STEP_NUM_TASKS": "8"}, False),
])
def test_the_protocol_is_one_process(env, refused):
    if refused:
        with pytest.raises(ValueError, match="--launcher"):
            one_process_check(env)
    else:
        one_process_check(env)


def test_started_by_torchrun_the_runner_stops_with_one_line(boxes, tmp_path, monkeypatch, capsys):
    spec = write_spec(tmp_path, boxes, ["finetune"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["--config", str(spec)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cfseg-protocol: error: ") and "one of 2 processes" in err and "\n" not in err
    assert not (tmp_path / "out").exists()

"""cfseg-demo's command-line plumbing (the demo itself runs in `make demo`, not in the test suite)."""

from pathlib import Path

from cfseg.demo import CONFIG, _last_callback_is_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_demo_checkpoint_folder_follows_out(tmp_path):
    """demo.yaml's ModelCheckpoint is the callback a --out override reaches; a config without one gets none."""
    assert _last_callback_is_checkpoint(CONFIG)
    assert not _last_callback_is_checkpoint(ROOT / "configs" / "incremental" / "base.yaml")
    other = tmp_path / "c.yaml"
    other.write_text("trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
                     "    - class_path: lightning.pytorch.callbacks.LearningRateMonitor\n")
    assert not _last_callback_is_checkpoint(other)

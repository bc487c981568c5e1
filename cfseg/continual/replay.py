"""Replay (a reference row, not rehearsal-free): fine-tuning on the stage's data plus a fraction of every earlier
stage's training cases. The module trains it as :class:`cfseg.continual.strategy.Finetune`; what differs is the data,
which the protocol runner adds through :meth:`Replay.replayed`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cfseg.continual.strategy import Strategy

DEFAULT_REPLAY_FRACTION = 0.25  # EvoSAM's experience-replay baseline keeps 25% of each earlier task


class Replay(Strategy):
    """Fine-tuning plus ``fraction`` of every earlier stage's training cases (uses old data).

    Args:
        fraction: the share of each earlier stage's training cases replayed, in (0, 1].
    """

    short_name = "replay"

    def __init__(self, fraction: float = DEFAULT_REPLAY_FRACTION):
        if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
            raise ValueError(f"replay fraction must be in (0, 1], got {fraction!r}")
        self.fraction = float(fraction)

    def replayed(self, earlier: list[tuple[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
        """Dataset entries of the earlier stages (``[(stage name, its labelled dataset entries)]``), each limited to
        ``fraction`` of its training cases (their validation cases validate as usual)."""
        return [{**d, "train_fraction": self.fraction, "name": f"replay_{name}_{k}_" + Path(d["path"]).name}
                for name, datasets in earlier for k, d in enumerate(datasets)]

"""Continual learning: strategies (objects the module holds) and their functional cores.

``model.strategy`` names one of :class:`Finetune`, :class:`Distill`, :class:`Experts`, :class:`EWC`,
:class:`Replay`, :class:`Joint` (by short name or ``{class_path: cfseg.continual.Distill, init_args: {...}}``).
"""

from cfseg.continual.distill import Distill
from cfseg.continual.ewc import EWC
from cfseg.continual.experts import Experts
from cfseg.continual.replay import Replay
from cfseg.continual.stages import StageStatistics
from cfseg.continual.strategy import Finetune, Joint, Strategy, build_strategy

__all__ = ["EWC", "Distill", "Experts", "Finetune", "Joint", "Replay", "StageStatistics", "Strategy",
           "build_strategy"]

"""The AIMMerging merge controller: pure logic on plain numbers (imports neither torch nor numpy).

Fed one record per inner optimizer step (step, history loss, L1 norm of the adapter change since
the last merge), it decides when to merge and returns the merge decision. See ``core``; the merge
schedules are small classes in ``schedules`` behind the ``SCHEDULES`` registry.
"""

from .core import ControllerConfig, ControllerState, MergeController, MergeDecision, replay_records
from .schedules import SCHEDULES, Schedule, Trigger, reference_weights

__all__ = ["SCHEDULES", "ControllerConfig", "ControllerState", "MergeController", "MergeDecision", "Schedule",
           "Trigger", "reference_weights", "replay_records"]

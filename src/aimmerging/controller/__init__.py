"""The AIMMerging merge controller: pure logic on plain numbers (imports neither torch nor numpy).

Fed one record per inner optimizer step (step, history loss, L1 norm of the adapter change since
the last merge), it decides when to merge and returns the merge decision. See ``core``.
"""

from .core import SCHEDULES, ControllerConfig, MergeController, MergeDecision, reference_weights, replay_records

__all__ = ["SCHEDULES", "ControllerConfig", "MergeController", "MergeDecision", "reference_weights", "replay_records"]

"""fault_injection: faults as data, the injector, scenario files and the chaos runner.

    from fault_injection import FaultPlan
    plan = FaultPlan(faults=[{"action": "kill_worker", "rank": 1, "at": {"report": 3}}], seed=0)
    TorchTrainer(..., run_config=RunConfig(callbacks=[plan], failure_config=FailureConfig(max_failures=1)))

``trainkit chaos scenarios/preempt.yaml`` runs a scenario file (fault_injection.chaos).
Importing this package imports neither Ray nor torch.
"""

from trainkit.extras import require as _require

_require("testing", "fault_injection (FaultPlan, scenarios)", ("pydantic", "yaml"))

from fault_injection.broker import NodeBroker  # noqa: E402 - after the extra is known to be there
from fault_injection.faults import (AddNode, Fault, Hang, KillNode, KillWorker, Preempt, Raise, Slow, StorageFault,
                                    Trigger)
from fault_injection.injector import FaultPlan
from fault_injection.scenario import Scenario, load_scenario, parse_scenario

__all__ = ["FaultPlan", "NodeBroker", "Fault", "Trigger", "KillWorker", "KillNode", "Preempt", "Hang", "Raise",
           "Slow", "StorageFault", "AddNode", "Scenario", "load_scenario", "parse_scenario"]

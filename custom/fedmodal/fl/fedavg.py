"""NVFlare's FedAvg, finishing its rounds with the sites that answer.

NVFlare 2.9's `FedAvg` waits in every round for every sampled site, without a timeout: a
hospital that goes offline stops the federation. `TolerantFedAvg` ends a round once at least
`min_responses` sites have answered and the others had `wait_after_min` more seconds (or at
`round_timeout`); a late result is logged and dropped. A site that comes back is sampled
again at the next round and gets the current global model with it.
"""

from __future__ import annotations

from nvflare.app_common.workflows.fedavg import FedAvg

from fedmodal.fl.simulator import guard_simulator_client_names
from fedmodal.fl.timing import WAIT_AFTER_MIN_SECONDS


class TolerantFedAvg(FedAvg):
    """FedAvg whose rounds need `min_responses` sites, not all of them.

    Args:
        min_responses: sites whose results complete a round (0: every sampled site).
        wait_after_min: seconds to wait for the remaining sites once `min_responses` answered.
        round_timeout: seconds a round may last at most (0: no limit).
        *args, **kwargs: NVFlare's `FedAvg` arguments (num_rounds, persistor_id, fedprox_mu...).
    """

    _always_serialize_args = ("min_responses", "wait_after_min", "round_timeout")  # shown in exported jobs

    def __init__(
        self,
        *args,
        min_responses: int = 0,
        wait_after_min: int = WAIT_AFTER_MIN_SECONDS,
        round_timeout: int = 0,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        guard_simulator_client_names()  # before the simulator starts its clients
        self.min_responses = int(min_responses)
        self.wait_after_min = int(wait_after_min)
        self.round_timeout = int(round_timeout)

    def send_model(self, task_name="train", data=None, targets=None, min_responses=None, timeout=0, callback=None):
        needed = min_responses or self.min_responses or None
        if needed is not None and targets is not None:
            needed = min(needed, len(targets))
        self.broadcast_model(
            task_name=task_name,
            data=data,
            targets=targets,
            min_responses=needed,
            timeout=timeout or self.round_timeout,
            wait_time_after_min_received=self.wait_after_min if needed else 0,
            blocking=False,
            callback=callback,
        )

"""MDM-MixMFL's server: per-modality aggregation of the encoders and the global prototype memory.

Each round every site receives the shared groups, the tailored encoders of the modalities it
holds and the memory queues of the modalities it lacks; it returns its trained groups and the
k-means centres of its held modalities' tailored features, which the server writes into the
memory in site order (`fedmodal.fl.keygroup_workflow` runs the rounds, `fedmodal.fl.keygroups`
averages each group over its holders).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import numpy as np
import torch

from fedmodal.fl.keygroup_workflow import KeyGroupRunConfig, KeyGroupWorkflow, SiteFailure
from fedmodal.fl.keygroups import KeyGroups
from fedmodal.mixmfl.config import MixMFLConfig
from fedmodal.mixmfl.memory import PrototypeMemory
from fedmodal.nets.mixmfl import SHARED_PREFIXES, TAILORED_PREFIX, MixMFLNet

MEMORY_PREFIX = "memory."  # payload keys "memory.<modality>": (n, C) prototypes, never per-sample


@dataclass
class MixMFLServerConfig(KeyGroupRunConfig):
    """How the MixMFL federation runs (`KeyGroupRunConfig`: rounds, faults, resume, seed).

    Args:
        num_rounds: federated rounds.
        local_epochs: local epochs per round at each site (one k-means write per round).
    """

    settings_name = "MixMFL server"

    num_rounds: int = 25
    local_epochs: int = 4


def memory_payload(memory: PrototypeMemory, modalities) -> dict[str, np.ndarray]:
    return {MEMORY_PREFIX + m: memory.state_dict()[m] for m in modalities if memory.size(m)}


def memory_from_payload(params: dict, capacity: int) -> PrototypeMemory:
    memory = PrototypeMemory(capacity=capacity)
    memory.load_state_dict({k[len(MEMORY_PREFIX) :]: v for k, v in params.items() if k.startswith(MEMORY_PREFIX)})
    return memory


class MixMFLController(KeyGroupWorkflow):
    """MDM-MixMFL at the server.

    Args:
        mixmfl: `fedmodal.mixmfl.config.MixMFLConfig` fields; sent to the sites, which build
            their networks and training from it (the network is named once, here).
        server: `MixMFLServerConfig` fields.
    """

    groups = KeyGroups(per_modality=TAILORED_PREFIX, shared=SHARED_PREFIXES)
    extra_prefixes = (MEMORY_PREFIX,)

    def __init__(self, mixmfl: dict | None = None, server: dict | None = None):
        self.mixmfl, self.server = dict(mixmfl or {}), dict(server or {})
        self.method = MixMFLConfig.from_dict(self.mixmfl, where="the MixMFL controller's mixmfl settings")
        self.run_config = MixMFLServerConfig.from_dict(self.server, where="the MixMFL controller's server settings")
        run = self.run_config
        super().__init__(run, output_dir="mixmfl", over_holders_only=self.method.tailored_updating)
        self.memory = PrototypeMemory(capacity=self.method.memory_capacity)
        self.run_id = uuid.uuid4().hex[:12]

    def initial_params(self) -> dict[str, np.ndarray]:
        torch.manual_seed(self.run_config.seed)
        net = MixMFLNet(**self.method.net_args())
        return {k: v.detach().numpy() for k, v in net.state_dict().items()}

    def site_config(self) -> dict:
        return {
            "mixmfl": self.method.to_dict(),
            "local_epochs": self.run_config.local_epochs,
            "seed": self.run_config.seed,
            "run_id": self.run_id,
        }

    def extras_for(self, site: str) -> dict[str, np.ndarray]:
        if not self.method.use_memory:
            return {}
        lacking = [m for m in self.memory.modalities if m not in self.sites[site]["modalities"]]
        return memory_payload(self.memory, lacking)

    def absorb(self, site: str, extras: dict[str, np.ndarray]) -> None:
        """Write a site's prototypes into the memory; only of modalities it holds, at most k per round."""
        held, width = self.sites[site]["modalities"], self.method.features[-1]
        for key, centres in sorted(extras.items()):
            modality = key[len(MEMORY_PREFIX) :]
            centres = np.asarray(centres)
            if modality not in held:
                raise SiteFailure(f"site {site} wrote prototypes of {modality!r}, which it does not hold")
            if centres.ndim != 2 or centres.shape[1] != width or centres.shape[0] > self.method.kmeans_k:
                raise SiteFailure(
                    f"site {site} sent {key} of shape {centres.shape}; expected at most {self.method.kmeans_k} rows of {width}"
                )
            self.memory.write(modality, centres)

    def state_dict(self) -> dict:
        return {"memory": self.memory.state_dict(), "run_id": self.run_id}

    def load_state_dict(self, state: dict) -> None:
        self.memory.load_state_dict(state.get("memory", {}))
        self.run_id = state.get("run_id", self.run_id)

    def after_aggregation(self, round_num: int) -> None:
        sizes = {m: self.memory.size(m) for m in self.memory.modalities}
        self.info(f"round {round_num + 1}: memory holds {sizes} prototypes ({self.memory.nbytes()} bytes)")

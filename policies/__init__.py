"""Base policies: the generators of candidate action chunks."""

from policies.autoregressive import ARConfig, ARPolicy
from policies.base import BasePolicy, Candidates
from policies.flow import FlowConfig, FlowPolicy
from policies.registry import POLICIES, example_obs, load_policy, make_policy, save_policy

__all__ = ["ARConfig", "ARPolicy", "BasePolicy", "Candidates", "FlowConfig", "FlowPolicy",
           "POLICIES", "example_obs", "load_policy", "make_policy",
           "save_policy"]

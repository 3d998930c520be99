"""Task suites behind one functional interface, scripted experts and demonstration datasets.

``import envs`` registers the env suites ``tabletop`` and ``maniskill`` (``envs.get_suite``;
ManiSkill3 is an optional extra, ``envs.maniskill``) and the gymnasium
ids ``steerlab/Reach-v0``, ``steerlab/Push-v0``, ``steerlab/PickPlace-v0`` and
``steerlab/Sort-v0``.
"""

from envs import experts, maniskill, maniskill_demos
from envs.base import ACTION_DIM, IMAGE_SIZE, EnvSpec, FunctionalEnv
from envs.demos import write_demos
from envs.gym_env import GYM_IDS, TabletopGymEnv, register  # noqa: E402  (after make)
from envs.language import COLOURS, INSTRUCTION_LEN, VOCAB, decode_instruction, tokenize
from envs.registry import SUITES, EnvSuite, get_suite, register_suite
from envs.tabletop import DEFAULT_MAX_STEPS, REWARDS, TASKS, VARIANTS, TabletopEnv, make
from envs.tabletop_world import STATE_DIM, TabletopState

register()
register_suite(EnvSuite("tabletop", make, TASKS, VARIANTS, experts=experts,
                        write_demos=write_demos))
# ManiSkill3 (optional extra): registered always, imported only when an env is made
register_suite(EnvSuite("maniskill", maniskill.make, tuple(maniskill.TASKS), maniskill.VARIANTS,
                        jittable=False, write_demos=maniskill_demos.write_maniskill_demos,
                        bench=maniskill.bench))

__all__ = [
    "ACTION_DIM",
    "COLOURS",
    "DEFAULT_MAX_STEPS",
    "GYM_IDS",
    "IMAGE_SIZE",
    "INSTRUCTION_LEN",
    "REWARDS",
    "STATE_DIM",
    "TASKS",
    "VARIANTS",
    "VOCAB",
    "SUITES",
    "EnvSpec",
    "EnvSuite",
    "FunctionalEnv",
    "TabletopEnv",
    "TabletopGymEnv",
    "TabletopState",
    "decode_instruction",
    "get_suite",
    "make",
    "tokenize",
]

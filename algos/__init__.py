"""Learners and adapters (see ``algos.base``).

Each import below registers the adapters its module defines; a new adapter is one module plus
one line here.
"""

import algos.clip  # noqa: F401  clip_to_data
import algos.pld  # noqa: F401  pld (residual specialist)
import algos.registry  # noqa: F401  none (execute the chosen candidate)
import algos.ttvla  # noqa: F401  ttvla (test-time RL from progress)

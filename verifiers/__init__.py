"""Verifiers: plugins that score candidate action chunks (see ``verifiers.base``).

Each import below registers the verifiers its module defines; a new verifier is one module plus
one line here.
"""

import verifiers.baselines  # noqa: F401  random, consensus, likelihood, oracle_action, oracle_sim
import verifiers.bradley_terry  # noqa: F401
import verifiers.calql  # noqa: F401
import verifiers.cfn  # noqa: F401
import verifiers.knn  # noqa: F401

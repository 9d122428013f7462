"""Layer 5: CL methods = how each task is trained (a stream) + which merge rule runs when.

Method modules register their streams (``streams.register``) and method names
(``registry.PLAIN_METHODS``) when imported; import each new module here.
"""

# the built-in streams, and those of became (gpm, became, gpm_one_over_t, seq_became) and pam, register on import
from mergecl.methods import became, pam, registry, streams  # noqa: F401

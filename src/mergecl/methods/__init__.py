"""Layer 5: CL methods = how each task is trained (a stream) + which merge rule runs when.

Method modules register their streams (``streams.register``) and method names
(``registry.PLAIN_METHODS``) when imported; import each new module here.
"""

from mergecl.methods import registry, streams  # noqa: F401  (the built-in streams register on import)

"""Layer 5: CL methods = how each task is trained (a *training*) + which merge rule runs when.

A training method is one ``register_training`` call in its own module (``trainings.py`` says what it
declares); method names, option checks and the runner read the registry, so there is no table to
keep in step. The built-in training methods are the modules imported here, ``baselines``, ``became``,
``finetuned`` and ``pam``: each registers itself on import. One from outside mergecl is a plugin
(``mergecl/plugins.py``) that calls ``register_training`` when it is imported.
"""

from mergecl.methods import baselines, became, finetuned, pam, registry  # noqa: F401  (the built-in methods register)
from mergecl.methods.trainings import TRAININGS, Step, StepResult, Training, register_training, registered_training

__all__ = ["TRAININGS", "Step", "StepResult", "Training", "register_training", "registered_training"]

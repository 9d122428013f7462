"""mergecl: continual learning of pretrained models by model merging."""

from mergecl.errors import MergeclError

__version__ = "0.1.0"
__all__ = ["MergeclError", "merge", "__version__"]


def __getattr__(name):
    # Lazy so that `import mergecl` stays cheap and the layers load only when used.
    if name == "merge":
        from mergecl.merging.engine import merge

        return merge
    if name == "run":
        from mergecl.experiment.runner import run

        return run
    raise AttributeError(name)

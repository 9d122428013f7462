"""mergecl: continual learning of pretrained models by model merging.

The public functions, imported on first use (``import mergecl`` stays cheap):

- ``mergecl.run(config)``: train task by task, merge, evaluate; a ``RunOutput`` (typed results and
  the run directory);
- ``mergecl.merge(base, finetuned, method)``: merge checkpoints;
- ``mergecl.merge_continual(base, finetuned, method)``: the merged model after every step of a stream;
- ``mergecl.export(run_dir, method, out)``: a run's model as a directory transformers loads;
- ``mergecl.evaluate(model_dir, config)``: a model's accuracy on each task of a config's scenario;
- ``mergecl.learn``: one model kept up to date task after task (``learn.init(dir)``,
  ``learn.add(dir, task, data_file)``, ``learn.promote``, ``learn.reject``, ``learn.status``).

See ``mergecl.api`` for examples.
"""

from mergecl.errors import MergeclError

__version__ = "0.1.0"
__all__ = ["MergeclError", "evaluate", "export", "learn", "merge", "merge_continual", "run", "__version__"]

_API = ("run", "merge", "merge_continual", "export", "evaluate", "learn", "RunOutput")


def __getattr__(name):
    # Lazy so that `import mergecl` stays cheap and the layers load only when used.
    if name in _API:
        from mergecl import api

        return getattr(api, name)
    raise AttributeError(name)

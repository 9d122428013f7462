"""Plugins: a module outside mergecl registers a rule; $MERGECL_PLUGINS, --plugin and a broken
plugin, each in a fresh interpreter (registrations are per process)."""

import os
import subprocess
import sys

RULE = '''
from mergecl.merging import register_rule


@register_rule("entrywise_min", granularity="stack")
def entrywise_min(taus):
    """The entry-wise smallest task vector."""
    return taus.min(dim=0).values
'''

USE = """
import torch, mergecl
from mergecl.experiment.config import parse_config
merged = mergecl.merge({"w": torch.zeros(2)}, [{"w": torch.tensor([1.0, -2.0])}, {"w": torch.tensor([3.0, 4.0])}],
                       "entrywise_min")
assert merged["w"].tolist() == [1.0, -2.0], merged
config = parse_config({"methods": ["seq_ft", "entrywise_min", "ind_ft+entrywise_min"], "data": {"source": "digits"}})
print("ok", config.methods)
"""


def python(code, cwd, **env):
    environment = dict(os.environ, OMP_NUM_THREADS="1", MERGECL_QUIET="1", PYTHONPATH=str(cwd), **env)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=environment, capture_output=True, text=True)


def test_a_plugin_named_in_the_environment_is_seen_by_merge_and_by_configs(tmp_path):
    (tmp_path / "my_rules.py").write_text(RULE)
    done = python(USE, tmp_path, MERGECL_PLUGINS="my_rules")
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr
    missing = python(USE, tmp_path)  # without it the rule does not exist
    assert missing.returncode != 0 and "unknown merge method 'entrywise_min'" in missing.stderr


def test_a_broken_or_missing_plugin_is_one_line(tmp_path):
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", MERGECL_QUIET="1")
    for plugin, message in [
        ("broken.py", "mergecl: error: plugin broken.py: RuntimeError: boom"),
        ("nowhere.py", "mergecl: error: plugin nowhere.py: no such file"),
        ("no_such_module_xyz", "mergecl: error: plugin no_such_module_xyz: cannot be imported"),
    ]:
        done = subprocess.run(
            [sys.executable, "-m", "mergecl", "--plugin", plugin, "merge", "--help"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 2 and done.stderr.startswith(message), done.stderr
        assert done.stderr.count("\n") == 1

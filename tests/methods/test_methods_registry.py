"""Method names, the training-method registry, and the logit columns of each evaluation."""

import pytest
import torch

from mergecl import MergeclError
from mergecl.data.types import Scenario, Split, Task
from mergecl.methods import TRAININGS, StepResult, register_training, registered_training, trainings
from mergecl.methods.registry import check_method_options, resolve_method, resolve_methods
from mergecl.methods.trainings import eval_classes, train_classes
from mergecl.options import Options, read_options
from mergecl.plugins import load_plugins


def test_names_resolve_to_trainings_and_rules():
    assert resolve_method("seq_ft").training == "seq" and resolve_method("seq_ft").rule is None
    assert (resolve_method("magmax").training, resolve_method("magmax").rule) == ("seq", "magmax")
    assert (resolve_method("seq_ft+ties").training, resolve_method("seq_ft+ties").rule) == ("seq", "ties")
    assert (resolve_method("ind_ft+magmax").training, resolve_method("ind_ft+magmax").rule) == ("ind", "magmax")
    assert resolve_method("joint").training == "joint" and resolve_method("ewc").training == "ewc"
    assert resolve_method("pam@zero").training == "pam@zero" and registered_training("pam@zero").name == "pam"
    with pytest.raises(MergeclError, match="unknown method 'ind_ft\\+magmix'"):
        resolve_method("ind_ft+magmix")
    with pytest.raises(MergeclError, match="listed twice"):
        resolve_methods(["magmax", "magmax"])


def scenario(kind):
    empty = Split(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
    tasks = [Task(i, f"t{i}", cls, empty, empty, empty) for i, cls in enumerate([[3, 1], [0, 4], [2, 5]])]
    if kind == "domain":
        tasks = [Task(i, f"d{i}", list(range(6)), empty, empty, empty) for i in range(3)]
    return Scenario(kind, tasks, [str(c) for c in range(6)])


def test_eval_columns_per_scenario_kind():
    cil = scenario("class")
    assert eval_classes(cil, 0, 0) == [3, 1]
    assert eval_classes(cil, 1, 0) == [3, 1, 0, 4]
    assert eval_classes(cil, 0, 2) == [3, 1, 2, 5]  # a future task: seen classes + its own
    assert train_classes(cil, 1) == [0, 4]
    til = scenario("task")
    assert eval_classes(til, 2, 0) == [3, 1] and eval_classes(til, 0, 1) == [0, 4]
    dil = scenario("domain")
    assert eval_classes(dil, 0, 2) == list(range(6)) and train_classes(dil, 1) == list(range(6))


# --- every registered training method, checked from the registry (a new one is checked too) ---------


@pytest.mark.parametrize("training", list(TRAININGS.values()), ids=list(TRAININGS))
def test_a_training_method_declares_its_method_summary_and_schema(training):
    assert training.summary and issubclass(training.options, Options)
    assert resolve_method(training.method).training == training.name  # its method name resolves to it
    assert resolve_method(f"{training.method}@v2").training == f"{training.name}@v2"
    read_options(training.options, {}, "defaults")  # every option has a valid default
    check_method_options([training.method], {training.method: {}})


@pytest.mark.parametrize("training", list(TRAININGS.values()), ids=list(TRAININGS))
def test_a_training_method_rejects_an_unknown_option_and_a_wrong_type(training):
    method = training.method
    with pytest.raises(MergeclError, match=rf"^method_options\.{method}: unknown option 'no_such_option' \("):
        check_method_options([method], {method: {"no_such_option": 1}})
    with pytest.raises(MergeclError, match=rf"^method_options\.{training.name}: unknown option 'no_such_option'"):
        check_method_options([method], {training.name: {"no_such_option": 1}})  # keyed by the training
    for option in training.options.model_fields:  # a mapping is no option's value: one line naming the key
        with pytest.raises(MergeclError, match=rf"^method_options\.{method}\.{option}: "):
            check_method_options([method], {method: {option: {"not": "a value"}}})


@pytest.fixture
def registry_restored():
    """The training registry as it was before the test (a test may register methods)."""
    saved, owners = dict(TRAININGS), dict(trainings._OWNERS)
    yield
    TRAININGS.clear()
    TRAININGS.update(saved)
    trainings._OWNERS.clear()
    trainings._OWNERS.update(owners)


class HalfLr(Options):
    factor: float = 0.5


def half_lr(step):
    return StepResult(step.train(settings=step.settings.model_copy(update={"lr": step.settings.lr * 0.5})))


def test_register_training_adds_a_method_and_guards_the_names(registry_restored):
    training = register_training("half", half_lr, method="half_ft", summary="Seq-FT at half the lr", options=HalfLr)
    assert resolve_method("half_ft").training == "half" and registered_training("half@x") is training
    assert training.continues  # by default, as Seq-FT: from its own model after the previous task
    with pytest.raises(MergeclError, match=r"method_options\.half_ft\.factor: Input should be a valid number"):
        check_method_options(["half_ft"], {"half_ft": {"factor": "x"}})
    with pytest.raises(MergeclError, match="unknown method 'half'"):  # the method's name, not the training's
        resolve_method("half")
    # registered again by its own module: replaced; a name of another module's training: refused
    assert register_training("half", half_lr, method="half_ft", summary="again").summary == "again"
    with pytest.raises(MergeclError, match=r"method 'seq_ft' is registered already \(by mergecl\.methods\.baselines\)"):
        register_training("seq2", half_lr, method="seq_ft", summary="x")
    with pytest.raises(MergeclError, match=r"training 'pam' is registered already"):
        register_training("pam", half_lr, method="pam2", summary="x")
    with pytest.raises(MergeclError, match="letters, digits and '_'"):
        register_training("a@b", half_lr, summary="x")
    with pytest.raises(MergeclError, match="unknown training 'nope'"):
        registered_training("nope@x")


def test_a_plugin_registers_a_training_method(tmp_path, registry_restored):
    plugin = tmp_path / "frozen_head_plugin.py"
    plugin.write_text(
        "from mergecl.methods import StepResult, register_training\n"
        "register_training('frozen_head', lambda step: StepResult(step.train()), summary='Seq-FT')\n"
    )
    load_plugins([str(plugin)])
    assert resolve_method("frozen_head").training == "frozen_head"
    check_method_options(["frozen_head", "magmax"], {"frozen_head": {}})

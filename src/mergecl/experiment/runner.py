"""`mergecl run`: config -> scenario and learner -> trainings run step by step -> merges ->
accuracy matrices -> results.json and the report. Resumable at any point.

A step's task vector file is its commit marker: written (atomically) only after training, and
after the training's carried state. A resumed run skips every committed step and every recorded
evaluation row, and rebuilds a training's weights as theta_0 + tau_{t-1} -- as an uninterrupted run
does too -- so both end with the same numbers. The run directory keeps its names (``seedN/<training>/``,
``stream_info`` and ``train_time`` in progress.json) so older runs resume.
"""

from __future__ import annotations

import platform
import time
import zlib
from pathlib import Path
from typing import Any

import torch

from mergecl import distributed, loggers
from mergecl.data.scenarios import build_scenario, reorder, task_orders
from mergecl.data.types import Scenario
from mergecl.errors import MergeclError
from mergecl.evaluation.results import MethodResult, RunMeta, RunResults, SeedSummary, mean_per_step
from mergecl.experiment.config import ORDER_STRIDE, RunConfig, load_config, run_seeds, seed_and_order
from mergecl.experiment.plan import plan_trainings
from mergecl.experiment.rundir import RunDir
from mergecl.merging.registry import get_rule
from mergecl.methods.merged import RunningMerge, TaskVectors, merged_model, running_form
from mergecl.methods.registry import MethodSpec, resolve_methods
from mergecl.methods.trainings import Step, eval_classes, registered_training
from mergecl.models.base import Learner, tuned_keys
from mergecl.models.factory import build_learner
from mergecl.models.lora import LoraPair, lora_pairs
from mergecl.models.registry import check_inputs
from mergecl.options import Options, read_options
from mergecl.progress import run_part, whole_run  # progress.json's dict is `progress` here
from mergecl.training.loop import NonFiniteError, accuracy_from_logits, check_finite, predict_splits


def step_seed(seed: int, training: str, t: int) -> int:
    """The seed of step t of a registered training (its variants, pam@zero, share it)."""
    return zlib.crc32(f"{seed}:{training}:{t}".encode()) & 0x7FFFFFFF


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return distributed.local_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        device = distributed.local_device(torch.device(name))
    except RuntimeError:
        raise MergeclError(f"config: device: '{name}' is not a device (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise MergeclError(f"config: device: '{name}', but this torch sees {_cuda_devices()}; use device: auto or cpu")
    return device


def _cuda_devices() -> str:
    if not torch.cuda.is_available():
        return f"no CUDA device (torch {torch.__version__})"
    return f"{torch.cuda.device_count()} CUDA device(s)"


class Runner:
    def __init__(self, config: RunConfig, rundir: RunDir, echo=print, scenarios: dict | None = None) -> None:
        self.config = config
        self.scenarios: dict[int, Scenario] = dict(scenarios or {})  # built already (a new run's first seed)
        self.rundir = rundir
        self.methods = resolve_methods(config.methods)
        self.device = pick_device(config.device)
        self.settings = config.train
        self.progress = rundir.read_progress()
        self.echo = echo if distributed.is_main() else (lambda message: None)
        self.meta = RunMeta()  # what the run is: set when a seed's scenario is built
        self.tuned: list[str] = []
        self.zero_shot_logits: dict[tuple[str, int], torch.Tensor] = {}
        self.lora: list[LoraPair] = []
        self.loggers: loggers.Loggers | None = None  # the config's loggers, on rank 0 (run())
        self.planned: dict[str, list[int]] = {}  # training -> its planned steps per task (run())
        self.running: dict[str, RunningMerge] = {}  # method -> its merge's running state (this seed)

    # --- state ----------------------------------------------------------------------------------

    def seed_progress(self, seed: int) -> dict[str, Any]:
        return self.progress["seeds"].setdefault(
            str(seed), {"rows": {}, "all_class_acc": {}, "train_time": {}, "method_time": {}}
        )

    def finished(self, seed: int, methods: list[MethodSpec], num_tasks: int) -> bool:
        """Every row of these methods committed for this seed, or the method failed (for good)."""
        progress = self.seed_progress(seed)
        failed, rows = progress.get("failed", {}), progress["rows"]
        return all(spec.name in failed or len(rows.get(spec.name, [])) == num_tasks for spec in methods)

    def fail(self, seed: int, methods: list[MethodSpec], t: int, err: Exception) -> None:
        """Record that ``methods`` broke at step t, in progress.json: a resumed run keeps them failed
        (it would only break them again the same way) and goes on with the others."""
        failed = self.seed_progress(seed).setdefault("failed", {})
        for spec in methods:
            if spec.name not in failed:
                failed[spec.name] = message = f"{spec.name}, seed {seed}, task {t + 1}: {err}"
                self.rundir.log(message)
                self.echo(message)
        self.commit_progress()

    def commit_progress(self) -> None:
        self.rundir.write_json("progress.json", self.progress)
        self.rundir.write_json("results.json", self.results().to_json())

    # --- the run --------------------------------------------------------------------------------

    def run(self) -> RunResults:
        if self.config.loggers and distributed.is_main():
            specs = [loggers.check_logger(item) for item in self.config.loggers]
            config = self.config.model_dump(mode="json")
            self.loggers = loggers.open_loggers(specs, self.rundir.path, config, self.config.name)
        try:
            self.plan_steps()
            seeds = run_seeds(self.config)  # the config's seeds, and with data.orders each one's orders
            with whole_run(sum(map(self.seed_steps, seeds)), f"run {self.config.name}"):
                for seed in seeds:
                    with run_part(self.seed_steps(seed)):
                        self.run_seed(seed)
                    self.export_models(seed)  # before keep_vectors: false deletes the tensors
                    config_seed, k = seed_and_order(self.config, seed)
                    if not self.config.keep_vectors and k == self.config.data.orders - 1:
                        for order in range(self.config.data.orders):  # after its last order: shared steps
                            self.rundir.remove_seed_tensors(config_seed + order * ORDER_STRIDE)
            self.commit_progress()
        finally:
            if self.loggers is not None:
                self.loggers.close()
                self.loggers = None
        return self.results()

    def plan_steps(self) -> int:
        """The training steps the run plans for a seed's first order (for the whole-run bar), counted
        as ``--dry-run`` counts them, on the first seed's tasks (the scenario the run builds first,
        kept for that seed)."""
        first = self.config.seeds[0]
        if first not in self.scenarios:
            self.scenarios[first] = checked_scenario(self.config, first)
        sizes = [len(task.train) for task in self.scenarios[first].tasks]
        self.planned = {t["training"]: t["steps_per_task"] for t in plan_trainings(self.config, sizes)}
        return sum(map(sum, self.planned.values()))

    def training_steps(self, seed: int, training: str) -> int:
        """The steps ``training`` plans for ``seed``: none in a later task order of an independent
        training (each task from theta_0: the first order's task vectors are copied)."""
        if registered_training(training).independent and seed_and_order(self.config, seed)[1] > 0:
            return 0
        return sum(self.planned.get(training, []))

    def seed_steps(self, seed: int) -> int:
        return sum(self.training_steps(seed, training) for training in self.planned)

    def run_seed(self, seed: int) -> None:
        scenario = self.scenarios.pop(seed, None) or checked_scenario(self.config, seed)
        self.meta = RunMeta(
            config=self.config.name,
            scenario=scenario.name or scenario.kind,
            kind=scenario.kind,
            # several task orders: position i is another task in each order, so no task has a name
            task_names=[task.name for task in scenario.tasks] if self.config.data.orders == 1 else None,
            num_tasks=len(scenario.tasks),
            seeds=run_seeds(self.config),
            orders=self.config.data.orders if self.config.data.orders > 1 else None,
            machine=f"{platform.machine()}, {torch.get_num_threads()} threads, "
            f"{self.device.type}, torch {torch.__version__}, {distributed.world_size()} process(es)",
        )
        if self.finished(seed, self.methods, len(scenario.tasks)):
            return  # a resume, or seeds added: no model to build, no theta_0 to write
        if self.config.data.orders > 1:
            config_seed, k = seed_and_order(self.config, seed)
            names = ", ".join(task.name for task in scenario.tasks)
            self.rundir.log(f"seed {seed}: task order {k} of seed {config_seed}: {names}")
        torch.manual_seed(seed_and_order(self.config, seed)[0])  # every order of a seed: one theta_0
        learner = build_learner(self.config.model, scenario.class_names, self.device)
        base_path = self.rundir.base_path(seed)
        if distributed.broadcast_object(base_path.exists()):  # rank 0's view: it may be writing it now
            learner.load_state_dict(self.rundir.load_tensors(base_path))
        else:
            self.rundir.save_tensors(base_path, learner.state_dict())
        base = {k: v.detach().cpu().clone() for k, v in learner.state_dict().items()}
        self.tuned, self.lora = tuned_keys(learner), lora_pairs(learner)
        self.zero_shot_logits = {}  # theta_0's logits on this seed's tasks
        self.running = {}
        for training in dict.fromkeys(spec.training for spec in self.methods):
            with run_part(self.training_steps(seed, training)):
                self.run_training(seed, training, scenario, learner, base)

    def export_models(self, seed: int) -> None:
        """The config's ``export:``: each listed method's model after its last step on the export seed,
        into ``RUN/export/<method>/`` (as ``mergecl export``). An export already there is kept (a
        resumed run); a method that failed is skipped, said in the log."""
        wanted = self.config.export
        if wanted is None or seed != (wanted.seed if wanted.seed is not None else self.config.seeds[0]):
            return
        if distributed.is_main():
            from mergecl.experiment.export import export_model  # it reads the run through this module

            for name in wanted.methods:
                out = self.rundir.path / "export" / name
                failed = self.seed_progress(seed).get("failed", {}).get(name)
                if failed or out.exists():
                    message = f"export: {name} skipped ({'it failed' if failed else f'{out} is there already'})"
                else:
                    message = f"exported {export_model(self.rundir, self.config, self.progress, name, out, seed=seed)}"
                self.rundir.log(message)
                self.echo(message)
        distributed.barrier()

    def run_training(self, seed: int, training: str, scenario: Scenario, learner: Learner, base: dict) -> None:
        """Every step of one training (``seq``, ``pam@zero``), each followed by its methods' rows."""
        methods = [spec for spec in self.methods if spec.training == training]
        if self.finished(seed, methods, len(scenario.tasks)):
            return  # nothing to train, even when its tensors were deleted to save disk
        progress = self.seed_progress(seed)
        carried = None
        final_only = getattr(self.training_options(training), "final_only", False)
        last = len(scenario.tasks) - 1
        for t in range(len(scenario.tasks)):
            if final_only and t < last:  # e.g. joint trained once on everything: no rows before the end
                for spec in methods:
                    rows = progress["rows"].setdefault(spec.name, [])
                    rows.extend([None] * (t + 1 - len(rows)))
                continue
            if registered_training(training).step is not None:
                planned = self.planned.get(training, [])
                try:
                    with run_part(planned[t] if t < len(planned) else 0):
                        carried = self.train_or_load(seed, training, t, scenario, learner, base, carried)
                except NonFiniteError as err:  # every method of this training fails; other trainings go on
                    self.fail(seed, methods, t, err)
                    return
            for spec in methods:
                rows = progress["rows"].setdefault(spec.name, [])
                if len(rows) > t or spec.name in progress.get("failed", {}):
                    continue
                try:
                    self.evaluate_method(seed, spec, t, base, learner, scenario)
                except NonFiniteError as err:  # this method only: the training's others go on
                    self.fail(seed, [spec], t, err)

    def evaluate_method(self, seed, spec: MethodSpec, t: int, base: dict, learner: Learner, scenario: Scenario):
        """Row t of a method's accuracy matrix (and what goes with it), committed to progress.json."""
        progress = self.seed_progress(seed)
        rows = progress["rows"][spec.name]
        started = time.perf_counter()
        try:
            weights, info = self.weights(seed, spec, t, base, learner, scenario)
            merge_time = time.perf_counter() - started
        except MergeclError as err:
            if spec.rule is None or isinstance(err, NonFiniteError):
                raise
            # the inputs are this run's own finite task vectors: the merge itself overflowed
            raise NonFiniteError(f"the {spec.rule} merge failed ({err})") from None
        check_finite(weights, "the model to evaluate")
        learner.load_state_dict(weights)
        if self.config.eval_val:
            val_rows = progress.setdefault("val_rows", {}).setdefault(spec.name, [])
            del val_rows[t:]
            val_rows.append(self.evaluate_all(learner, scenario, t, "val"))
        if info:
            progress.setdefault("method_info", {}).setdefault(spec.name, {})[str(t)] = info
        # the zero-shot model is the same at every step: its logits are computed once per task
        cache = self.zero_shot_logits if registered_training(spec.training).step is None else {}
        logits = self.task_logits(learner, scenario, t, "test", cache=cache)
        if t == len(scenario.tasks) - 1:  # every task is evaluated at the last step: the union's logits
            labels = torch.cat([task.test.labels for task in scenario.tasks])
            everything = list(range(scenario.num_classes))
            progress["all_class_acc"][spec.name] = accuracy_from_logits(torch.cat(logits), labels, everything)
        rows.append(self.row(scenario, t, "test", logits))  # last: the row commits the step
        spent = time.perf_counter() - started
        progress["method_time"][spec.name] = progress["method_time"].get(spec.name, 0.0) + spent
        self.commit_progress()
        if self.loggers is not None:
            self.loggers.evaluation(seed, spec.name, t, rows[t], info or {})
            if spec.rule is not None:
                self.loggers.merge_time(seed, spec.name, t, merge_time)
            self.loggers.commit()
        acc = sum(rows[t][: t + 1]) / (t + 1)
        self.echo(f"seed {seed} step {t + 1}/{len(scenario.tasks)} {spec.name}: ACC {acc:.2f}")

    def evaluate_all(self, learner: Learner, scenario: Scenario, t: int, split: str, seen_only: bool = False):
        """Row t of the accuracy matrix on ``split``: tasks 0..t, and the future tasks unless ``seen_only``
        or the config's ``eval_future`` is off (their accuracy is zero-shot transfer, not in ACC/BWT)."""
        return self.row(scenario, t, split, self.task_logits(learner, scenario, t, split, seen_only))

    def task_logits(self, learner, scenario, t, split, seen_only=False, cache=None) -> list[torch.Tensor]:
        """Logits over all classes on each task row t covers (one forward pass per task; ``cache``
        keeps them across steps for a model that does not change)."""
        tasks = scenario.tasks if self.config.eval_future and not seen_only else scenario.tasks[: t + 1]
        cache = {} if cache is None else cache
        todo = [i for i in range(len(tasks)) if (split, i) not in cache]
        splits = [getattr(tasks[i], split) for i in todo]
        desc = f"evaluating on {split} (step {t + 1}/{len(scenario.tasks)})"
        for i, logits in zip(todo, predict_splits(learner, splits, self.settings.eval_batch_size, desc), strict=True):
            cache[split, i] = logits
        return [cache[split, i] for i in range(len(tasks))]

    @staticmethod
    def row(scenario: Scenario, t: int, split: str, logits: list[torch.Tensor]) -> list[float]:
        labels = [getattr(task, split).labels for task in scenario.tasks]
        return [accuracy_from_logits(x, labels[i], eval_classes(scenario, t, i)) for i, x in enumerate(logits)]

    def train_or_load(self, seed, training, t, scenario, learner, base, carried):
        """Train step t of ``training`` unless it is committed; return the training's carried state."""
        vector_path = self.rundir.vector_path(seed, training, t)
        state_path = self.rundir.state_path(seed, training, t)
        if vector_path.exists():
            return self.rundir.load_tensors(state_path) if state_path.exists() else carried
        registered = registered_training(training)
        # variants of a training (pam@zero, pam@p25) share their seeds: they differ only in options
        seed_t = step_seed(seed, registered.name, t)
        config_seed, k = seed_and_order(self.config, seed)
        if registered.independent and k > 0:  # task t of order k is task j of order 0: trained once
            j = task_orders(len(scenario.tasks), config_seed, k + 1)[k][t]
            seed_t = step_seed(config_seed, registered.name, j)  # as order 0 trains it
            shared = self.rundir.vector_path(config_seed, training, j)
            if distributed.broadcast_object(shared.exists()):
                self.rundir.share_tensors(shared, vector_path)  # a hard link: one copy on disk
                self.rundir.log(f"seed {seed} {training} task {t + 1}: task {j + 1} of seed {config_seed}'s order")
                return carried
        start = base
        if t > 0 and registered.continues:
            start = self.rebuild(base, self.rundir.load_tensors(self.rundir.vector_path(seed, training, t - 1)))
        previous_state = self.rundir.state_path(seed, training, t - 1)
        if t > 0 and carried is None and previous_state.exists():
            carried = self.rundir.load_tensors(previous_state)
        learner.load_state_dict(start)
        torch.manual_seed(seed_t)
        started = time.perf_counter()
        step = Step(learner, scenario, t, self.settings, seed_t, self.training_options(training), carried)
        with loggers.recording(self.loggers.training(seed, training) if self.loggers else None):
            result = registered.step(step)
        trained = learner.state_dict()
        tau = {k: trained[k].detach().cpu().float() - base[k].float() for k in self.tuned}
        check_finite(tau, "the model after the step")  # never committed: a broken step is not a result
        if result.carried is not None:
            self.rundir.save_tensors(state_path, result.carried)
        if result.info:  # recorded before the commit marker: a resumed run finds it with the vector
            info = self.seed_progress(seed).setdefault("stream_info", {}).setdefault(training, {})
            info[str(t)] = result.info
            self.rundir.write_json("progress.json", self.progress)
        self.rundir.save_tensors(vector_path, tau, {"stream": training, "task": str(t)})  # file format: "stream"
        if self.loggers is not None:
            self.loggers.commit()  # the step's counter is kept with its commit marker
        spent = time.perf_counter() - started
        times = self.seed_progress(seed)["train_time"]
        times[training] = times.get(training, 0.0) + spent
        stats = result.stats
        summary = f"{stats.steps} steps, loss {stats.final_loss:.4f}, " if stats else ""
        extra = "".join(f", {k} {v:.4g}" for k, v in result.info.items())
        self.rundir.log(f"seed {seed} {training} task {t + 1}: {summary}{spent:.1f}s{extra}")
        return result.carried

    @staticmethod
    def rebuild(base: dict, tau: dict) -> dict:
        return {k: (v.float() + tau[k]).to(v.dtype) if k in tau else v for k, v in base.items()}

    def training_options(self, training: str) -> Options:
        """method_options of a training: under its own name (``seq``, ``pam@zero``) or its method's
        (``seq_ft@x``), read by the training's schema (checked already when the config was read)."""
        names = [training] + [spec.name for spec in self.methods if spec.training == training and spec.rule is None]
        name = next((n for n in names if n in self.config.method_options), training)
        schema = registered_training(training).options
        return read_options(schema, self.config.method_options.get(name, {}), f"method_options.{name}")

    def weights(self, seed, spec: MethodSpec, t: int, base: dict, learner: Learner, scenario: Scenario):
        """The model a method has after step t, and what was chosen on the way ({"lam": ...})."""
        if registered_training(spec.training).step is None:  # zero-shot: no training, theta_0
            return base, {}
        paths = [self.rundir.vector_path(seed, spec.training, i) for i in range(t + 1)]
        if spec.rule is None:
            return self.rebuild(base, self.rundir.load_tensors(paths[-1])), {}

        def validate(state: dict) -> list[float]:  # lam: auto scores each lam's model on the tasks seen
            learner.load_state_dict(state)
            return self.evaluate_all(learner, scenario, t, "val", seen_only=True)

        vectors = TaskVectors(paths, base, self.tuned, self.rundir.load_tensors, self.lora)
        options = self.config.method_options.get(spec.name, {})
        where = f"method_options.{spec.name}"
        running = self.running_merge(seed, spec, paths, options)
        if running is not None:
            merged = running.model(vectors, validate, where)
        else:
            merged = merged_model(spec.rule, vectors, options, seed, validate, where)
        return merged.state, merged.info

    def running_merge(self, seed: int, spec: MethodSpec, paths: list[Path], options: dict) -> RunningMerge | None:
        """The method's merge after tau_1..tau_t (``paths``) from the state it had after t - 1 (kept
        from the step before, or rebuilt from the stored vectors after a resume): one task vector a
        step. Only for a rule whose running form is its merge (declared, no random draws: the same
        numbers as merging 1..t at every step, which costs O(t) a step: sequential rules like OPCM)."""
        assert spec.rule is not None
        if running_form(spec.rule, options) is None or get_rule(spec.rule).draws:
            return None
        running = self.running.get(spec.name)
        if running is None or running.count not in (len(paths) - 1, len(paths)):
            running = RunningMerge(spec.rule, options, seed)
            for path in paths[:-1]:
                running.add(self.rundir.load_tensors(path))
        if running.count < len(paths):
            running.add(self.rundir.load_tensors(paths[-1]))
        self.running[spec.name] = running
        return running

    # --- results --------------------------------------------------------------------------------

    def results(self) -> RunResults:
        """The results so far (results.json is their ``to_json()``)."""
        return results_from_progress(self.config, self.progress, self.meta)


def run_scenario(config: RunConfig, seed: int) -> Scenario:
    """The task sequence of a run's seed, as its data config cuts it (seeded: the same every time);
    order k of seed s (``data.orders``) is seed s's scenario with its tasks in ``task_orders``' k-th order."""
    data = config.data
    seed, k = seed_and_order(config, seed)
    scenario = build_scenario(
        data.scenario,
        data.source,
        data.n_tasks,
        data.order,
        seed,
        val_fraction=data.val_fraction,
        train_per_class=data.train_per_class,
        eval_per_class=data.eval_per_class,
        domain_order=data.domain_order,
        root=data.root,
        source_options=data.options,
    )
    if k == 0:
        return scenario
    return reorder(scenario, task_orders(len(scenario.tasks), seed, k + 1)[k])


def checked_scenario(config: RunConfig, seed: int) -> Scenario:
    """A seed's scenario, and the backbone checked against its data kind, before any model is built."""
    scenario = run_scenario(config, seed)
    check_inputs(config.model, scenario.tasks[0].train.kind, config.data.source)
    task_orders(len(scenario.tasks), seed, config.data.orders)  # as many different orders as asked for
    return scenario


def results_from_progress(config: RunConfig, progress: dict[str, Any], meta: RunMeta) -> RunResults:
    """The results of a run from its progress.json: a method's entry once it has a row or has failed."""
    methods = {}
    for spec in resolve_methods(config.methods):
        result = method_result(spec, run_seeds(config), progress, meta)
        if result is not None:
            methods[spec.name] = result
    return RunResults(methods, meta)


def method_result(spec: MethodSpec, seeds: list[int], progress: dict[str, Any], meta: RunMeta) -> MethodResult | None:
    of_seed = {str(seed): progress["seeds"].get(str(seed), {}) for seed in seeds}
    failed = [entry["failed"][spec.name] for entry in of_seed.values() if spec.name in entry.get("failed", {})]
    if failed:  # a broken model is never a number: the first failure, and how many seeds failed
        more = f" (and {len(failed) - 1} more seed(s))" if len(failed) > 1 else ""
        return MethodResult.failure(failed[0] + more)
    per_seed = {seed: seed_summary(spec, entry, meta) for seed, entry in of_seed.items()}
    per_seed = {seed: summary for seed, summary in per_seed.items() if summary is not None}
    if not per_seed:
        return None
    # seeds stopped at different steps are not averaged: the numbers are those of the seeds that went
    # furthest, and "coverage" says how far each seed went (the report shows it)
    steps = {seed: len(of_seed[seed]["rows"][spec.name]) for seed in per_seed}
    furthest = max(steps.values())
    coverage = {seed: steps.get(seed, 0) for seed in of_seed}
    averaged = {seed: summary for seed, summary in per_seed.items() if steps[seed] == furthest}
    # the per-step values of the same seeds and steps as the numbers (a training logs its step
    # before the method's row is evaluated)
    step_info = {
        key: values[:furthest]
        for kind, name in (("stream_info", spec.training), ("method_info", spec.name))
        for key, values in logged_per_step(progress, [int(seed) for seed in averaged], kind, name).items()
    }
    return MethodResult.mean_of(averaged, coverage, step_info)


def seed_summary(spec: MethodSpec, progress: dict[str, Any], meta: RunMeta) -> SeedSummary | None:
    """A method on one seed, from the seed's progress; None: no row yet (or a final-only method
    before its one row)."""
    rows = progress.get("rows", {}).get(spec.name)
    if not rows:
        return None
    all_class_acc = progress["all_class_acc"].get(spec.name)
    wall_time_s = progress["train_time"].get(spec.training, 0.0) + progress["method_time"].get(spec.name, 0.0)
    val_rows = progress.get("val_rows", {}).get(spec.name)
    val_rows = val_rows[: len(rows)] if val_rows else None
    if rows[0] is None:  # final only: progress.json has null rows before the last (old runs resume)
        num_tasks = len(meta.task_names) if meta.task_names is not None else len(rows)
        if len(rows) < num_tasks or rows[-1] is None:
            return None
        return SeedSummary.of_final_row(rows[-1], all_class_acc, wall_time_s, val_rows)
    return SeedSummary.of_rows(rows, all_class_acc, wall_time_s, val_rows)


def logged_per_step(progress: dict[str, Any], seeds: list[int], kind: str, name: str) -> dict[str, list[float]]:
    """Per-step values a training (``stream_info``: BECAME's lambda*) or a method (``method_info``: an
    auto lam) logged, mean over seeds."""
    series: dict[str, list[list[float]]] = {}
    for seed in seeds:
        logged = progress["seeds"].get(str(seed), {}).get(kind, {}).get(name, {})
        steps = sorted(logged, key=int)
        for key in dict.fromkeys(k for t in steps for k in logged[t]):
            series.setdefault(key, []).append([logged[t][key] for t in steps if key in logged[t]])
    return {key: mean_per_step(values) for key, values in series.items() if all(values)}


def default_out(config: RunConfig) -> Path:
    return Path("runs") / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run(
    config: RunConfig | str | Path | None = None,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    echo=print,
    report: bool = True,
    seeds: list[int] | None = None,
) -> tuple[dict[str, Any], Path]:
    """Run a config (None: the embedded default) into ``out``, or continue the run in ``resume``;
    ``seeds`` with ``resume``: run these seeds, a superset of the run's own (adds seeds to a run).
    Returns results.json's content (``RunResults.from_json`` types it) and the run directory."""
    scenarios: dict[int, Scenario] = {}
    if resume is not None:
        rundir = RunDir(resume)
        config = rundir.open_existing(seeds)  # a run, its config unchanged (but for added seeds); locked
    else:
        if seeds is not None:
            raise MergeclError("seeds= extends a resumed run; a new run takes its seeds from the config")
        if not isinstance(config, RunConfig):
            config = load_config(config)
        # before the run directory exists, so that a fixed config then starts afresh: the device, and
        # the first seed's data (a wrong path, column or backbone for the data kind)
        pick_device(config.device)
        scenarios[config.seeds[0]] = checked_scenario(config, config.seeds[0])
        rundir = RunDir(distributed.broadcast_object(out if out is not None else default_out(config)))
        rundir.create(config)  # refused unless new or empty; locked
    try:
        results = Runner(config, rundir, echo, scenarios).run()
        if report and distributed.is_main():
            from mergecl.evaluation.report import write_report

            write_report(results, rundir.path)
    finally:
        rundir.unlock()
    return results.to_json(), rundir.path

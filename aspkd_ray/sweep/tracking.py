"""MLflow for a sweep: one parent run, one child run per trial, all written by the driver.

The parent holds the base config (params), the sweep file, and at the end the results
table, the plot of the objective against each swept parameter and the best config. A child
holds its trial's whole config (params, flattened), each round's metrics as Tune receives
them, then the test agreement per round and the student. Only the driver writes, so the
store may be the default SQLite file wherever the trials run.
"""

from __future__ import annotations

import logging
import time

from ray.tune import Callback

from aspkd_ray import console
from aspkd_ray.config import flatten
from aspkd_ray.sweep.search import ROUND

log = logging.getLogger(__name__)

TRIAL_TAG = "aspkd.trial"
ENDED_TAG = "aspkd.tune_ended"  # set when Tune ends a trial (done, stopped or failed)
OBJECTIVE_TAG = "aspkd.objective"
ROUND_METRICS = ("val_agreement", "agreement", "calls_used", "val_score",
                 "val_score_labelled", "filter_rate", "pseudo_labelled", "round_time_s",
                 "latents_mb")


class SweepTracker(Callback):
    """A Tune callback in the driver: a child run per trial (found again on resume), and
    each reported round's metrics logged to it as they arrive.

    Its state lives in MLflow, not in the object: a restored Tuner runs the instance pickled
    with the interrupted run, and the driver asks its own."""

    def __init__(self, parent_run_id: str, experiment_id: str, objective: str,
                 trial_config, service: tuple[str, str]) -> None:
        self.parent, self.experiment, self.objective = parent_run_id, experiment_id, objective
        self.trial_config = trial_config  # (params, trial id) -> Config
        self.service = service            # the shared teacher service's (name, namespace)
        self.children: dict[str, str] = {}

    def child(self, trial_id: str, params: dict) -> str:
        """The child run of this trial: an existing one (a resumed sweep), else a new one
        with the trial's whole config as params."""
        from mlflow import MlflowClient

        if trial_id in self.children:
            return self.children[trial_id]
        client = MlflowClient()
        found = client.search_runs(
            [self.experiment], filter_string=f"tags.mlflow.parentRunId = '{self.parent}' "
                                             f"and tags.`{TRIAL_TAG}` = '{trial_id}'")
        if found:
            run_id = found[0].info.run_id
        else:
            run = client.create_run(self.experiment, run_name=f"trial-{trial_id}", tags={
                "mlflow.parentRunId": self.parent, TRIAL_TAG: trial_id,
                OBJECTIVE_TAG: self.objective, "stage": "sweep-trial"})
            run_id = run.info.run_id
            cfg = self.trial_config(params, trial_id)
            params_flat = {k: ("null" if v is None else str(v))[:500]
                           for k, v in flatten(cfg).items()}
            client.log_batch(run_id, params=_params(params_flat))
        self.children[trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.child(trial.trial_id, _params_of(trial.config))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._ended(trial, "complete")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._ended(trial, "error")

    def _ended(self, trial, how: str) -> None:
        """Tune ended this trial (finished, stopped by the scheduler, or failed); a trial cut
        short by an interrupted sweep is not, and runs again when the sweep resumes. The
        teacher service then sells it nothing more: a stopped trial runs on until Tune kills
        its process, and must not spend budget meanwhile."""
        import ray
        from mlflow import MlflowClient

        try:
            ray.get_actor(*self.service).close_trial.remote(trial.trial_id)
        except ValueError:  # no service (it is restarting): the trial's cap still holds
            log.warning("could not close trial %s at the teacher service", trial.trial_id)
        MlflowClient().set_tag(self.child(trial.trial_id, _params_of(trial.config)),
                               ENDED_TAG, how)

    def ended(self, run_id: str) -> bool:
        from mlflow import MlflowClient

        return ENDED_TAG in MlflowClient().get_run(run_id).data.tags

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        run_id = self.child(trial.trial_id, _params_of(trial.config))
        step = int(result.get(ROUND, 0))
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(result[k]), now, step) for k in ROUND_METRICS
                   if isinstance(result.get(k), (int, float))]
        if metrics:
            MlflowClient().log_batch(run_id, metrics=metrics)
        shown = ", ".join(f"{k} {result[k]:.1f}%" for k in ("val_agreement", "agreement")
                          if isinstance(result.get(k), (int, float)))
        console.say(f"  trial {trial.trial_id} round {step}: {shown or 'done'}, "
                    f"{result.get('calls_used', '?')} calls")


def _params(flat: dict[str, str]):
    from mlflow.entities import Param

    return [Param(k, v) for k, v in flat.items()]


def _params_of(config: dict) -> dict:
    return {k: v for k, v in (config or {}).items() if not k.startswith("__")}


def finish_child(run_id: str, row: dict, evaluation, status: str) -> None:
    """After the trials: the test agreement per round, final metrics and the student in the
    child run, ended as FINISHED (all rounds), KILLED (stopped by the scheduler) or FAILED."""
    import mlflow
    from mlflow import MlflowClient

    from aspkd_ray.jobs.steal import log_student

    with mlflow.start_run(run_id=run_id, nested=True):
        if evaluation is not None:
            for r in evaluation.rounds:
                mlflow.log_metric("test_agreement", r["agreement"], step=r["round"] + 1)
            if evaluation.student is not None:
                log_student(evaluation.student, evaluation.example)
        final = {k: float(row[k]) for k in ("agreement", "val_agreement", "calls_used",
                                            "pseudo_label_agreement", "rounds_done")
                 if isinstance(row.get(k), (int, float))}
        mlflow.log_metrics({f"final_{k}": v for k, v in final.items()})
        mlflow.set_tag("aspkd.status", row["status"])
    MlflowClient().set_terminated(run_id, status)

"""One search worker on a synthetic objective: `python search_worker.py URL N_TRIALS LOG [KILL_AT]`.

The objective samples `x`, sleeps a little, appends `number,x,pid` to LOG and returns `(x - 0.3)^2`.
With KILL_AT, the worker SIGKILLs itself a little after trial KILL_AT starts (a trial left RUNNING, as after
a power cut). The study must exist (created and seeded by the test); this only works on it.
"""

import os
import signal
import sys
import time

from lightning_peft.experiments.policy_search import SearchSettings, open_study, optimize


def main() -> None:
    url, n_trials, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    kill_at = int(sys.argv[4]) if len(sys.argv) > 4 else None
    settings = SearchSettings(metric="x", heartbeat_s=1, sampler="random", pruner="none", seed=os.getpid())
    study = open_study(url, settings)

    def objective(trial):
        if trial.number == kill_at:
            time.sleep(2.5)  # let the heartbeat thread record the trial as alive (Optuna fails only those)
            os.kill(os.getpid(), signal.SIGKILL)
        x = trial.suggest_float("x", 0.0, 1.0)
        trial.set_user_attr("worker", os.getpid())
        time.sleep(0.3)
        with open(log, "a") as f:
            f.write(f"{trial.number},{x!r},{os.getpid()}\n")
        return (x - 0.3) ** 2

    optimize(study, objective, n_trials)


if __name__ == "__main__":
    main()

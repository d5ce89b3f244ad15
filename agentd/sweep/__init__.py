"""Hyperparameter sweeps on Optuna: each trial an ordinary agentd job (issue 24).

    spec      the sweep file: schema, checks (file:line:field:fix) and each trial's config
    study     Optuna: the storage (journal file or PostgreSQL), sampler, pruner, the objective's value
    manager   the daemon side: ask, submit the trial job, report validation losses, prune, tell; resume
    report    the sweep report (table, best trial, figures, importances) and summary.csv
    best      `SWEEP:best`: the best trial's output folder, for `agentd release promote`
"""

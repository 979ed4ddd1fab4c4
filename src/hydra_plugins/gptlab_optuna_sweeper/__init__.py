"""gptlab's Optuna sweeper for Hydra: `hydra/sweeper=gptlab_optuna` (current Optuna, stored
studies, pruning, parallel workers). Hydra finds it in the `hydra_plugins` namespace."""

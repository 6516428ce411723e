"""The continual-learning pipeline around the model: data, pretraining, training one task after
another, evaluation, recall metrics, losses and a run's state on disk.

`lpi` itself is the model a server imports; nothing in `lpi` outside this subpackage imports
it. Each job is a function of a frozen config (`trainer.run_training`,
`pretraining.run_pretraining`, `evaluator.run_evaluation`); the command lines
`python -m lpi.pretrain`, `python -m lpi.train` and `python -m lpi.evaluate` only parse flags
into those configs.
"""

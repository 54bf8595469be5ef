"""Training: the schedule, losses, data, bias balancing, metrics, checkpoints and the trainer.

Sits on top of `lmspec.runtime` (the generated model and its ops) beside `lmspec.serve`; neither imports
the other.
"""

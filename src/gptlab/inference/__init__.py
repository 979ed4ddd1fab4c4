"""Using a model: loading checkpoints and weights, generation, evaluation.
"""

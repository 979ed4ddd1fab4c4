"""Sweep summaries and plots, and Optuna: the study and pruning.
"""

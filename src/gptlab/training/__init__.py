"""The LightningModule, the run's settings, the run itself and its callbacks.
"""

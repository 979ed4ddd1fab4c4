"""Corpora, prepared token files, windows and samplers, and the LightningDataModule.
"""

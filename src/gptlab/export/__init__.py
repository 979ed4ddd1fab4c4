"""Trained models in other formats: a checkpoint as a Hugging Face `transformers` folder."""

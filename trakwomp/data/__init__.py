"""Data: the dataset interface every dataset kind implements (`base`), images and arrays
(`images`), texts and tokenizers (`text`), datasets by spec string (`specs`), files of indices
(`files`) and groups of train examples (`groups`). Imports nothing of trakwomp above it."""

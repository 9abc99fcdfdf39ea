"""Models: the built-in networks (`networks`), Hugging Face folders (`huggingface`), model
specs and the check that a model suits its data and task (`spec`), checkpoint files
(`checkpoints`), and the store's registry of the models to attribute (`registry`)."""

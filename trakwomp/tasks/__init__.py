"""Tasks: what a model's output means. The `Task` interface (`base`) fixes the output f that
TRAK differentiates, the weight q, the training loss, the data it accepts and its recipe
defaults; each task is one module here, found by name through `registry`."""

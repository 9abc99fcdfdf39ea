"""The pipeline's stages, each one library call that resumes and shards: `train`, `featurize`,
`finalize`, `score`; with what a store is bound to (`bindings`) and which models and view a
command uses (`selection`)."""

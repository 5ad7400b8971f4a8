"""Training and evaluation batches from the packed shards, through DALI or the torch baseline
(``backend.py`` picks one by ``input.backend``). Importing the package imports nothing: the run
config reads ``input/config.py`` without loading torch."""

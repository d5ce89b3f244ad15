"""The training loop and what runs beside it: the job, validation loss, sampling rounds, optimizers, the warm model cache, preload; imports trainer.checks, families, runs, data and the vocabulary."""

"""The output folder of a job: run history, checkpoints, logs and outputs, the HTML report; imports only trainer.data and the vocabulary."""

"""Everything decided before a model loads: preflight, the validate report, the VRAM estimate; imports trainer.families, runs, data and the vocabulary."""

"""The YAML-driven LoRA trainer library (image mode: diffusers + peft; text mode: transformers + peft)."""

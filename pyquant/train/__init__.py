"""Training: the loop, checkpoints, data plumbing, recipes (GLUE / causal LM / fine-tune), the demo and their CLI."""

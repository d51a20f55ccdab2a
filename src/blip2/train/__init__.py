"""Training entry points: the stage-1 loop, optimizer/schedule, checkpoints."""

"""DiffEditor's drag editing without training: DDIM inversion with a memory bank of attention, score-based guidance
on UNet features, a regional ODE-SDE mix and time travel (``techniques.md`` row 33)."""

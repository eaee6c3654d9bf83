"""The results: what a study's stored numbers mean (candidates, objectives and constraints, Pareto fronts,
the target, the recommendation) and the export of a pick. It imports the core, the engine's method
catalogue and the store, never the study layer that produces the numbers."""

"""The live placement controller: load, decisions, the two-phase switch, elasticity, its actor and metrics."""

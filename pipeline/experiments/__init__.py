"""Studies that compose models, solvers and estimators; each has a thin CLI main()."""

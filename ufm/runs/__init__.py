"""Running work: the run store, the executors and their worker processes, studies of runs."""

"""Running a method through a task stream: process set-up, the stage loop, the run directory
and the results. (The CLI, the Python API, the demo and the bench sit on top of this package.)"""

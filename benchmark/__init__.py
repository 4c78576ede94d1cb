"""Runner, CLI, config, tracking, tuning and executors of metalr-bench."""

__version__ = "0.1.0"

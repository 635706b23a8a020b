"""Executor factories: the only place that knows how execution stacks are composed."""

"""Reusable test harnesses that run real processes (Synapse, ...)."""

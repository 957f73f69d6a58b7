"""Shared example utilities: checkpoints, resume, logging, devices."""

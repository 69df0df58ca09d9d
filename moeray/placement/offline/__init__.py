"""Offline placement tools: replay load traces through policies and triggers, plot the result."""

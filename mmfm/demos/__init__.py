"""Demos behind `mmfm demo NAME`."""

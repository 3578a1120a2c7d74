"""Presenting: report rendering, trace export, the live view, metrics exposition."""

"""The recording format: the only interface between collecting and analysing."""

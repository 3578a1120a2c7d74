"""Collecting: discovery, symbols, probe specs, the bcc adapter, collectors, the recorder.

Nothing here imports argus.analyze; the recording format (argus.recording) is the contract.
"""

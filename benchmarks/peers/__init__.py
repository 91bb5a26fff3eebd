"""Side by side with other extraction tools: each peer in its own throwaway venv, the same network and slides.

Run by hand only (``python -m benchmarks.peers``); it installs packages, so no test or CI job runs it.
"""

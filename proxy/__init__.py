"""pdproxy: an OpenAI-compatible prefill/decode proxy in front of unmodified vLLM servers.

Importing this package must never need torch or vLLM: the proxy's container is small.
"""

__version__ = "0.1.0"

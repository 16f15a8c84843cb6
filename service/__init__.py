"""MindIE-Service-compatible HTTP server for cogvlm2-video-llama3-chat (``python -m service``).

Wire protocols (vLLM, TGI, Triton, OpenAI), validation ranges, status codes and error bodies follow
docs/SERVICE_API.md.
"""

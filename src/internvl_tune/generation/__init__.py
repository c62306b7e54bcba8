"""Text generation behind one interface (base.py): the `hf` backend (transformers in this process), the `server`
backend (an OpenAI-compatible server: vLLM, LMDeploy, SGLang) and a small server of our own (serve.py)."""

"""Text generation behind one interface (base.py): the `hf` backend (transformers in this process), the `server`
backend (an OpenAI-compatible server: vLLM, LMDeploy, SGLang) and a small server of our own (serve.py)."""

from internvl_tune._lazy import lazy_exports

_EXPORTS = {
    "Backend": "base",
    "GenerationRequest": "base",
    "SamplingParams": "base",
    "HFBackend": "hf",
    "ServerBackend": "server",
    "ServerError": "server",
    "start_server": "serve",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)

"""``lego serve``: the decoding engine behind an OpenAI-compatible server on LitServe.

* :mod:`~lego_lightning.serve.protocol`: the request bodies and their checks;
* :mod:`~lego_lightning.serve.spec`: the HTTP side (endpoints, text, streaming, admission);
* :mod:`~lego_lightning.serve.worker`: the engine in LitServe's continuous batching loop;
* :mod:`~lego_lightning.serve.server`: the LitServer, and its shutdown on SIGTERM.
"""

from lego_lightning.serve.protocol import Limits
from lego_lightning.serve.server import build_server, run_server
from lego_lightning.serve.spec import OpenAISpec
from lego_lightning.serve.worker import EngineAPI

__all__ = ["EngineAPI", "Limits", "OpenAISpec", "build_server", "run_server"]

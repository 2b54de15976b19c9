"""``litgpt-skip2lora serve``: LitGPT's LitServe server, its API classes loading this package's
:class:`~litgpt_skip2lora.api.LLM` in its workers (at module level, so that LitServe can hand them over).
"""

import os
import signal
from functools import partialmethod, wraps
from inspect import Parameter, signature
from typing import Any, Literal

import litgpt.deploy.serve as litgpt_serve

from litgpt_skip2lora.api import LLM, swapped
from litgpt_skip2lora.checks import refuse


class _LoadsOurLLM:
    def setup(self, device: str) -> None:
        with swapped(litgpt_serve, LLM=LLM):
            super().setup(device)


class _ChecksPrompts(_LoadsOurLLM):
    """A request is ``{"prompt": "..."}``; anything else is answered 400 with one line (LitGPT's API answers a
    missing prompt with a 500 and ignores other fields)."""

    def decode_request(self, request: dict[str, Any]) -> str:
        from fastapi import HTTPException  # LitServe's, there whenever a server runs

        if not isinstance(request, dict) or not isinstance(request.get("prompt"), str):
            raise HTTPException(400, 'A request is a JSON object with a "prompt" string: {"prompt": "..."}.')
        if others := sorted(set(request) - {"prompt"}):
            raise HTTPException(400, f"Unknown fields {others}: how the server generates is set when it starts.")
        return request["prompt"]


class SimpleAPI(_ChecksPrompts, litgpt_serve.SimpleLitAPI):
    """LitGPT's ``/predict`` API: the whole answer at once."""


class StreamAPI(_ChecksPrompts, litgpt_serve.StreamLitAPI):
    """LitGPT's streaming API."""


class OpenAISpecAPI(_LoadsOurLLM, litgpt_serve.OpenAISpecLitAPI):
    """LitGPT's OpenAI-compatible API."""


LISTENS_ON = {"127.0.0.1": "this machine only", "0.0.0.0": "every IPv4 interface", "::": "every interface"}
"""The addresses LitServe listens on: LitGPT's server takes every interface; this one the loopback unless told."""
Host = Literal[tuple(LISTENS_ON)]
RUN_SERVER = signature(litgpt_serve.run_server)


@wraps(litgpt_serve.run_server)
def serve(host: Host = "127.0.0.1", **kwargs: Any) -> None:
    if not litgpt_serve._LITSERVE_AVAILABLE:  # what LitGPT's server itself checks
        refuse(ModuleNotFoundError("serve needs LitServe: pip install 'litgpt-skip2lora[serve]'"))
    apis = dict(SimpleLitAPI=SimpleAPI, StreamLitAPI=StreamAPI, OpenAISpecLitAPI=OpenAISpecAPI)
    signal.signal(signal.SIGTERM, _stop_as_on_ctrl_c(os.getpid()))
    on_host = partialmethod(litgpt_serve.LitServer.run, host=host)
    port = kwargs.get("port", RUN_SERVER.parameters["port"].default)
    print(f"Serving on http://{host}:{port} ({LISTENS_ON[host]})", flush=True)
    with swapped(litgpt_serve, **apis), swapped(litgpt_serve.LitServer, run=on_host):
        litgpt_serve.run_server(**kwargs)


HOSTS_HELP = "; ".join(f"{address}, {where}" for address, where in LISTENS_ON.items())
serve.__doc__ = f"{litgpt_serve.run_server.__doc__.rstrip()}\n        host: Where it listens: {HOSTS_HELP}.\n"
serve.__signature__ = RUN_SERVER.replace(
    parameters=[
        *RUN_SERVER.parameters.values(),
        Parameter("host", Parameter.KEYWORD_ONLY, default="127.0.0.1", annotation=Host),
    ]
)


def _stop_as_on_ctrl_c(server_pid: int):
    """SIGTERM stops the server as Ctrl-C does, workers and port included (by default it would end the main process
    alone); a worker forked with this handler dies of SIGTERM as usual."""

    def handle(signum: int, frame) -> None:
        if os.getpid() == server_pid:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    return handle

"""Plain HTTP routes beside Gradio's, for reads that every open tab repeats every second.

A Gradio event costs a few milliseconds of server CPU per call (FastAPI's body model, dependency
resolution, the session and event machinery), most of it outside the handler. The Train tab's
status poll runs once a second in every open tab while training shares the CPU, so it is served by
a bare route instead: the browser fetches it from the timer's JavaScript and puts the values into
the components itself; everything else still goes through Gradio events.

The routes honour the app's password as Gradio's own routes do (the same test as Gradio's ``/user``
route: its auth dependency, else the login cookie's token) and answer 401 otherwise.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import gradio as gr
import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

ROUTE_PREFIX = "/lora-gui/"


@dataclass
class JsonRoute:
    """``GET ROUTE_PREFIX + name``: ``read()`` as JSON, for logged-in clients only."""

    name: str
    read: Callable[[], object]

    @property
    def path(self) -> str:
        return ROUTE_PREFIX + self.name

    def route(self) -> Route:
        return Route(self.path, self.respond, methods=["GET"])

    async def respond(self, request: Request) -> Response:
        if not await self.logged_in(request):
            return JSONResponse({"error": "Not authenticated"}, status_code=401)
        return Response(orjson.dumps(self.read()), media_type="application/json",
                        headers={"Cache-Control": "no-store"})

    async def logged_in(self, request: Request) -> bool:
        """Gradio's own test (its ``/user`` route): the auth dependency, else the login cookie's token."""
        app = request.app
        if getattr(app, "auth", None) is None and getattr(app, "auth_dependency", None) is None:
            return True
        if app.auth_dependency is not None:
            user = app.auth_dependency(request)
            if inspect.isawaitable(user):
                user = await user
            return user is not None
        cookies = request.cookies
        token = cookies.get(f"access-token-{app.cookie_id}") or cookies.get(f"access-token-unsecure-{app.cookie_id}")
        return app.tokens.get(token) is not None

    def fetch_js(self) -> str:
        """A Gradio ``js`` event function: the route's values, or the outputs' current values (its
        inputs) when the fetch fails, so a lost connection leaves the page as it was."""
        return f"""async (...current) => {{
  try {{
    const root = (window.gradio_config && window.gradio_config.root) || document.baseURI;
    const base = root.endsWith("/") ? root : root + "/";
    const response = await fetch(new URL("{self.path.lstrip('/')}", base), {{cache: "no-store"}});
    if (response.ok) return await response.json();
  }} catch (error) {{}}
  return current;
}}"""


class AppBlocks(gr.Blocks):
    """``gr.Blocks`` that serves ``light_routes`` beside Gradio's routes however it is launched."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.light_routes: list[JsonRoute] = []

    def launch(self, *args, app_kwargs: dict | None = None, **kwargs):
        app_kwargs = dict(app_kwargs or {})
        app_kwargs["routes"] = [*app_kwargs.get("routes", []), *(route.route() for route in self.light_routes)]
        return super().launch(*args, app_kwargs=app_kwargs, **kwargs)

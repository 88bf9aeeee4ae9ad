"""HEAD and OPTIONS as a web server answers them, for every route at once.

``HEAD`` on a path with a GET route runs the GET and sends its status and headers (its
``content-length`` included) without the body; uptime checkers and link checkers send it.
``OPTIONS`` on a known path is ``204`` with an ``Allow`` header naming the path's methods
(HEAD with GET, OPTIONS always). The server has no CORS options, so a browser's preflight gets
the same answer and no ``Access-Control-*`` header: a page of another origin stays refused.
Anything else, and paths no route knows, goes to the app as it is (a HEAD's body dropped).
"""

from __future__ import annotations

from starlette.routing import Match, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def allowed_methods(router: Router, scope: Scope) -> set[str]:
    """The methods the routes of ``router`` take on the path of ``scope`` (empty: none
    knows it)."""
    methods: set[str] = set()
    for route in router.routes:
        match, _ = route.matches({**scope, "method": "GET"})
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    if "GET" in methods:
        methods.add("HEAD")
    return methods | {"OPTIONS"} if methods else methods


class HeadAndOptions:
    """Pure ASGI middleware: HEAD through the GET routes, OPTIONS from the route table."""

    def __init__(self, app: ASGIApp, *, router: Router):
        self.app, self.router = app, router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope.get("method")
        if scope["type"] != "http" or method not in ("HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        methods = allowed_methods(self.router, scope)
        if method == "OPTIONS":
            if not methods:
                return await self.app(scope, receive, send)  # the app's 404
            allow = ", ".join(sorted(methods)).encode()
            await send({"type": "http.response.start", "status": 204,
                        "headers": [(b"allow", allow)]})
            return await send({"type": "http.response.body", "body": b""})
        if "GET" in methods:
            scope = {**scope, "method": "GET"}

        async def without_body(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body"):
                    return  # the GET's body is not sent; its end is, once
                message = {"type": "http.response.body", "body": b""}
            await send(message)

        await self.app(scope, receive, without_body)

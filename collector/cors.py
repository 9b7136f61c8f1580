"""CORS for browsers that send events from other origins: falcon's CORSMiddleware, configured.

COLLECTOR_CORS_ORIGINS lists the origins allowed (or `*`); empty turns CORS off, so
browsers refuse to let other sites' pages read the answers. falcon answers the
preflight OPTIONS itself (Access-Control-Allow-Methods from the route's methods, the
requested headers, such as X-API-Key, allowed) and adds Access-Control-Allow-Origin
to every answer to an allowed origin, errors included, so a page can read why an
event was refused, and when to retry. No credentials (cookies) are allowed: the API
uses none.
"""

from typing import Sequence

import falcon

ANY_ORIGIN = "*"
# Answer headers a page may read beyond the safelisted ones: when to retry a 503, and
# which scheme a 401 wants.
EXPOSED_HEADERS = ("Retry-After", "WWW-Authenticate")


class CollectorCORS(falcon.CORSMiddleware):
    """falcon's CORS policy, plus `Vary: Origin` when the answer depends on the origin."""

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource: object,
                         req_succeeded: bool) -> None:
        super().process_response(req, resp, resource, req_succeeded)
        # Without it, a shared cache could hand one origin's answer to another.
        if self.allow_origins != ANY_ORIGIN and req.get_header("Origin") is not None:
            resp.append_header("Vary", "Origin")


def cors_middleware(origins: Sequence[str]) -> CollectorCORS | None:
    """Return the CORS middleware for the allowed origins, or None when CORS is off."""
    if not origins:
        return None
    return CollectorCORS(allow_origins=ANY_ORIGIN if ANY_ORIGIN in origins else list(origins),
                         expose_headers=EXPOSED_HEADERS)

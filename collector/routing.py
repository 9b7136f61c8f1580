"""One route answered by several resources, one per HTTP method.

falcon serves a URI template with a single resource object, whose `on_<method>`
responders it maps when the route is added; a second `add_route` of the same
template replaces the first. /events takes batches (POST, the ingest path) and
answers queries (GET, the read path): two jobs with different collaborators, kept
in two classes and joined here, so that neither knows of the other.
"""

METHODS = ("get", "post", "put", "patch", "delete")


class SharedRoute:
    """A resource made of the responders of others: `SharedRoute(get=a, post=b)`."""

    def __init__(self, **resources: object) -> None:
        for method, resource in resources.items():
            if method not in METHODS:
                raise ValueError(f"{method!r} is not one of {', '.join(METHODS)}")
            responder = getattr(resource, f"on_{method}")
            setattr(self, f"on_{method}", responder)

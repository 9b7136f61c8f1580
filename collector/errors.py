"""The JSON body of every refusal, and the HTTP errors that carry it."""

import falcon
import msgspec

from collector.validation import EventRejected


def error_body(title: str, description: str, field: str | None = None,
               limit: str | None = None) -> dict:
    """Shape the body of every error answer.

    Always `{"title": ..., "description": ...}`; plus `"field"` naming the event field
    at fault, or `"limit"` naming the setting or rule that was exceeded. The body never
    echoes the client's payload.
    """
    body = {"title": title, "description": description}
    if field is not None:
        body["field"] = field
    if limit is not None:
        body["limit"] = limit
    return body


class CollectorError(falcon.HTTPError):
    """An HTTP error whose body is `error_body(...)`."""

    def __init__(self, status: str, title: str, description: str, field: str | None = None,
                 limit: str | None = None, headers: dict | None = None) -> None:
        super().__init__(status, title=title, description=description, headers=headers)
        self.field = field
        self.limit = limit

    def to_dict(self, obj_type=dict) -> dict:
        return error_body(self.title, self.description, self.field, self.limit)


def rejected(ex: EventRejected) -> CollectorError:
    """Translate a validation refusal into its HTTP error (400, or 413 for a size limit)."""
    if ex.too_large:
        return CollectorError(falcon.HTTP_413, "Payload too large", ex.description,
                              ex.field, ex.limit)
    title = "Invalid field" if ex.field else "Invalid body"
    return CollectorError(falcon.HTTP_400, title, ex.description, ex.field, ex.limit)


def serialize_error(req: falcon.Request, resp: falcon.Response,
                    exception: falcon.HTTPError) -> None:
    """Answer every error as JSON, falcon's own (404, 405, 500) included."""
    body = exception.to_dict()
    if not isinstance(exception, CollectorError):
        body = error_body(exception.title or exception.status,
                          exception.description or exception.title or "")
    resp.data = msgspec.json.encode(body)
    resp.content_type = falcon.MEDIA_JSON
    resp.append_header("Vary", "Accept")

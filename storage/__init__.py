"""PostgreSQL side of Firehose: schema, batch writer, error classification, backoff."""

"""HTTP side of Firehose: app factory, resources, validation, queue, spool and flusher."""

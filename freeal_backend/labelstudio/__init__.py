"""The Label Studio ML backend: HTTP shell, background jobs and queue, SDK glue, labeling configs."""

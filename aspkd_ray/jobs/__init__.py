"""End-to-end jobs that tie the stages together: steal and demo."""

"""Celery worker and beat of the marketplace: challenge windows and verification."""

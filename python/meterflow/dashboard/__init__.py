"""The dashboard: server-rendered pages for the people who run billing, served at /dashboard."""

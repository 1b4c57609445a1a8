"""The dashboard: server-rendered pages for the people who run billing, served at /dashboard.

Owns: its pages, templates, sessions (a key exchanged for a cookie whose
session lives in the records database), CSRF and its forms.
Does not own: what it shows alike with the API (`web`: documents, usage answers, pages of a list, the
key guard), nor any domain rule; it never imports the API.
"""

"""The web floor, shared by both HTTP edges (`api` and `dashboard`): the key guard (`guard`), bodies and JSON
answers (`responses`), error answers and their handlers (`errors`), ids read from a request (`params`),
pages of a list (`pagination`), what both show alike (`views`: invoice documents, usage answers) and the
typed state a route reads (`state`), and what browsers are told (`browser`: HSTS, CSP on HTML,
redirects from the public URL).

Owns: HTTP mechanics every route shares. Does not own: any route, nor a domain rule.
"""

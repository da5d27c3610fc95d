"""The owner's web app: a page for phone and desktop, and its JSON API, served by the gateway (`[web]`).

`server` serves it (an integration in `assembly.INTEGRATIONS`), `sessions` says who
may use it, `history` reads the last day from the journal, `installer` builds the
installer's view; `static/` holds the page itself.
"""
